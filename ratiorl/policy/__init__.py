"""ratiorl.policy"""
