"""The shape MoBY and MoCo v3 share: an online encoder -> projector -> predictor and a momentum target encoder ->
projector on two BYOL-style views, the predictions of each view against the other view's targets."""

from __future__ import annotations

import torch
from torch import nn

from ..data.gpu_augment import BatchMoBYAugment
from ..data.transforms import moby_transform
from ..models.momentum import copy_weights
from .base import Method


class PredictorMomentumMethod(Method):
    """Online: ``encoder -> projector -> predictor``; target: ``encoder_target -> projector_target``, an EMA of the
    online pair (built separately, so it gets its own drop-path rate, then copied). ``forward`` hands the two views'
    predictions and targets to ``self.criterion(pred_1, pred_2, target_1, target_2)``. Evaluated and exported: the
    online encoder."""

    backbone_key = "encoder"

    def build_branches(self, encoder: nn.Module, projector: nn.Module, predictor: nn.Module,
                       encoder_target: nn.Module, projector_target: nn.Module) -> None:
        """Set the two branches and make the target a frozen copy of the online pair. Pass the modules in the order
        they were built, which fixes the random draws of construction (online encoder, projector, predictor, then
        the target's)."""
        self.encoder, self.projector, self.predictor = encoder, projector, predictor
        self.encoder_target, self.projector_target = encoder_target, projector_target
        copy_weights(self.encoder, self.encoder_target)
        copy_weights(self.projector, self.projector_target)

    @staticmethod
    def train_transform(cfg):
        return moby_transform(cfg.data.image_size, cfg.data.aug, cfg.data.normalization)

    @staticmethod
    def device_transform(cfg):
        return BatchMoBYAugment(cfg.data.image_size, cfg.data.aug, cfg.data.normalization)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder

    def momentum_pairs(self):
        return [(self.encoder, self.encoder_target), (self.projector, self.projector_target)]

    def trainable_modules(self):
        return [self.encoder, self.projector, self.predictor]

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views``: two ``(B, 3, H, W)`` batches of the same images under the two augmentations."""
        if len(views) != 2:
            raise ValueError(f"{type(self).__name__} takes exactly 2 views, got {len(views)}")
        x1, x2 = views
        pred_1 = self.predictor(self.projector(self.encoder(x1)))
        pred_2 = self.predictor(self.projector(self.encoder(x2)))
        with torch.no_grad():
            target_1 = self.projector_target(self.encoder_target(x1))
            target_2 = self.projector_target(self.encoder_target(x2))
        return self.criterion(pred_1, pred_2, target_1, target_2)
