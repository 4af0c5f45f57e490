"""Checkpoint files: atomic writes, clear errors, backbone extraction for evaluation and export."""

from __future__ import annotations

import os
import pickle
import struct

import zipfile
from pathlib import Path

import torch

LATEST = "checkpoint.pth"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not what was expected."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write to ``path.tmp``, flush to disk, then rename: a crash never leaves a half-written ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (runs write "
                              f"<output_dir>/{LATEST}).")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError, IndexError,
            KeyError, struct.error) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}. The file is "
                              "truncated or not a PyTorch checkpoint; use an earlier checkpoint.") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return state


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    p = Path(output_dir) / LATEST
    return p if p.is_file() else None


def backbone_state_dict(state: dict, source: str = "checkpoint") -> dict:
    """The online backbone's weights (timm key layout) from a pre-training checkpoint or an export."""
    if "method" in state:
        prefix = "encoder."
        sd = {k[len(prefix):]: v for k, v in state["method"].items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointError(f"{source} has method weights but no '{prefix}*' backbone keys")
        return sd
    if "backbone" in state:
        return state["backbone"]
    if state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return state  # a bare timm state dict
    raise CheckpointError(f"{source} is neither a mobyssl pre-training checkpoint nor a backbone state dict "
                          f"(top-level keys: {', '.join(list(state)[:8])})")


def load_backbone_weights(backbone: torch.nn.Module, sd: dict, source: str) -> None:
    missing, unexpected = backbone.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit backbone {type(backbone).__name__}: missing keys "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. Use the config the checkpoint "
            "was trained with (model.backbone, data.image_size, model.kwargs)."
        )


def numbered_name(epoch: int) -> str:
    return f"checkpoint_epoch{epoch:04d}.pth"


