"""Checkpoint files: crash-safe writes, rotation, resume that skips broken files, backbone extraction.

Layout in ``output_dir``: ``checkpoint_step00001234.pth`` files (the ``train.keep_last`` newest are
kept), ``checkpoint.pth`` pointing at the newest (a symlink, or a copy where links are unsupported),
optional permanent ``checkpoint_epoch0010.pth`` copies and, after a divergence, ``checkpoint_diagnostic.pth``.
Every file is written to ``*.tmp``, flushed to disk and renamed, so a crash or a full disk during a write
never replaces or damages an existing checkpoint.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import struct
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError

LATEST = "checkpoint.pth"
DIAGNOSTIC = "checkpoint_diagnostic.pth"
_STEP_RE = re.compile(r"checkpoint_step(\d{8})\.pth")


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write to ``path.tmp``, flush to disk, then rename: a crash never leaves a half-written ``path``.

    On failure (e.g. a full disk) the temporary file is removed and the error re-raised; ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (runs write "
                              f"<output_dir>/{LATEST}).")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError, IndexError,
            KeyError, struct.error) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
                              "The file is truncated or not a PyTorch checkpoint; use an earlier checkpoint.") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return state


def step_name(step: int) -> str:
    return f"checkpoint_step{step:08d}.pth"


def epoch_name(epoch: int) -> str:
    return f"checkpoint_epoch{epoch:04d}.pth"


def step_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Step checkpoints in ``output_dir``, newest first."""
    out = Path(output_dir)
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint_step*.pth") if (m := _STEP_RE.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _point_latest(out: Path, target: Path) -> None:
    """Atomically make ``checkpoint.pth`` refer to ``target`` (relative symlink, else a copy)."""
    tmp = out / (LATEST + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(target.name, tmp)
    except OSError:
        shutil.copyfile(target, tmp)
    os.replace(tmp, out / LATEST)


def write_run_checkpoint(state: dict, output_dir: str | os.PathLike, step: int, keep_last: int,
                         keep_epoch: int | None = None) -> Path:
    """Save ``state`` as the newest checkpoint of a run, point ``checkpoint.pth`` at it, rotate old ones."""
    out = Path(output_dir)
    path = out / step_name(step)
    save_checkpoint(state, path)
    _point_latest(out, path)
    if keep_epoch is not None:
        permanent = out / epoch_name(keep_epoch)
        permanent.unlink(missing_ok=True)
        try:
            os.link(path, permanent)
        except OSError:
            shutil.copyfile(path, permanent)
    for old in step_checkpoints(out)[keep_last:]:
        old.unlink(missing_ok=True)
    return path


def find_resumable(output_dir: str | os.PathLike, log=print) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``output_dir`` that loads; broken ones are reported by name and skipped."""
    out = Path(output_dir)
    candidates = step_checkpoints(out)
    latest = out / LATEST
    if latest.is_file() and not latest.is_symlink():
        candidates.insert(0, latest)  # a copy (filesystems without symlinks) or an older layout
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            log(f"warning: skipping checkpoint {path}: {e}")
    return None


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
