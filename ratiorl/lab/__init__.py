"""ratiorl.lab"""
