"""EsViT's shifted windows for Swins that see crops smaller than their build size (multi-crop).

A Swin fixes each block's window and shift from its build resolution. For a smaller feature map (a 96 px local
crop of a 224 px model: maps of 24, 12, 6, 3 tokens), timm shifts the map first and then pads it to a multiple
of the window; EsViT (and so the weights and numbers of its paper) pads first, with zero tokens after the block's
first LayerNorm, and then shifts the padded map, with the shift mask built on the padded map and the padded
tokens left unmasked as keys. At the build resolution (no padding) the two agree exactly; on smaller maps they
differ. ``use_esvit_windows`` gives a timm Swin EsViT's behaviour; its state dict is unchanged, so exported
weights still load in timm.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _esvit_attn(self, x: torch.Tensor) -> torch.Tensor:
    """timm ``SwinTransformerBlock._attn`` with EsViT's order: pad to whole windows, then shift.

    ``x``: ``(B, H, W, C)`` tokens after ``norm1``. Window and shift are the block's own (from its build size).
    """
    from timm.models.swin_transformer import window_partition, window_reverse

    batch, height, width, dim = x.shape
    (wh, ww), (sh, sw) = self.window_size, self.shift_size
    padded = F.pad(x, (0, 0, 0, (wh - width % ww) % ww, 0, (wh - height % wh) % wh))
    hp, wp = padded.shape[1], padded.shape[2]
    shifted = any(self.shift_size)
    if shifted:
        padded = torch.roll(padded, shifts=(-sh, -sw), dims=(1, 2))
    # timm's mask builder, given the padded map (it reads only its shape, device and dtype).
    mask = self.get_attn_mask(padded[:1, :, :, :1]) if shifted else None
    windows = window_partition(padded, self.window_size).view(-1, wh * ww, dim)
    out = self.attn(windows, mask=mask).view(-1, wh, ww, dim)
    out = window_reverse(out, self.window_size, hp, wp)
    if shifted:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out[:, :height, :width, :].contiguous()


def use_esvit_windows(model: nn.Module) -> int:
    """Give every Swin block of ``model`` EsViT's pad-then-shift windows; returns how many blocks changed."""
    changed = 0
    for module in model.modules():
        if type(module).__name__ == "SwinTransformerBlock" and hasattr(module, "_attn"):
            module._attn = types.MethodType(_esvit_attn, module)
            changed += 1
    return changed
