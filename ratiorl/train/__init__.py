"""ratiorl.train"""
