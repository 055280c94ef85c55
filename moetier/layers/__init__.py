"""moetier.layers"""
