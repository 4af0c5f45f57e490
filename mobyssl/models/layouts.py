"""Key layouts of published self-supervised checkpoints, converted to timm's (the layout our backbones load).

Recognised files (the network the authors' own evaluation loads is the one taken):

- DINO ``main_dino.py`` and EsViT ``main_esvit.py`` checkpoints: ``{"student", "teacher", "optimizer", "epoch",
  "args", ...}``; the teacher's ``backbone.*`` keys (the student's carry DDP's ``module.`` in front). DINO's
  ViT keys are timm's; EsViT's Swin is the original Swin layout (below).
- MoBY (Transformer-SSL) checkpoints: ``{"model": {"encoder.*", "encoder_k.*", "projector.*", ...}, "config",
  ...}``; the online ``encoder.*`` (what MoBY's linear evaluation and its detection / segmentation code load).
- Bare backbone state dicts, in timm's layout (DINO's released ``*_pretrain.pth`` backbones) or in the original
  Swin layout (Microsoft's Swin, MoBY's and EsViT's code).

The original Swin layout puts each stage's patch merging at the end of that stage (``layers.0.downsample``
exists), timm at the start of the next (``layers.1.downsample``), and stores two buffers timm recomputes
(``relative_position_index``, ``attn_mask``).
"""

from __future__ import annotations

import functools
import re

import torch

OLD_SWIN_MARKER = "layers.0.downsample.reduction.weight"
_SWIN_BUFFERS = ("relative_position_index", "attn_mask")
# Classifier layers a published backbone may carry; our backbones are headless.
_HEAD_PREFIXES = ("head.", "fc_norm.")


def strip_prefix(sd: dict, prefix: str) -> dict:
    """The entries of ``sd`` under ``prefix``, without it."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _without_module(sd: dict) -> dict:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def is_original_swin(sd: dict) -> bool:
    return OLD_SWIN_MARKER in sd


def original_swin_to_timm(sd: dict) -> dict:
    """Original Swin keys -> timm's: patch merging moves to the next stage, recomputed buffers are dropped."""
    out = {}
    for k, v in sd.items():
        if k.endswith(_SWIN_BUFFERS):
            continue
        out[re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)] = v
    return out


def timm_to_original_swin(sd: dict) -> dict:
    """The inverse of :func:`original_swin_to_timm` (without the buffers, which the original code recomputes at
    construction): what the MoBY authors' detection and segmentation code loads."""
    return {re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
            for k, v in sd.items()}


def _headless(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith(_HEAD_PREFIXES)}


def to_timm_backbone(sd: dict) -> dict:
    """A backbone state dict in any recognised layout -> timm's, without a classifier head."""
    sd = _without_module(sd)
    if is_original_swin(sd):
        sd = original_swin_to_timm(sd)
    return _headless(sd)


def published_backbone(state: dict) -> tuple[dict, str] | None:
    """``(backbone state dict in timm's layout, what it is)`` for a DINO, EsViT or MoBY checkpoint as their
    authors' code writes it; None for anything else."""
    if isinstance(state.get("teacher"), dict) and isinstance(state.get("student"), dict):
        teacher = _without_module(state["teacher"])
        sd = strip_prefix(teacher, "backbone.")
        if sd:
            what = "EsViT" if any(k.startswith("head_dense.") for k in teacher) else "DINO"
            return to_timm_backbone(sd), f"{what} checkpoint (its teacher's backbone)"
    if isinstance(state.get("model"), dict):
        model = _without_module(state["model"])
        sd = strip_prefix(model, "encoder.")
        if sd and any(k.startswith("encoder_k.") for k in model):
            return to_timm_backbone(sd), "MoBY (Transformer-SSL) checkpoint (its online encoder)"
    return None


def is_tensor_dict(state: dict) -> bool:
    return bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


# --------------------------------------------------------------------------- exports to other code bases

class ExportError(ValueError):
    """A backbone that a format's target class cannot hold exactly."""


def _require(ok: bool, what: str, fmt: str) -> None:
    if not ok:
        raise ExportError(f"--format {fmt}: {what}; use --format timm (timm builds every mobyssl backbone)")


def _require_layernorm_swin(model, fmt: str, target: str) -> None:
    _require(all(isinstance(b.norm2, torch.nn.LayerNorm) for stage in model.layers for b in stage.blocks),
             f"the MoBY-1 BatchNorm Swin has layers {target} lacks", fmt)


def _timm_kind(model) -> str:
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, SwinTransformer):
        return "swin"
    return type(model).__name__


def _swin_shape(model) -> dict:
    first = model.layers[0].blocks[0]
    return {"patch_size": list(model.patch_embed.patch_size), "embed_dim": int(model.embed_dim),
            "depths": [len(stage.blocks) for stage in model.layers],
            "num_heads": [stage.blocks[0].attn.num_heads for stage in model.layers],
            "window_size": list(first.window_size),
            "mlp_ratio": first.mlp.fc1.out_features / first.mlp.fc1.in_features}


def _torchvision_vit(model, sd: dict) -> tuple[dict, str, str]:
    fmt = "torchvision"
    blocks = list(model.blocks)
    _require(model.cls_token is not None and model.num_prefix_tokens == 1 and not model.no_embed_class,
             "torchvision's VisionTransformer needs exactly one class token and position embeddings on it", fmt)
    _require(model.global_pool == "token", "torchvision's VisionTransformer pools the class token", fmt)
    _require(isinstance(model.norm_pre, torch.nn.Identity) and isinstance(model.fc_norm, torch.nn.Identity),
             "torchvision's VisionTransformer has no pre-norm or pooled-feature norm", fmt)
    _require(all(b.attn.qkv.bias is not None and isinstance(b.ls1, torch.nn.Identity)
                 and isinstance(b.attn.q_norm, torch.nn.Identity) for b in blocks),
             "torchvision's blocks have qkv biases and no layer scale or q/k norm", fmt)
    _require(all(abs(n.eps - 1e-6) < 1e-12 for n in [model.norm] + [b.norm1 for b in blocks]),
             "torchvision's VisionTransformer uses LayerNorm eps 1e-6", fmt)
    patch = model.patch_embed.patch_size
    size = model.patch_embed.img_size
    _require(patch[0] == patch[1] and size[0] == size[1], "torchvision's VisionTransformer takes square images and "
             "patches", fmt)
    out = {"class_token": sd["cls_token"], "conv_proj.weight": sd["patch_embed.proj.weight"],
           "conv_proj.bias": sd["patch_embed.proj.bias"], "encoder.pos_embedding": sd["pos_embed"],
           "encoder.ln.weight": sd["norm.weight"], "encoder.ln.bias": sd["norm.bias"]}
    names = {"norm1": "ln_1", "attn.qkv.weight": "self_attention.in_proj_weight",
             "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj": "self_attention.out_proj",
             "norm2": "ln_2", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}
    for i in range(len(blocks)):
        for key, value in strip_prefix(sd, f"blocks.{i}.").items():
            for ours, theirs in names.items():
                if key.startswith(ours):
                    out[f"encoder.layers.encoder_layer_{i}.{theirs}{key[len(ours):]}"] = value
                    break
            else:
                raise ExportError(f"--format torchvision: block key blocks.{i}.{key} has no torchvision counterpart")
    first = blocks[0]
    code = (f"torchvision.models.VisionTransformer(image_size={size[0]}, patch_size={patch[0]}, "
            f"num_layers={len(blocks)}, num_heads={first.attn.num_heads}, hidden_dim={model.embed_dim}, "
            f"mlp_dim={first.mlp.fc1.out_features})")
    return out, code, "model.heads = torch.nn.Identity()  # the class token after the final norm"


def _torchvision_swin(model, sd: dict) -> tuple[dict, str, str]:
    import torchvision

    fmt = "torchvision"
    shape = _swin_shape(model)
    window = shape["window_size"]
    for stage, layer in enumerate(model.layers):
        res = layer.blocks[0].input_resolution
        _require(all(r % w == 0 and r >= w for r, w in zip(res, window)) and
                 all(tuple(b.window_size) == tuple(window) for b in layer.blocks),
                 f"stage {stage}'s {res[0]}x{res[1]} token map is not a multiple of the {window[0]}x{window[1]} "
                 "window (torchvision pads such maps where timm shrinks the window)", fmt)
    _require_layernorm_swin(model, fmt, "torchvision's Swin")
    eps = model.norm.eps
    norm = "" if abs(eps - 1e-5) < 1e-12 else f", norm_layer=functools.partial(torch.nn.LayerNorm, eps={eps!r})"
    code = (f"torchvision.models.SwinTransformer(patch_size={shape['patch_size']}, embed_dim={shape['embed_dim']}, "
            f"depths={shape['depths']}, num_heads={shape['num_heads']}, window_size={window}, "
            f"mlp_ratio={shape['mlp_ratio']!r}{norm})")
    out = {"features.0.0.weight": sd["patch_embed.proj.weight"], "features.0.0.bias": sd["patch_embed.proj.bias"],
           "features.0.2.weight": sd["patch_embed.norm.weight"], "features.0.2.bias": sd["patch_embed.norm.bias"],
           "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"]}
    mlp = {"mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}
    for key, value in sd.items():
        m = re.match(r"layers\.(\d+)\.(blocks\.(\d+)|downsample)\.(.*)", key)
        if m is None:
            continue
        stage, rest = int(m.group(1)), m.group(4)
        if m.group(3) is not None:
            for ours, theirs in mlp.items():
                rest = theirs + rest[len(ours):] if rest.startswith(ours) else rest
            out[f"features.{2 * stage + 1}.{m.group(3)}.{rest}"] = value
        else:
            out[f"features.{2 * stage}.{rest}"] = value
    # torchvision saves each block's relative position index: take it from the class itself.
    reference = eval(code, {"torchvision": torchvision, "torch": torch, "functools": functools})
    for key, value in reference.state_dict().items():
        if key.endswith("relative_position_index"):
            out[key] = value
    return out, code, "model.head = torch.nn.Identity()  # the average of the final-norm tokens"


def to_torchvision(model, sd: dict) -> tuple[dict, str, str]:
    """``(state dict, constructor call, line after it)`` for torchvision's class of the same architecture:
    ``VisionTransformer`` for a timm ViT with a class token, ``SwinTransformer`` for a timm Swin whose token maps
    the window tiles. Raises :class:`ExportError` for what torchvision cannot hold exactly."""
    kind = _timm_kind(model)
    if kind == "vit":
        return _torchvision_vit(model, sd)
    if kind == "swin":
        return _torchvision_swin(model, sd)
    raise ExportError(f"--format torchvision: torchvision has no class for a {kind} backbone; use --format timm")


def to_original(model, sd: dict) -> dict:
    """The authors' layout, as their released files store it (``{"model": state dict}``): the original Swin
    layout with its saved buffers (MoBY's and EsViT's Swin, which the MoBY authors' detection and segmentation
    code loads), or DeiT's, which is timm's (MoBY's DeiT-S, DINO's ViTs)."""
    if _timm_kind(model) == "swin":
        buffers = {k: v.clone() for k, v in model.named_buffers() if k.endswith(_SWIN_BUFFERS) and v is not None}
        return {"model": timm_to_original_swin({**sd, **buffers})}
    return {"model": dict(sd)}


def _unfold_order(channels_last: torch.Tensor) -> torch.Tensor:
    """Reorder the last dimension of a patch-merging weight from the original Swin's concatenation of the four
    2x2 neighbours (x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2], each C channels) to the order
    ``nn.Unfold(2, stride=2)`` produces in OpenMMLab's PatchMerging (channel-major, then row, then column)."""
    lead, width = channels_last.shape[:-1], channels_last.shape[-1]
    # unfold position p = 2 * row + col holds the neighbour the original concatenates at [0, 2, 1, 3][p]
    blocks = channels_last.reshape(*lead, 4, width // 4)[..., [0, 2, 1, 3], :]
    return blocks.transpose(-1, -2).reshape(*lead, width)


def to_openmmlab(model, sd: dict) -> dict:
    """OpenMMLab's layouts in a ``{"state_dict": ...}`` file: mmdet 3 / mmseg 1 ``SwinTransformer`` (keys under
    ``backbone.``, as both strip it; patch merging reordered for their ``nn.Unfold``; the final norm as the last
    stage's output norm) or mmseg 1 ``VisionTransformer`` (its ``layers.*.ln1`` / ``attn.attn.in_proj_*`` keys, no
    prefix: mmseg's ViT loads keys as they are)."""
    kind = _timm_kind(model)
    out = {}
    if kind == "swin":
        _require_layernorm_swin(model, "openmmlab", "OpenMMLab's Swin")
        last = len(model.layers) - 1
        block = {".attn.": ".attn.w_msa.", ".mlp.fc1.": ".ffn.layers.0.0.", ".mlp.fc2.": ".ffn.layers.1."}
        for key, value in timm_to_original_swin(sd).items():
            if key.startswith("layers."):
                key = "stages." + key[len("layers."):]
                if ".downsample." in key:
                    value = _unfold_order(value)
                for ours, theirs in block.items():
                    key = key.replace(ours, theirs)
            elif key.startswith("patch_embed.proj."):
                key = "patch_embed.projection." + key[len("patch_embed.proj."):]
            elif key.startswith("norm."):
                key = f"norm{last}." + key[len("norm."):]
            out["backbone." + key] = value
        return {"state_dict": out}
    if kind == "vit":
        _require(model.cls_token is not None and model.num_prefix_tokens == 1 and not model.no_embed_class,
                 "mmseg's VisionTransformer needs exactly one class token and position embeddings on it", "openmmlab")
        names = {"norm1.": "ln1.", "norm2.": "ln2.", "mlp.fc1.": "ffn.layers.0.0.", "mlp.fc2.": "ffn.layers.1.",
                 "attn.qkv.": "attn.attn.in_proj_", "attn.proj.": "attn.attn.out_proj."}
        for key, value in sd.items():
            if key.startswith("blocks."):
                index, rest = key[len("blocks."):].split(".", 1)
                for ours, theirs in names.items():
                    if rest.startswith(ours):
                        rest = theirs + rest[len(ours):]
                        break
                key = f"layers.{index}.{rest}"
            elif key.startswith("norm."):
                key = "ln1." + key[len("norm."):]
            elif key.startswith("patch_embed.proj."):
                key = "patch_embed.projection." + key[len("patch_embed.proj."):]
            out[key] = value
        return {"state_dict": out}
    raise ExportError(f"--format openmmlab: OpenMMLab's Swin and ViT classes cannot hold a {kind} backbone; use "
                      "--format timm")
