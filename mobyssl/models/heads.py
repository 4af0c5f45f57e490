"""Projection and prediction heads."""

from __future__ import annotations

import torch
from torch import nn


class MLPHead(nn.Module):
    """``Linear(in, hidden) - BN - ReLU - Linear(hidden, out)``: MoBY's projector and predictor.

    Shapes: ``(B, in_dim) -> (B, out_dim)``.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
