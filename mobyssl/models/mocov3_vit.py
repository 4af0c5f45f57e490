"""MoCo v3's ViT (Chen, Xie and He 2021): a timm ViT with MoCo's initialisation, its fixed 2-D sin-cos position
embedding and, optionally, a patch projection frozen at its random init ("stop-grad conv1").

The changes are made in place on a timm ``VisionTransformer``; the state dict keeps timm's layout, so an exported
backbone loads in timm (the position embedding is then an ordinary, learnable table holding the sin-cos values).
"""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import BackboneError


def sincos_position_table(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's ``(1, 1 + grid_h * grid_w, dim)`` table: a zero row for the class token, then one row per patch.

    Patch row ``m`` is ``[sin(a w), cos(a w), sin(b w), cos(b w)]`` with ``w_k = temperature ** (-k / (dim / 4))``,
    ``a = m // grid_h`` and ``b = m % grid_h``: MoCo's ``meshgrid`` order, which for a square grid makes ``a`` the
    token's row and ``b`` its column (for other grids it is kept as MoCo computes it). Computed in float32.
    """
    if dim % 4:
        raise BackboneError(f"MoCo v3's sin-cos position embedding needs a width divisible by 4, got {dim}; set "
                            "method.sincos_pos_embed=false or use another backbone width.")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    m = torch.arange(grid_h * grid_w)
    a = torch.div(m, grid_h, rounding_mode="floor").to(torch.float32)[:, None] * omega
    b = (m % grid_h).to(torch.float32)[:, None] * omega
    rows = torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), rows])[None]


def mocov3_init_(model: VisionTransformer) -> None:
    """MoCo v3's ViT initialisation: qkv weights uniform in ``+-sqrt(6 / (out / 3 + in))`` (Q, K and V as separate
    square matrices), every other Linear Xavier-uniform, Linear biases 0, class token ``N(0, 1e-6^2)``, the patch
    projection uniform in ``+-sqrt(6 / (3 p^2 + D))`` with bias 0. Norm layers keep weight 1, bias 0."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                if name.endswith("qkv"):
                    bound = math.sqrt(6.0 / (module.weight.shape[0] / 3 + module.weight.shape[1]))
                    nn.init.uniform_(module.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(model.cls_token, std=1e-6)
        proj = model.patch_embed.proj
        fan = proj.weight.shape[1] * proj.weight.shape[2] * proj.weight.shape[3]  # 3 * p * p
        bound = math.sqrt(6.0 / (fan + proj.weight.shape[0]))
        nn.init.uniform_(proj.weight, -bound, bound)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)


def make_mocov3_vit(model: nn.Module, sincos_pos_embed: bool = True, freeze_patch_embed: bool = True) -> nn.Module:
    """Turn a timm ViT into MoCo v3's, in place: its init, then the fixed sin-cos table and the frozen patch
    projection when asked. Another backbone (a Swin) is returned as built, with timm's init, when neither option
    is asked; with one of them it is refused with a ``BackboneError`` naming the options."""
    is_vit = (isinstance(model, VisionTransformer) and model.cls_token is not None and model.pos_embed is not None
              and not model.no_embed_class and model.num_prefix_tokens == 1)
    if not is_vit:
        if sincos_pos_embed or freeze_patch_embed:
            raise BackboneError(
                "method.sincos_pos_embed and method.stop_grad_patch_embed need a timm ViT with a class token and a "
                f"position embedding for it and the patches; got {type(model).__name__}. Use a ViT (model.backbone, "
                "e.g. vit_small_patch16_224), or set both to false to train this backbone with MoCo v3's loss and "
                "heads only.")
        return model
    mocov3_init_(model)
    if sincos_pos_embed:
        grid_h, grid_w = model.patch_embed.grid_size
        table = sincos_position_table(grid_h, grid_w, model.embed_dim)
        with torch.no_grad():
            model.pos_embed.copy_(table.to(model.pos_embed.dtype))
        model.pos_embed.requires_grad_(False)
    if freeze_patch_embed:
        for p in model.patch_embed.proj.parameters():
            p.requires_grad_(False)
    return model
