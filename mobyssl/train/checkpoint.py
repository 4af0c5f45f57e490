"""Checkpoint files: crash-safe writes, rotation, resume that skips broken files, backbone extraction.

Layout in ``output_dir``: ``checkpoint_step00001234.pth`` files (the ``train.keep_last`` newest are
kept), ``checkpoint.pth`` pointing at the newest (a symlink, or a copy where links are unsupported),
optional permanent ``checkpoint_epoch0010.pth`` copies and, after a divergence, ``checkpoint_diagnostic.pth``.
Every file is written to ``*.tmp``, flushed to disk and renamed, so a crash or a full disk during a write
never replaces or damages an existing checkpoint.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import os
import pickle
import re
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import torch

from ..config import DEFAULT_METHOD
from ..errors import CheckpointError, MobysslError, RunDirError
from ..methods import get_method
from ..models.layouts import is_tensor_dict, published_backbone, to_timm_backbone
from .rundir import LOCK_NAME, check_output_file, is_checkpoint_name

LATEST = "checkpoint.pth"
DIAGNOSTIC = "checkpoint_diagnostic.pth"
_STEP_RE = re.compile(r"checkpoint_step(\d{8})\.pth")


class CheckpointWriteError(OSError, MobysslError):
    """A checkpoint or export that could not be written: full disk, quota, I/O error, failed rename.

    An ``OSError`` (``errno`` is ``ENOSPC`` when the disk is full), so the trainer's "report it and go on" catches
    it; a ``MobysslError``, so the command line prints it as one line. ``original`` is the exception that was
    raised (also chained as ``__cause__``); the message names the file.
    """

    def __init__(self, errno_: int, strerror: str, filename: str, detail: str = "",
                 original: BaseException | None = None):
        super().__init__(errno_, strerror, filename)
        self.detail = detail
        self.original = original

    def __str__(self) -> str:
        return (f"cannot write {self.filename}: {self.strerror}" + (f" ({self.detail})" if self.detail else "")
                + "; free disk space or choose another location")


# What torch's zip writer says when its output stream failed (it raises RuntimeError, not OSError).
_WRITE_FAILURE_RE = re.compile(r"PytorchStreamWriter failed|file write failed|unexpected pos|iostream error")
_DISK_FULL_BELOW = 1 << 20  # bytes free: a stream failure without an errno counts as a full disk below this


class _RecordingWriter:
    """The file handed to ``torch.save``: remembers the first ``OSError`` of a write, which torch's C++ writer
    turns into a ``RuntimeError`` (the evidence that a failure was the disk's and not the object's)."""

    def __init__(self, f):
        self._f = f
        self.error: OSError | None = None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        try:
            self._f.flush()
        except OSError as e:
            self.error = self.error or e
            raise


def _chained_oserror(e: BaseException) -> OSError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _write_error(e: BaseException, path: Path, written: OSError | None = None) -> CheckpointWriteError | None:
    """The ``CheckpointWriteError`` for a failure while writing ``path``; None where it was not a write failure."""
    if isinstance(e, CheckpointWriteError):
        return e
    cause = e if isinstance(e, OSError) else (written or _chained_oserror(e))
    if cause is None and not (isinstance(e, RuntimeError) and _WRITE_FAILURE_RE.search(str(e))):
        return None  # a bug (an unpicklable object, a tensor error): not the disk's fault
    free = None
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(path.parent).free
    if cause is not None and cause.errno:
        code, reason = cause.errno, cause.strerror or os.strerror(cause.errno)
    elif free is not None and free < _DISK_FULL_BELOW:
        code, reason = errno.ENOSPC, os.strerror(errno.ENOSPC)
    else:
        code, reason = errno.EIO, f"{os.strerror(errno.EIO)}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    detail = f"{_human(free)} free in {path.parent}" if code in (errno.ENOSPC, errno.EDQUOT) and free is not None else ""
    return CheckpointWriteError(code, reason, str(path), detail, original=e)


def _fsync_dir(d: Path) -> None:
    """Make a rename in ``d`` durable; filesystems that cannot fsync a folder are skipped."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write to ``path.tmp``, flush to disk, then rename: a crash never leaves a half-written ``path``.

    A failed write (full disk, quota, I/O error, even where ``torch.save`` reports it as a ``RuntimeError``)
    raises ``CheckpointWriteError`` (an ``OSError``; ``errno.ENOSPC`` for a full disk); the temporary file is
    always removed and ``path`` is untouched. Any other error (an unpicklable object) propagates unchanged.
    Where ``path`` is a symlink, the link itself is replaced by the new file; its target is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    recorder = None
    try:
        with open(tmp, "wb") as f:
            recorder = _RecordingWriter(f)
            torch.save(state, recorder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        wrapped = _write_error(e, path, recorder.error if recorder is not None else None) \
            if isinstance(e, Exception) else None
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if wrapped is None or wrapped is e:
            raise
        raise wrapped from e
    _fsync_dir(path.parent)


# Plain-data classes in the metadata of published checkpoints, read without running their code: DINO and EsViT
# save their argparse.Namespace, MoBY its yacs CfgNode (a dict subclass, read as an OrderedDict; yacs need not
# be installed).
PUBLISHED_METADATA = [argparse.Namespace, (collections.OrderedDict, "yacs.config.CfgNode")]


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        hint = f" such as {path / LATEST}" if (path / LATEST).exists() else f" (runs write <output_dir>/{LATEST})"
        raise CheckpointError(f"checkpoint {path} is a folder; give the checkpoint file{hint}.")
    if not path.is_file():
        why = "is a broken link" if path.is_symlink() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {why}; check the path (runs write <output_dir>/{LATEST}).")
    try:
        with torch.serialization.safe_globals(PUBLISHED_METADATA):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError, IndexError,
            KeyError, struct.error) as e:
        if "Weights only load failed" in str(e):  # torch's advice to load untrusted code is not ours to give
            raise CheckpointError(f"cannot read checkpoint {path}: it holds Python objects other than tensors, numbers "
                                  "and plain containers, which are not loaded (that could run code); it was not "
                                  "written by mobyssl or as a plain state dict. Use a mobyssl checkpoint or a "
                                  "state dict saved with torch.save(model.state_dict(), ...).") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
                              "The file is truncated or not a PyTorch checkpoint; use an earlier checkpoint.") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return state


def step_name(step: int) -> str:
    return f"checkpoint_step{step:08d}.pth"


def epoch_name(epoch: int) -> str:
    return f"checkpoint_epoch{epoch:04d}.pth"


def _step_of(path: Path) -> int | None:
    m = _STEP_RE.fullmatch(path.name)
    return int(m.group(1)) if m else None


def step_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Step checkpoints in ``output_dir``, newest first."""
    found = [(step, p) for p in Path(output_dir).glob("checkpoint_step*.pth") if (step := _step_of(p)) is not None]
    return [p for _, p in sorted(found, reverse=True)]


def _point_latest(out: Path, target: Path) -> None:
    """Atomically make ``checkpoint.pth`` refer to ``target`` (relative symlink, else a copy).

    On failure ``checkpoint.pth`` is left as it was (still the previous checkpoint), the temporary link or copy
    is removed and ``CheckpointWriteError`` is raised.
    """
    tmp = out / (LATEST + ".tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.symlink(target.name, tmp)
        except OSError:
            shutil.copyfile(target, tmp)
        os.replace(tmp, out / LATEST)
    except Exception as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        wrapped = _write_error(e, out / LATEST)
        if wrapped is None or wrapped is e:
            raise
        raise wrapped from e
    _fsync_dir(out)


def _latest_target(out: Path) -> Path | None:
    """The file ``checkpoint.pth`` points at (None where it is a copy, missing, or points outside ``out``)."""
    latest = out / LATEST
    if not latest.is_symlink():
        return None
    with contextlib.suppress(OSError):
        target = Path(os.readlink(latest))
        return out / target.name if target.parent in (Path(""), Path(".")) else None
    return None


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr)


def write_run_checkpoint(state: dict, output_dir: str | os.PathLike, step: int, keep_last: int,
                         keep_epoch: int | None = None, log=None) -> Path:
    """Save ``state`` as the newest checkpoint of a run, point ``checkpoint.pth`` at it, rotate old ones.

    A failed write raises ``CheckpointWriteError`` (an ``OSError``) and leaves ``checkpoint.pth`` pointing at the
    previous good file. Rotation never removes the file ``checkpoint.pth`` points at, so it cannot dangle; a
    permanent epoch copy or a rotation that fails is reported through ``log`` (default: stderr) and the new
    checkpoint stands.
    """
    log = log or _warn
    out = Path(output_dir)
    path = out / step_name(step)
    save_checkpoint(state, path)
    _point_latest(out, path)
    if keep_epoch is not None:
        permanent = out / epoch_name(keep_epoch)
        tmp = permanent.with_name(permanent.name + ".tmp")
        try:
            tmp.unlink(missing_ok=True)
            try:
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            os.replace(tmp, permanent)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            log(f"warning: could not write the permanent copy {permanent} ({e.strerror or e}); {path} is saved.")
    keep = _latest_target(out)
    # Only this step and older ones count: newer files (left behind when a run resumed from an earlier step,
    # e.g. past a truncated file) must not push this run's good checkpoints out of the keep_last slots.
    ours = [p for p in step_checkpoints(out) if _step_of(p) <= step]
    for old in ours[keep_last:]:
        if keep is not None and old.name == keep.name:
            continue
        try:
            old.unlink(missing_ok=True)
        except OSError as e:
            log(f"warning: could not remove the old checkpoint {old} ({e.strerror or e}); delete it by hand.")
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
    """The weights of the network a method evaluates and exports (``Method.backbone``: MoBY's online encoder,
    DINO's teacher), in timm's key layout, from a pre-training checkpoint; the fine-tuned backbone of a
    ``mobyssl finetune`` checkpoint (without its head); those of an export; or, converted, those of a published
    DINO, EsViT or MoBY checkpoint or a bare state dict (:mod:`mobyssl.models.layouts`)."""
    if "method" in state:
        config = state.get("config") if isinstance(state.get("config"), dict) else {}
        section = config.get("method") if isinstance(config.get("method"), dict) else {}
        prefix = get_method(section.get("name", DEFAULT_METHOD)).backbone_key + "."
        sd = {k[len(prefix):]: v for k, v in state["method"].items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointError(f"{source} has method weights but no '{prefix}*' backbone keys")
        return sd
    if "backbone" in state:
        return state["backbone"]
    if isinstance(state.get("finetune"), dict):  # a `mobyssl finetune` checkpoint: the fine-tuned backbone, no head
        sd = {k[len("model."):]: v for k, v in state["finetune"].items()
              if k.startswith("model.") and not k.startswith("model.head.")}
        if not sd:
            raise CheckpointError(f"{source} is a fine-tuning checkpoint without 'model.*' backbone keys")
        return sd
    published = published_backbone(state)
    if published is not None:
        return published[0]
    if is_tensor_dict(state):
        return to_timm_backbone(state)  # a bare state dict: timm's layout or the original Swin one
    raise CheckpointError(f"{source} is not a checkpoint layout mobyssl reads (top-level keys: "
                          f"{', '.join(map(str, list(state)[:8]))}). It reads mobyssl's pre-training, fine-tuning and "
                          "export files, DINO / EsViT checkpoints (student / teacher), MoBY (Transformer-SSL) "
                          "checkpoints (model with encoder.*), and bare backbone state dicts (timm's or the original "
                          "Swin layout).")


def check_finite(state_dict: dict, source) -> None:
    """Refuse weights holding NaN or Inf (a diverged run's ``checkpoint_diagnostic.pth``, a damaged file): training
    from them or evaluating them would only produce garbage."""
    bad = [k for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source} holds non-finite weights ({len(bad)} tensor(s) with NaN or Inf, e.g. {bad[0]}): "
                              f"it was written after a divergence or is damaged. Use an earlier checkpoint (runs keep "
                              f"checkpoint_step*.pth; checkpoint_diagnostic.pth is for inspection only).")


def load_backbone_weights(backbone: torch.nn.Module, sd: dict, source: str) -> None:
    """Load ``sd`` into ``backbone``; a mismatch is a CheckpointError counting missing, unexpected and
    wrongly shaped tensors (with an example of each) and naming the config keys that shape a backbone."""
    check_finite(sd, source)
    own = backbone.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if v]
        raise CheckpointError(
            f"{source} does not fit the backbone this config builds ({type(backbone).__name__}): tensors "
            + ", ".join(parts) + ". Use the config the checkpoint was trained with (model.backbone, "
            "data.image_size, model.kwargs).")
    backbone.load_state_dict(sd)


# ---------------------------------------------------------------- exports


def _is_training_checkpoint(path: Path) -> bool:
    """An existing file that loads as a mobyssl pre-training checkpoint (a dict with "method" and "optimizer")."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    for mmap in (True, False):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception:
            continue
        return isinstance(state, dict) and "method" in state and "optimizer" in state
    return False


def _is_run_dir(d: Path) -> bool:
    """A folder with a run's lock marker or checkpoints (runs from before the marker have only the latter)."""
    return (d / LOCK_NAME).exists() or (d / LATEST).exists() or bool(step_checkpoints(d))


def check_export_target(path: str | os.PathLike, source_checkpoint: str | os.PathLike | None = None,
                        overwrite: bool = False, what: str = "--output") -> Path:
    """Refuse (``RunDirError``) an export destination that would destroy a checkpoint or a file; writes nothing.

    Refused always: ``path`` (symlinks resolved) is ``source_checkpoint``; it is, or points at, a training
    checkpoint (named like a run's checkpoint files, or any file that loads with "method" and "optimizer");
    it is a ``checkpoint*.pth`` name inside a run directory (``.mobyssl.lock`` marker or checkpoints there);
    plus every refusal of ``check_output_file``. Refused unless ``overwrite``: any other existing file.
    Returns the path to write (absolute; a symlink there is replaced by the file, its target kept).
    """
    out = check_output_file(path, what, example="backbone.pth")
    real = out.resolve()
    fix = f"choose another {what} (nothing was overwritten)"
    if source_checkpoint is not None and real == Path(source_checkpoint).resolve():
        raise RunDirError(f"{what} {out} is the checkpoint being exported ({source_checkpoint}); {fix}.")
    for candidate in (out,) if real == out else (out, real):
        if candidate.exists() and (is_checkpoint_name(candidate.name) or _is_training_checkpoint(candidate)):
            raise RunDirError(f"{what} {out} is a training checkpoint"
                              + (f" (it points at {real})" if real != out else "")
                              + f"; writing the backbone there would lose it: {fix}.")
        if candidate.name.startswith("checkpoint") and candidate.suffix == ".pth" and _is_run_dir(candidate.parent):
            raise RunDirError(f"{what} {out} is a checkpoint name inside the run directory {candidate.parent}, where "
                              f"--resume would take it for a training checkpoint; {fix}, e.g. "
                              f"{candidate.parent / 'backbone.pth'}.")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise RunDirError(f"{what} {out} already exists; pass --overwrite to replace it, or choose another {what}.")
    return out


def save_export(state_dict: dict, path: str | os.PathLike, source_checkpoint: str | os.PathLike | None = None,
                overwrite: bool = False, what: str = "--output") -> Path:
    """Write an exported ``state_dict`` to ``path`` after ``check_export_target``, crash-safe (tmp + fsync +
    rename, ``save_checkpoint``): a training checkpoint is never written over, another existing file only with
    ``overwrite``. Returns the path written. ``CheckpointWriteError`` (one line) when the write fails."""
    out = check_export_target(path, source_checkpoint, overwrite, what)
    save_checkpoint(state_dict, out)
    return out
