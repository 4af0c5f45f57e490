"""Helpers shared by several test modules (importable because pytest puts tests/ on sys.path)."""

import contextlib
import json
import signal
import socket
from pathlib import Path

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics_records(run, kind: str = "train") -> list[dict]:
    """Records of one type from ``run/metrics.jsonl``; a line cut short by a killed process is ignored."""
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["type"] == kind:
            out.append(record)
    return out


@contextlib.contextmanager
def deadline(seconds: float = 3.0):
    """Fail (instead of hanging) where the code under test blocks or loops for longer than ``seconds``."""

    def on_alarm(signum, frame):
        pytest.fail(f"did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class KeyedRows(torch.utils.data.Dataset):
    """``(x, y, key)`` rows as ``SkipUnreadable`` yields them: a non-empty key marks an unreadable image."""

    def __init__(self, x, y, keys):
        self.x, self.y, self.keys = x, y, keys

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i], self.keys[i]


def record_step_lrs(opt, used: list):
    """Make ``opt.step()`` first append the lr of every param group to ``used``; returns ``opt``."""
    step = opt.step

    def recorded(*args, **kwargs):
        used.append([g["lr"] for g in opt.param_groups])
        return step(*args, **kwargs)

    opt.step = recorded
    return opt
