"""Losses; each owns its buffers so they checkpoint with ``state_dict``."""

from .dino_loss import DenseOutputs, DINOLoss, EsViTLoss
from .moby_loss import MoBYLoss, info_nce
from .mocov3_loss import MoCoV3Loss, batch_contrastive
from .queue import FeatureQueue

__all__ = ["DenseOutputs", "DINOLoss", "EsViTLoss", "FeatureQueue", "MoBYLoss", "MoCoV3Loss", "batch_contrastive",
           "info_nce"]
