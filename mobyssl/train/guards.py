"""Run guards: stop signals, non-finite steps, unreadable images, representation collapse."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

from ..data import DataError


class NonFiniteGuard:
    """Counts steps whose loss or gradient was not finite; asks to stop after ``max_consecutive`` in a row.

    ``record`` keeps the counts on the device (no host synchronisation per step); ``check`` reads them
    where the trainer synchronises anyway (log and checkpoint steps), warns about skipped steps and says
    whether to go on.
    """

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self._streak = None  # device tensors
        self._total = None
        self.consecutive = 0  # host copies, as of the last check
        self.total = 0

    def record(self, ok: torch.Tensor) -> None:
        bad = (~ok.detach().bool()).to(torch.int64)
        if self._streak is None:
            self._streak, self._total = torch.zeros_like(bad), torch.zeros_like(bad)
        self._streak = (self._streak + 1) * bad
        self._total = self._total + bad

    def check(self, step: int, warn) -> bool:
        """Read the counts after step ``step``; False means stop the run."""
        if self._streak is None:
            return True
        streak, total = int(self._streak), int(self._total)
        new = total - self.total
        self.consecutive, self.total = streak, total
        if new:
            warn(f"warning: step {step}: {new} step(s) with a non-finite loss or gradient skipped since the last "
                 f"check ({streak} in a row now, limit train.max_bad_steps={self.max_consecutive})")
        return streak < self.max_consecutive

    def message(self, diagnostic: Path | None) -> str:
        where = f"The model state is in {diagnostic}" if diagnostic else "The diagnostic checkpoint could not be written"
        return (f"training diverged: {self.consecutive} steps in a row had a NaN/Inf loss or gradient. {where}; the "
                "last good checkpoint is untouched. Lower train.lr, raise train.warmup_epochs, or try train.amp=off, "
                "then resume.")


class BadDataMonitor:
    """Counts unreadable training images (already skipped by the dataset) and stops past a failure rate.

    ``update`` takes each batch's ``failed`` element: newline-joined file names per entry, as the CPU
    DataLoader and the gpu_decode loader yield them. A ``failed`` element with a ``dataset_total``
    attribute (``UnreadableAtStart``, from the gpu_resident loader) lists files found in one pass over the
    whole dataset of that many images: they are counted with ``preload``, so the rate is judged over the
    dataset, not over the first batch.
    """

    def __init__(self, max_fraction: float, source: str, min_images: int = 200):
        self.max_fraction = max_fraction
        self.min_images = min_images  # judge the rate only once this many images were drawn
        self.source = source
        self.failed = 0
        self.seen = 0
        self.files: list[str] = []

    def update(self, batch_size: int, failed: list[str], warn) -> None:
        names = [n for entry in failed if entry for n in entry.split("\n")]
        total = getattr(failed, "dataset_total", None)
        if total is not None:
            self.preload(names, total)
            self.seen += batch_size
            return
        self.seen += batch_size + len(names)
        self.failed += len(names)
        self.files.extend(names)
        self._check()

    def preload(self, names: list[str], total: int) -> None:
        """Count ``names``, the unreadable files among ``total`` images all read up front; raises past the rate."""
        self.seen += total
        self.failed += len(names)
        self.files.extend(names)
        self._check()

    def _check(self) -> None:
        if not self.failed:
            return
        rate = self.failed / self.seen
        if self.seen >= self.min_images and rate > self.max_fraction:
            listed = ", ".join(self.files[:10]) + (" ..." if len(self.files) > 10 else "")
            raise DataError(
                f"data.train={self.source}: {self.failed} of {self.seen} images drawn so far could not be read "
                f"({100 * rate:.1f}% > data.max_bad_fraction={self.max_fraction}): {listed}. Fix or remove "
                "these files, or raise data.max_bad_fraction.")


class CollapseMonitor:
    """Warns, at most every ``every``-th time, when the method sees collapse in the logged statistics
    (``Method.collapse_signs``: MoBY's feature spread and queue similarity, DINO's KL and teacher entropy)."""

    def __init__(self, every: int = 10):
        self.every = every
        self._checks = 0

    def check(self, signs: str | None, step: int, warn) -> bool:
        if signs is None:
            return False
        if self._checks % self.every == 0:
            warn(f"warning: step {step}: the representation may be collapsing ({signs}). Check the lr, the "
                 "momentum and the augmentations.")
        self._checks += 1
        return True


class TrainingInterrupted(Exception):
    """The run stopped on SIGTERM/SIGINT after saving a checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, checkpoint_step: int | None):
        self.signum, self.step = signum, step
        if checkpoint is not None and checkpoint_step == step:
            saved = f"the checkpoint {checkpoint} holds this step"
        elif checkpoint is not None:
            saved = f"this step could not be saved; the newest checkpoint is {checkpoint} (step {checkpoint_step})"
        else:
            saved = "no checkpoint of this run could be saved"
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; {saved}. Continue with the same "
                         "command plus --resume.")


class StopSignals:
    """Turns SIGTERM (pre-emption, SLURM) and SIGINT (Ctrl-C) into a request to stop after the current step.

    A second signal of the same kind stops at once. Handlers are installed only in the main thread and
    restored on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: stop now
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False
