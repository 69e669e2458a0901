"""ratiorl.tasks"""
