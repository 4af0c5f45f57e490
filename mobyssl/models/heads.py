"""Projection and prediction heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def _trunc_normal_linear(linear: nn.Linear) -> nn.Linear:
    nn.init.trunc_normal_(linear.weight, std=0.02)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


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


class MoCoMLP(nn.Module):
    """MoCo v3's projector / predictor: ``n_layers`` bias-free Linears, BN + ReLU between them, and a BatchNorm
    without affine parameters after the last (``last_bn``).

    Projector: ``MoCoMLP(3, D, 4096, 256)``; predictor: ``MoCoMLP(2, 256, 4096, 256)``. The Linears keep
    PyTorch's default init (MoCo builds them after its encoder init). Shapes: ``(B, in_dim) -> (B, out_dim)``.
    """

    def __init__(self, n_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"MoCoMLP needs n_layers >= 1, got {n_layers}")
        layers: list[nn.Module] = []
        for i in range(n_layers):
            last = i == n_layers - 1
            layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim, bias=False))
            if not last:
                layers += [nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            elif last_bn:
                layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DINOHead(nn.Module):
    """DINO's projection head: an MLP to a bottleneck, L2 normalisation, then a weight-normalised linear layer.

    ``Linear(in, hidden) [BN] GELU ... Linear(hidden, bottleneck)`` with ``n_layers`` Linears (one
    ``Linear(in, bottleneck)`` when ``n_layers == 1``), then ``last_layer``: ``Linear(bottleneck, out_dim,
    bias=False)`` under weight normalisation, row ``k`` being ``g_k v_k / ||v_k||``. The magnitudes ``g`` start
    at 1; with ``norm_last_layer`` they stay fixed (not trainable), so every output is a cosine similarity.
    The name ``last_layer`` matters: the trainer freezes parameters containing it in the first epoch(s).

    Shapes: ``(B, in_dim) -> (B, out_dim)``.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"DINOHead needs n_layers >= 1, got {n_layers}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(_trunc_normal_linear(nn.Linear(dims[i], dims[i + 1])))
            if i < n_layers - 1:  # no activation after the bottleneck: it is normalised next
                if use_bn:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.GELU())  # exact (erf) GELU, as DINO
        self.mlp = nn.Sequential(*layers)
        # The default Linear init of v is kept: only its row directions matter once normalised.
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0  # g, (out_dim, 1)
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class SiTHead(nn.Module):
    """SiT's contrastive head on the class token: ``Linear(in, hidden) BN ReLU``, then ``Linear(hidden, hidden) BN
    GELU`` for each middle layer, then ``Linear(hidden, out) BN(affine=False)`` (one Linear when ``n_layers == 1``).
    The activations are mixed as in SiT's code; every Linear has a bias (0) and truncated-normal (0.02) weights.

    Shapes: ``(B, in_dim) -> (B, out_dim)``.
    """

    def __init__(self, in_dim: int, out_dim: int = 256, hidden_dim: int = 4096, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"SiTHead needs n_layers >= 1, got {n_layers}")
        if n_layers == 1:
            layers: list[nn.Module] = [_trunc_normal_linear(nn.Linear(in_dim, out_dim))]
        else:
            layers = [_trunc_normal_linear(nn.Linear(in_dim, hidden_dim)), nn.BatchNorm1d(hidden_dim), nn.ReLU()]
            for _ in range(n_layers - 2):
                layers += [_trunc_normal_linear(nn.Linear(hidden_dim, hidden_dim)), nn.BatchNorm1d(hidden_dim), nn.GELU()]
            layers += [_trunc_normal_linear(nn.Linear(hidden_dim, out_dim)), nn.BatchNorm1d(out_dim, affine=False)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class ReconstructionHead(nn.Module):
    """SiT's pixel decoder: ``[Linear(D, D), GELU] x 3`` on every patch token, then a ``ConvTranspose2d(D, 3, p,
    stride p)`` that paints each token's own ``p x p`` patch (PyTorch's default init, as SiT's).

    Shapes: ``(B, N, D)`` patch tokens of a square ``s x s`` grid in raster order ``-> (B, 3, s p, s p)``.
    """

    def __init__(self, dim: int, patch_size: int, in_chans: int = 3):
        super().__init__()
        self.mlp = nn.Sequential(*[m for _ in range(3) for m in (_trunc_normal_linear(nn.Linear(dim, dim)), nn.GELU())])
        self.to_pixels = nn.ConvTranspose2d(dim, in_chans, kernel_size=patch_size, stride=patch_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        side = int(round(tokens.shape[1] ** 0.5))
        if side * side != tokens.shape[1]:
            raise ValueError(f"ReconstructionHead needs a square token grid, got {tokens.shape[1]} tokens")
        x = self.mlp(tokens).transpose(1, 2).unflatten(2, (side, side))
        return self.to_pixels(x)
