"""ratiorl.integrations"""
