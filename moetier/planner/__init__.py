"""moetier.planner"""
