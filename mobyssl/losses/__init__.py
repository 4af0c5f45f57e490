"""Losses; each owns its buffers so they checkpoint with ``state_dict``."""

from .dino_loss import DenseOutputs, DINOLoss, EsViTLoss
from .moby_loss import MoBYLoss, info_nce
from .mocov3_loss import MoCoV3Loss, batch_contrastive, contrastive_stats
from .queue import FeatureQueue
from .sit_loss import SiTLoss, masked_l1

__all__ = ["DenseOutputs", "DINOLoss", "EsViTLoss", "FeatureQueue", "MoBYLoss", "MoCoV3Loss", "SiTLoss",
           "batch_contrastive", "contrastive_stats", "info_nce", "masked_l1"]
