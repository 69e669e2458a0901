"""ratiorl.rewards"""
