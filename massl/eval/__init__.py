"""Evaluation of a trained teacher backbone: feature extraction, weighted k-NN, linear probe."""
