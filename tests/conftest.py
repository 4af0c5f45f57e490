import json
import os
from pathlib import Path

import pytest
import torch

from mobyssl.config import load_config
from mobyssl.train.checkpoint import write_run_checkpoint
from mobyssl.train.rundir import LOCK_NAME

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = [
    "data.num_workers=0",
    "model.backbone=vit_nano_patch4_32",
    "model.kwargs={depth: 2}",
    "method.proj_hidden_dim=64",
    "method.pred_hidden_dim=64",
    "method.proj_dim=32",
    "method.queue_size=128",
    "train.batch_size=32",
    "train.epochs=2",
    "train.warmup_epochs=1",
    "train.log_every=1",
    "knn.batch_size=128",
]


@pytest.fixture
def tiny_overrides():
    """The ``key=value`` overrides behind ``tiny_cfg``, for runs through the command line."""
    return list(TINY)


@pytest.fixture
def tiny_cfg(tmp_path):
    """A config that trains a 2-block ViT on the bundled sample in seconds."""

    def make(*overrides):
        return load_config("quickstart", TINY + [f"output_dir={tmp_path / 'run'}", *overrides])

    return make


@pytest.fixture
def float64():
    """float64 as the default dtype for the test, restored after it."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(default)


def pytest_collection_modifyitems(config, items):
    _fastest_first_under_mutmut(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _fastest_first_under_mutmut(items):
    """Under a mutation run, run a mutant's tests fastest first (mutmut's fork-server mode keeps them unordered), so a
    killed mutant costs its cheapest failing test rather than an end-to-end run."""
    stats = Path("mutmut-stats.json")  # mutmut runs pytest inside mutants/, where it keeps its statistics
    if not os.environ.get("MUTANT_UNDER_TEST") or not stats.is_file():
        return
    try:
        duration = json.loads(stats.read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    items.sort(key=lambda item: duration.get(item.nodeid, 0.0))


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
