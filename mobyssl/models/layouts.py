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
    teacher = state.get("teacher")
    if isinstance(teacher, dict) and isinstance(state.get("student"), dict):
        sd = strip_prefix(_without_module(teacher), "backbone.")
        if sd:
            what = "EsViT" if any(k.startswith("head_dense.") for k in _without_module(teacher)) else "DINO"
            return to_timm_backbone(sd), f"{what} checkpoint (its teacher's backbone)"
    model = state.get("model")
    if isinstance(model, dict):
        sd = strip_prefix(_without_module(model), "encoder.")
        if sd and any(k.startswith("encoder_k.") for k in _without_module(model)):
            return to_timm_backbone(sd), "MoBY (Transformer-SSL) checkpoint (its online encoder)"
    return None


def is_tensor_dict(state: dict) -> bool:
    return bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())
