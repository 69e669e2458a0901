"""ratiorl.report"""
