"""Backbones and heads."""

from .backbones import (
    ALIASES,
    PRESETS,
    BackboneError,
    TokenBatchNorm,
    available_backbones,
    create_backbone,
    feature_dim,
    patch_sides,
    patch_tokens,
    tokens_and_pooled,
)
from .heads import DINOHead, MLPHead, MoCoMLP, ReconstructionHead, SiTHead

__all__ = ["ALIASES", "PRESETS", "BackboneError", "TokenBatchNorm", "available_backbones",
           "create_backbone", "feature_dim", "patch_sides", "patch_tokens", "tokens_and_pooled", "DINOHead", "MLPHead", "MoCoMLP",
           "ReconstructionHead", "SiTHead"]
