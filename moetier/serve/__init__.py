"""moetier.serve"""
