"""The linear-probe features of DINO's and EsViT's protocol: the pooled outputs of a backbone's last blocks.

DINO probes ViT-S with the class tokens of its last 4 blocks (each through the final LayerNorm) and EsViT probes
Swins with the average-pooled tokens of their last 4 blocks, the final LayerNorm applied only to the blocks of the
last stage (the earlier blocks have another width and no norm of their own). Both concatenate the 4 vectors. With
one block this is the backbone's own pooled feature, ``model(x)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BackboneError


def _is_vit(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("blocks", "_pos_embed", "patch_embed", "norm", "forward_head"))


def _is_swin(model: nn.Module) -> bool:
    layers = getattr(model, "layers", None)
    return (isinstance(layers, nn.Sequential) and len(layers) > 0 and all(hasattr(s, "blocks") for s in layers)
            and hasattr(model, "patch_embed") and hasattr(model, "norm"))


def count_blocks(model: nn.Module) -> int:
    """Transformer blocks of a timm ViT or Swin (0 for another kind of backbone)."""
    if _is_vit(model):
        return len(model.blocks)
    if _is_swin(model):
        return sum(len(stage.blocks) for stage in model.layers)
    return 0


def check_last_blocks(backbone: nn.Module, n: int, key: str = "linear.n_last_blocks") -> None:
    """Raise ``BackboneError`` naming ``key`` unless ``backbone`` has ``n`` blocks to pool (any backbone for n=1)."""
    if n == 1:
        return
    total = count_blocks(backbone)
    if total == 0:
        raise BackboneError(f"{key}={n} needs a ViT or Swin backbone (its blocks are pooled one by one); "
                            f"{type(backbone).__name__} has no transformer blocks mobyssl can read. Use {key}=1.")
    if not 1 <= n <= total:
        raise BackboneError(f"{key}={n}, but the backbone has {total} blocks. Use a value from 1 to {total} "
                            "(DINO and EsViT probe the last 4).")


class LastBlocksFeatures(nn.Module):
    """``forward(x) -> (B, num_features)``: the pooled outputs of the last ``n`` blocks of ``backbone``, concatenated.

    ViT: each block's tokens through the final norm, pooled as the model pools (the class token, or the patch-token
    mean for ``global_pool='avg'``). Swin: each block's token map averaged, through the final norm when the block is
    in the last stage. ``num_features`` is the concatenated width (ViT-S, n=4: 1536; Swin-T, n=4: 2 x 384 + 2 x 768).
    The backbone is shared, not copied; this module adds no parameters of its own.
    """

    def __init__(self, backbone: nn.Module, n: int, key: str = "linear.n_last_blocks"):
        super().__init__()
        check_last_blocks(backbone, n, key)
        self.backbone, self.n = backbone, n
        self.is_vit = _is_vit(backbone)
        if self.is_vit:
            self.num_features = n * int(backbone.num_features)
        else:
            widths = [int(block.norm1.normalized_shape[0]) for stage in backbone.layers for block in stage.blocks]
            self.num_features = sum(widths[-n:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model, outputs = self.backbone, []
        if self.is_vit:
            x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
            first = len(model.blocks) - self.n
            for i, block in enumerate(model.blocks):
                x = block(x)
                if i >= first:
                    outputs.append(model.forward_head(model.norm(x), pre_logits=True))
            return torch.cat(outputs, dim=-1)
        x = model.patch_embed(x)
        remaining = count_blocks(model)
        last = len(model.layers) - 1
        for s, stage in enumerate(model.layers):
            x = stage.downsample(x)
            for block in stage.blocks:
                x = block(x)
                remaining -= 1
                if remaining < self.n:
                    outputs.append(model.forward_head(model.norm(x), pre_logits=True) if s == last
                                   else x.mean(dim=(1, 2)))  # (B, H, W, C) -> (B, C)
        return torch.cat(outputs, dim=-1)
