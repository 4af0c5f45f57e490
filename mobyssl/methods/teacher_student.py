"""The shape DINO, EsViT and SiT share: a student trained by gradients and a teacher that is its EMA, the teacher
being the result, and views made by ``crops(cfg)`` (DINO's global and local crops)."""

from __future__ import annotations

from torch import nn

from ..data.gpu_augment import BatchMultiCropAugment
from ..data.transforms import MultiCrop, multicrop_transform
from ..models.momentum import cosine_momentum
from .base import Method


class TeacherStudentMethod(Method):
    """``self.student`` (trained) and ``self.teacher`` (its EMA, evaluated and exported, as DINO's scripts do); the
    teacher momentum and the lr warm-up follow DINO's ``utils.cosine_scheduler``."""

    backbone_key = "teacher"
    warmup_ends_at_peak = True  # np.linspace(start, base, warmup_iters): the peak on the last warm-up step

    @staticmethod
    def crops(cfg) -> MultiCrop:
        """The method's views: sizes, scales, blur and solarize of each crop."""
        raise NotImplementedError

    @classmethod
    def train_transform(cls, cfg):
        return multicrop_transform(cls.crops(cfg), cfg.data.aug, cfg.data.normalization)

    @classmethod
    def device_transform(cls, cfg):
        return BatchMultiCropAugment(cls.crops(cfg), cfg.data.aug, cfg.data.normalization)

    @property
    def backbone(self) -> nn.Module:
        return self.teacher

    @property
    def trained_backbone(self) -> nn.Module:
        return self.student

    def momentum_at(self, step: int, total_steps: int) -> float:
        # DINO's momentum for its 0-based iteration ``step - 1`` (MoBY's schedule is one step later).
        return cosine_momentum(step - 1, total_steps, self.base_momentum)
