"""Evaluation of frozen backbones: k-NN and linear probing."""

from .features import extract_features
from .knn import knn_classify
from .linear import linear_probe_fast, linear_probe_full

__all__ = ["extract_features", "knn_classify", "linear_probe_fast", "linear_probe_full"]
