"""Fixtures shared by the training tests."""

import pytest
import torch

from mobyssl.train.checkpoint import write_run_checkpoint
from mobyssl.train.rundir import LOCK_NAME


@pytest.fixture
def run(tmp_path):
    """A run directory with two step checkpoints and the lock marker; returns it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("{}")
    for step in (1, 2):
        write_run_checkpoint({"method": {"encoder.w": torch.ones(3) * step}, "optimizer": {}, "global_step": step},
                             out, step, keep_last=2)
    return out
