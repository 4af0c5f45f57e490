"""Backbones and heads."""

from .backbones import (ALIASES, PRESETS, BackboneError, TokenBatchNorm, available_backbones,
                        create_backbone, feature_dim)
from .heads import MLPHead

__all__ = ["ALIASES", "PRESETS", "BackboneError", "TokenBatchNorm", "available_backbones",
           "create_backbone", "feature_dim", "MLPHead"]
