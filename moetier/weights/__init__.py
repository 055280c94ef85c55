"""moetier.weights"""
