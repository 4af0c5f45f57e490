"""Backbones from timm, plus small-image presets and MoBY's BatchNorm-before-MLP Swin variant.

The backbone contract is timm's: ``model(x)`` returns pooled features ``(B, num_features)``
(``num_classes=0``), ``model.forward_features(x)`` returns tokens, and
``set_grad_checkpointing`` works. Presets are plain timm models with other arguments, so
their state dicts load in timm with the same arguments.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import BackboneError
from .pos_embed import use_dino_pos_embed
from .swin_windows import use_esvit_windows


@dataclass(frozen=True)
class Preset:
    base: str
    kwargs: dict = field(default_factory=dict)
    doc: str = ""


# Small-image presets for 32-96 px data. Patch 2 / window 4 Swin keeps a 16x16 token grid at 32 px
# (like patch 4 at 64 px); patch-4 ViTs keep 64 tokens at 32 px.
PRESETS: dict[str, Preset] = {
    "swin_tiny_patch2_window4_32": Preset(
        "swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4),
        "Swin-T (28M) for 32 px: patch 2, window 4, 16x16 -> 2x2 token grid."),
    "swin_mini_patch2_window4_32": Preset(
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, patch_size=2, window_size=4, embed_dim=64, depths=(2, 2, 4, 2), num_heads=(2, 4, 8, 16)),
        "A narrower Swin (embed 64, depths 2-2-4-2, 10M) for 32 px."),
    "swin_nano_patch2_window4_32": Preset(
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)),
        "A 1.4M-parameter Swin (embed 32, depths 1-1-2-1) for CPU quickstarts and tests."),
    "vit_tiny_patch4_32": Preset(
        "vit_tiny_patch16_224", dict(img_size=32, patch_size=4),
        "ViT-Tiny (5.4M): width 192, depth 12, patch 4, 64 tokens at 32 px."),
    "vit_small_patch4_32": Preset(
        "vit_small_patch16_224", dict(img_size=32, patch_size=4),
        "ViT-S / DeiT-S (21M): width 384, depth 12, patch 4, 64 tokens at 32 px."),
    "vit_nano_patch4_32": Preset(
        "vit_tiny_patch16_224", dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4),
        "A 0.8M-parameter ViT (width 128, depth 4) for CPU quickstarts and tests."),
}

# Names the MoBY paper uses, mapped to timm's.
ALIASES = {
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
    "swin_base": "swin_base_patch4_window7_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "vit_tiny": "vit_tiny_patch16_224",
}


class TokenBatchNorm(nn.Module):
    """BatchNorm over the channel (last) dim of ``(..., C)`` tokens: the MoBY-1 norm before Swin's MLP.

    The BatchNorm1d lives in a child so ``nn.SyncBatchNorm.convert_sync_batchnorm`` can swap it.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.bn(x.reshape(-1, shape[-1])).reshape(shape)


def use_bn_before_mlp(model: nn.Module) -> int:
    """Replace the LayerNorm before every Swin block's MLP (``norm2``) by ``TokenBatchNorm``."""
    replaced = 0
    for name, module in model.named_modules():
        if type(module).__name__ == "SwinTransformerBlock" and isinstance(getattr(module, "norm2", None), nn.LayerNorm):
            module.norm2 = TokenBatchNorm(module.norm2.normalized_shape[0])
            replaced += 1
    return replaced


def available_backbones() -> list[str]:
    return sorted(PRESETS) + sorted(ALIASES)


def resolve_name(name: str) -> tuple[str, dict]:
    """Backbone name -> (timm model name, preset kwargs)."""
    if name in PRESETS:
        return PRESETS[name].base, dict(PRESETS[name].kwargs)
    name = ALIASES.get(name, name)
    if name in timm.list_models():
        return name, {}
    candidates = available_backbones() + timm.list_models(["swin*", "vit*", "deit*"])
    close = difflib.get_close_matches(name, candidates, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise BackboneError(
        f"unknown backbone '{name}' (config key model.backbone).{hint} "
        "Use a timm model name or a preset listed by `mobyssl backbones`."
    )


def timm_call(name: str, img_size: int | None = None, norm_before_mlp: str = "ln", **kwargs) -> dict:
    """How timm alone rebuilds the backbone ``create_backbone(name, img_size=..., **kwargs)`` makes, for loading its
    exported weights: ``{"timm_name", "kwargs", "code"}``, ``code`` a Python expression (``import functools,
    timm, torch`` first). The drop path rate and ``multi_size`` are left out: they change no weight. A MoBY-1
    BatchNorm Swin (``norm_before_mlp="bn"``) has layers timm lacks: its ``code`` calls mobyssl's
    ``create_backbone`` (``import mobyssl.models.backbones``), which builds the timm Swin and swaps them in."""
    timm_name, args = resolve_name(name)
    args.update(kwargs)
    if img_size is not None:
        args["img_size"] = img_size
    shown = [f"{k}={v!r}" for k, v in args.items() if k != "layer_norm_eps"]
    if "layer_norm_eps" in args:
        shown.append(f"norm_layer=functools.partial(torch.nn.LayerNorm, eps={float(args['layer_norm_eps'])!r})")
    code = f"timm.create_model({timm_name!r}, pretrained=False, num_classes=0{''.join(', ' + a for a in shown)})"
    if norm_before_mlp == "bn":
        extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        code = (f"mobyssl.models.backbones.create_backbone({name!r}, img_size={img_size!r}, norm_before_mlp='bn'"
                f"{extra})")
    return {"timm_name": timm_name, "kwargs": args, "code": code}


def create_backbone(name: str, *, img_size: int | None = None, drop_path_rate: float = 0.0,
                    norm_before_mlp: str = "ln", multi_size: bool = False, **kwargs) -> nn.Module:
    """A timm backbone without classifier, randomly initialised (nothing is downloaded).

    Args:
        name: timm model name, MoBY alias (``swin_tiny``, ``deit_small``) or small-image preset.
        img_size: input resolution; overrides the preset's.
        drop_path_rate: stochastic depth.
        norm_before_mlp: ``"ln"`` (default) or ``"bn"`` (MoBY-1; Swin only).
        multi_size: also take inputs of other sizes than ``img_size`` (multi-crop): ViTs resample their
            position embedding the DINO way (``pos_embed.use_dino_pos_embed``), Swins pad their maps to whole
            windows before shifting them, the EsViT way (``swin_windows.use_esvit_windows``).
        kwargs: extra ``timm.create_model`` arguments; they override the preset's. ``layer_norm_eps`` sets the
            epsilon of every LayerNorm (EsViT's Swins: 1e-6; timm's Swins: 1e-5, ViTs: 1e-6).
    """
    timm_name, args = resolve_name(name)
    args.update(kwargs)
    if "layer_norm_eps" in args:
        args["norm_layer"] = functools.partial(nn.LayerNorm, eps=float(args.pop("layer_norm_eps")))
    if multi_size:
        args["dynamic_img_size"] = True
        if "swin" in timm_name:
            args["strict_img_size"] = False
    if img_size is not None:
        args["img_size"] = img_size
    try:
        model = timm.create_model(timm_name, pretrained=False, num_classes=0,
                                  drop_path_rate=drop_path_rate, **args)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise BackboneError(f"cannot build backbone '{name}' (model.backbone) with arguments {args} (the preset's, "
                            f"data.image_size and model.kwargs): {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
                            "Fix model.kwargs or data.image_size.") from None
    _check_patch_grid(model, name)
    if multi_size:
        if isinstance(model, VisionTransformer):
            use_dino_pos_embed(model)
        use_esvit_windows(model)  # Swin blocks only; nothing to change in a ViT
    if norm_before_mlp == "bn":
        if use_bn_before_mlp(model) == 0:
            raise BackboneError(
                f"model.norm_before_mlp=bn needs a Swin backbone; '{name}' has no Swin blocks. "
                "Use model.norm_before_mlp=ln."
            )
    elif norm_before_mlp != "ln":
        raise BackboneError(f"model.norm_before_mlp must be 'ln' or 'bn', got {norm_before_mlp!r}")
    return model


def _check_patch_grid(model: nn.Module, name: str) -> None:
    """An image size the patches do not tile would silently drop its last rows and columns: refuse it."""
    embed = getattr(model, "patch_embed", None)
    patch, size = getattr(embed, "patch_size", None), getattr(embed, "img_size", None)
    if not patch or not size:
        return
    patch, size = tuple(patch), tuple(size)
    if any(s % p for s, p in zip(size, patch)):
        p = patch[0]
        lower, upper = size[0] // p * p, -(-size[0] // p) * p
        raise BackboneError(f"data.image_size={size[0]} is not a multiple of the patch size {p} of backbone '{name}' "
                            f"(model.backbone): the last {size[0] - lower} pixel row(s) and column(s) would be dropped. "
                            f"Use data.image_size={lower} or {upper}.")


def patch_sides(model: nn.Module) -> tuple[int, ...]:
    """The patch size of a timm ViT or Swin as ``(height, width)``; ``()`` for a backbone without a patch embedding."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(patch, (tuple, list)):
        return tuple(int(p) for p in patch)
    return (int(patch), int(patch)) if patch else ()


def feature_dim(model: nn.Module) -> int:
    return int(model.num_features)


def tokens_and_pooled(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token features and the pooled feature from one pass, for methods that need both.

    Returns ``(tokens, pooled)``: tokens as timm's ``forward_features`` gives them (``(B, N, C)`` for ViTs,
    ``(B, H, W, C)`` for Swin) and pooled ``(B, num_features)``, equal to ``model(x)``.
    """
    tokens = model.forward_features(x)
    return tokens, model.forward_head(tokens, pre_logits=True)


def patch_tokens(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """``(B, N, C)`` patch tokens in raster order from ``model.forward_features``' output: a Swin's ``(B, H, W, C)``
    map (or a CNN's ``(B, C, H, W)``) flattened, a ViT's ``(B, prefix + N, C)`` tokens without the class (and
    register) tokens."""
    if features.dim() == 4:
        nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
        return (features if nhwc else features.permute(0, 2, 3, 1)).flatten(1, 2)
    if features.dim() == 3:
        return features[:, int(getattr(model, "num_prefix_tokens", 0)):]
    raise BackboneError(f"{type(model).__name__}.forward_features gave a {features.dim()}-d tensor "
                        f"{tuple(features.shape)}: no token grid for a dense (per-token) method such as EsViT. "
                        "Use a ViT or Swin backbone (model.backbone).")

