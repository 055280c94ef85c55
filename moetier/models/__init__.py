"""moetier.models"""
