"""Distributed misconfiguration fails on every rank before training, without hanging."""

import os
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from mobyssl.config import load_config
from mobyssl.train.trainer import pretrain


def _worker(rank, world, port, folder, overrides_per_rank):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    cfg = load_config("quickstart", overrides_per_rank[rank] + [f"output_dir={folder}/run"])
    try:
        pretrain(cfg)
        msg = "no error"
    except ValueError as e:
        msg = str(e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(os.path.join(folder, f"rank{rank}.txt"), "w") as f:
        f.write(msg)


BASE = ["data.num_workers=0", "model.kwargs={depth: 1}", "train.max_steps=1", "train.knn_every=-1",
        "method.proj_hidden_dim=32", "method.pred_hidden_dim=32"]


@pytest.mark.parametrize("case, per_rank, expected", [
    ("mismatched configs", [BASE + ["train.batch_size=32", "method.queue_size=128"],
                            BASE + ["train.batch_size=32", "method.queue_size=128", "train.lr=0.5"]],
     "differs from rank 0"),
    ("queue size", [BASE + ["train.batch_size=32", "method.queue_size=100"]] * 2, "method.queue_size=100"),
    ("per-rank batch of 1", [BASE + ["train.batch_size=2", "method.queue_size=128"]] * 2, "at least 2"),
])
def test_every_rank_reports_the_error(tmp_path, case, per_rank, expected):
    ctx = mp.spawn(_worker, args=(2, free_port(), str(tmp_path), per_rank), nprocs=2, join=False)
    deadline = time.time() + 180
    while not ctx.join(timeout=5):  # True once every rank has exited
        assert time.time() < deadline, f"{case}: ranks did not finish (hang)"
    for rank in range(2):
        assert expected in (tmp_path / f"rank{rank}.txt").read_text(), case
    assert not (tmp_path / "run" / "checkpoint.pth").exists()
