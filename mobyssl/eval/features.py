"""Frozen-backbone feature extraction."""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import distributed as D
from ..runtime import autocast


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: DataLoader, device: torch.device,
                     amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features ``(N, D)`` float32 and labels ``(N,)`` int64, on the CPU, in loader order.

    The backbone runs in eval mode (no drop path, BN running stats) and its mode is restored.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    bar = tqdm(loader, desc="features", unit="batch", leave=False,
               disable=not (sys.stderr.isatty() and D.is_main_process()))
    try:
        for images, y in bar:
            with autocast(device, amp_dtype):
                f = backbone(images.to(device, non_blocking=True))
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(y))
    finally:
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()
