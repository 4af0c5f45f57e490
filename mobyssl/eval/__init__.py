"""Evaluation of frozen backbones: k-NN, linear probing, few-shot classification, dense correspondence."""

from .correspondence import View2, evaluate_correspondence
from .features import extract_features
from .fewshot import fewshot_classify
from .knn import knn_classify
from .linear import linear_probe_fast, linear_probe_full

__all__ = ["View2", "evaluate_correspondence", "extract_features", "fewshot_classify", "knn_classify",
           "linear_probe_fast", "linear_probe_full"]
