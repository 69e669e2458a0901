"""ratiorl.objectives"""
