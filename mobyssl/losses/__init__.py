"""Losses; each owns its buffers so they checkpoint with ``state_dict``."""

from .moby_loss import MoBYLoss, info_nce
from .queue import FeatureQueue

__all__ = ["FeatureQueue", "MoBYLoss", "info_nce"]
