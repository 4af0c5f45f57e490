"""Does a checkpoint fit a config? The differences between the config a checkpoint was made with and now.

``--resume`` and the evaluation commands compare the config stored in a checkpoint with the one given on
the command line. What a difference means comes from each field's declaration (``config.on_resume``):
safe (logging, evaluation, workers: accepted and listed), schedule or trajectory (the run would continue
differently: refused unless the user accepts it), architecture (the weights or buffers no longer fit:
always refused, naming the keys rather than tensor names).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..config import ARCHITECTURE, SAFE, SCHEDULE, TRAJECTORY, Config, on_resume, to_dict
from ..errors import CheckpointError

_MISSING = object()
_MEANING = {
    SCHEDULE: "the lr and momentum schedules are recomputed for the new length; the rest of the run follows them",
    TRAJECTORY: "the run continues differently from the one that was checkpointed",
    ARCHITECTURE: "the checkpoint's weights or buffers do not fit",
}


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any
    kind: str

    def __str__(self) -> str:
        old = "(not recorded)" if self.old is _MISSING else _show(self.old)
        return f"{self.key} {old} -> {_show(self.new)}"


def _show(v) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, cfg: Config) -> list[Change]:
    """Every key whose value in ``cfg`` differs from the checkpoint's config ``saved`` (a plain dict)."""
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    changes = []
    for key in sorted(new):
        before = old.get(key, _MISSING)
        if before is _MISSING or before != new[key]:
            if before is _MISSING and on_resume(key, cfg) == SAFE:
                continue  # a key newer than the checkpoint that changes nothing
            changes.append(Change(key, before, new[key], on_resume(key, cfg)))
    return changes


def check_resume_changes(changes: list[Change], checkpoint, accept: bool, log=print) -> None:
    """Refuse a resume whose config differs from the checkpoint's, except in safe keys or when accepted."""
    arch = [c for c in changes if c.kind == ARCHITECTURE]
    other = [c for c in changes if c.kind in (SCHEDULE, TRAJECTORY)]
    safe = [c for c in changes if c.kind == SAFE]
    if arch:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: {_MEANING[ARCHITECTURE]} the config given now: "
            + "; ".join(str(c) for c in arch)
            + ". Resume with the checkpoint's values (omit --config and these overrides: the checkpoint's config "
              "is used), or start a new run in another output_dir.")
    if other and not accept:
        lines = "; ".join(f"{c} ({c.kind}: {_MEANING[c.kind]})" for c in other)
        raise CheckpointError(
            f"the config given now differs from the one {checkpoint} was trained with: {lines}. Nothing was "
            "changed. Pass --accept-changes to continue with the new values, or resume with the run's own config "
            "(omit --config and these overrides). Keys that are safe to change on resume: logging, checkpointing, "
            "evaluation (data.test, knn.*, linear.*), data.num_workers, train.device, train.compile, "
            "train.max_steps; train.epochs changes the schedules.")
    for c in other:
        log(f"note: accepted change since the checkpoint: {c} ({_MEANING[c.kind]})")
    if safe:
        log("note: changed since the checkpoint (safe): " + "; ".join(str(c) for c in safe))


def check_backbone_fits(saved: dict | None, cfg: Config, source) -> None:
    """Before loading a checkpoint's backbone: the keys that shape it must match the config's."""
    if not saved:
        return
    keys = [c for c in config_changes(saved, cfg)
            if c.kind == ARCHITECTURE and (c.key.startswith("model.") or c.key == "data.image_size")]
    if keys:
        raise CheckpointError(
            f"{source} was trained with another backbone shape than the config gives: "
            + "; ".join(str(c) for c in keys)
            + ". Omit --config and these overrides (the checkpoint's own config is used), or set them back.")
