"""moetier.traces"""
