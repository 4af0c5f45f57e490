"""DINO's position-embedding interpolation for ViTs that see crops of another size (multi-crop).

timm resamples a ViT's position embedding to a new grid with ``F.interpolate(size=...)`` and antialiasing.
DINO (and so the weights and numbers of its paper) passes a *scale factor* ``(n + 0.1) / N`` instead of a
size, without antialiasing: the sampling positions differ, and a 14x14 -> 6x6 grid differs by up to ~1 in
unit-variance embeddings. ``use_dino_pos_embed`` gives a timm ViT DINO's behaviour; its state dict is
unchanged, so exported weights still load in timm.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn


def dino_resample(pos_embed: torch.Tensor, grid: tuple[int, int], prefix_tokens: int = 1) -> torch.Tensor:
    """``pos_embed`` ``(1, prefix + N, C)`` of a square ``sqrt(N) x sqrt(N)`` grid, resampled the DINO way to
    ``grid = (h, w)``: unchanged when the grid is the same, else bicubic with scale factors ``(h + 0.1) / sqrt(N)``
    and ``(w + 0.1) / sqrt(N)`` (no antialiasing, corners not aligned). Returns ``(1, prefix + h * w, C)``."""
    prefix, patch = pos_embed[:, :prefix_tokens], pos_embed[:, prefix_tokens:]
    n, dim = patch.shape[1], patch.shape[2]
    side = int(math.isqrt(n))
    if side * side != n:
        raise ValueError(f"the position embedding has {n} patch entries, not a square grid")
    h, w = grid
    if (h, w) == (side, side):
        return pos_embed
    square = patch.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    # The +0.1 avoids a floating-point error in the output size (DINO's own comment on this choice).
    resized = F.interpolate(square, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic",
                            align_corners=False)
    if resized.shape[-2:] != (h, w):
        raise ValueError(f"resampling a {side}x{side} position grid gave {tuple(resized.shape[-2:])}, not {(h, w)}")
    resized = resized.permute(0, 2, 3, 1).reshape(1, h * w, dim)
    return torch.cat([prefix, resized], dim=1)


def _dino_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
    """timm ``VisionTransformer._pos_embed`` for ``dynamic_img_size`` models, with DINO's resampling."""
    batch, h, w, dim = x.shape
    x = x.reshape(batch, h * w, dim)
    prefix = [self.cls_token.expand(batch, -1, -1)] if self.cls_token is not None else []
    x = torch.cat(prefix + [x], dim=1)
    x = x + dino_resample(self.pos_embed, (h, w), len(prefix))
    return self.pos_drop(x)


def use_dino_pos_embed(model: nn.Module) -> nn.Module:
    """Make a timm ViT built with ``dynamic_img_size=True`` (CLS token, position embedding on it, no register
    tokens) resample its position embedding as DINO does. Returns ``model``."""
    if not getattr(model, "dynamic_img_size", False) or getattr(model, "pos_embed", None) is None:
        raise ValueError("DINO's position embedding needs a timm ViT built with dynamic_img_size=True")
    if getattr(model, "no_embed_class", False) or getattr(model, "reg_token", None) is not None \
            or getattr(model, "cls_token", None) is None:
        raise ValueError("DINO's position embedding needs a ViT with a CLS token and no register tokens "
                         "(the position embedding must cover the CLS token)")
    model._pos_embed = types.MethodType(_dino_pos_embed, model)
    return model
