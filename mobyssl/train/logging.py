"""Run outputs: metrics.jsonl, TensorBoard events and console progress."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: str | Path, tensorboard: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, kind: str, step: int, **values) -> None:
        record = {"type": kind, "step": step, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("type", "step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return float(f"{v:.7g}") if math.isfinite(v) else str(v)  # 7 significant digits, small lrs included
    return v


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """A tqdm bar on a terminal; plain log lines (every ``every`` steps) when output is redirected."""

    def __init__(self, total: int, initial: int, every: int, desc: str = "pretrain", enabled: bool = True):
        self.total, self.every, self.enabled = total, every, enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                        disable=not self.interactive)
        self.start_step, self.start_time = initial, time.time()

    def update(self, step: int, **fields) -> None:
        if not self.enabled:
            return
        text = {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in fields.items()}
        if self.interactive:
            self.bar.update(step - self.bar.n)
            if fields:
                self.bar.set_postfix(text, refresh=False)
        elif fields and (step % self.every == 0 or step == self.total):
            elapsed = time.time() - self.start_time
            done = max(step - self.start_step, 1)
            eta = elapsed / done * (self.total - step)
            body = "  ".join(f"{k} {v}" for k, v in text.items())
            print(f"[step {step}/{self.total}] {body}  eta {format_eta(eta)}", flush=True)

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.interactive:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        self.bar.close()
