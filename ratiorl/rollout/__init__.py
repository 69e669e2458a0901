"""ratiorl.rollout"""
