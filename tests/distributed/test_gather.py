"""Gathering uneven per-rank tensors drops the padding; the distributed evaluation path on shards of
different sizes (a dataset size not divisible by the number of processes, a rank with nothing) gives
what one process gives. 2 real processes on gloo."""

import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from torch import nn
from torch.utils.data import Dataset

from mobyssl import distributed as D
from mobyssl.data import DataError

WORLD = 2
CASES = {"3-2": (3, 2), "2-3": (2, 3), "0-2": (0, 2), "3-0": (3, 0), "1-1": (1, 1)}
SPLITS = {"bank": 11, "test": 7, "tiny": 1}  # odd sizes; 1 leaves rank 1 without images
UNREADABLE = {"bank": (4, 7), "test": (), "tiny": ()}  # one on each rank: both must be counted and left out


def _rows(rank: int, n: int, dtype=torch.float32) -> torch.Tensor:
    """Rows no padding can look like: (rank*100 + i + 1, -(rank*100 + i + 1), 0.5)."""
    ids = torch.arange(n, dtype=torch.float64) + rank * 100 + 1
    return torch.stack([ids, -ids, torch.full_like(ids, 0.5)], dim=1).to(dtype)


class Images(Dataset):
    """``n`` deterministic 3x8x8 images with labels 1, 2, 0, 1, ... of 3 classes; ``UNREADABLE[name]`` fail."""

    classes = ["a", "b", "c"]

    def __init__(self, n: int, seed: int, name: str):
        self.images = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        self.labels = [(i + 1) % 3 for i in range(n)]
        self.keys = [f"{i}.png" for i in range(n)]
        self.source = self.key = name

    def __len__(self):
        return len(self.labels)

    @staticmethod
    def transform(image):  # what turns SkipUnreadable's placeholder image into one of this set's shape
        return torch.zeros(3, 8, 8)

    def __getitem__(self, i):
        if i in UNREADABLE[self.key]:
            raise DataError(f"cannot read image {self.keys[i]!r}")
        return self.images[i], self.labels[i]


def _backbone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6))
    net.num_features = 6
    return net


def _cfg():
    from mobyssl.config import load_config

    return load_config("quickstart", ["data.num_workers=0", "knn.batch_size=2", "knn.k=[1,3,20]",
                                        "data.max_bad_fraction=0.5"])


def _evaluate():
    from mobyssl.eval.runner import _features, run_knn

    cfg, backbone = _cfg(), _backbone()
    splits = {name: Images(n, seed, name) for seed, (name, n) in enumerate(SPLITS.items())}
    out = {"knn": run_knn(cfg, backbone, torch.device("cpu"), datasets=(splits["bank"], splits["test"])),
           "knn_tiny": run_knn(cfg, backbone, torch.device("cpu"), datasets=(splits["bank"], splits["tiny"]))}
    out["skipped"] = {}
    for name, ds in splits.items():
        (feats, labels), = _features(cfg, backbone, torch.device("cpu"), None, (ds,), out["skipped"])
        out[name] = (feats, labels)
    return out


def _worker(rank, world, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {name: D.gather_variable(_rows(rank, sizes[rank])) for name, sizes in CASES.items()}
        out["labels"] = D.gather_variable(torch.arange(CASES["3-2"][rank]) + 10 * rank)  # 1-D int64
        out["eval"] = _evaluate()
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gather_variable_and_sharded_evaluation(tmp_path):
    single = _evaluate()  # one process, no process group (and everything imported before forking)
    # Forked, not spawned: the children start with the modules already imported (seconds saved).
    ctx = mp.start_processes(_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="fork")
    deadline = time.time() + 120
    while not ctx.join(timeout=1):  # True once every rank has exited (raises if one failed)
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("the ranks did not finish (hang)")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    for name, sizes in CASES.items():
        expected = torch.cat([_rows(r, n) for r, n in enumerate(sizes)])
        for rank, got in enumerate(results):  # every rank gets every row once, in rank order, no padding
            assert got[name].shape == (sum(sizes), 3), (name, rank, got[name])
            assert torch.equal(got[name], expected), (name, rank)
    for got in results:
        assert torch.equal(got["labels"], torch.tensor([0, 1, 2, 10, 11]))

    for name, n in SPLITS.items():
        # Rank r embeds images r, r + 2, ...; gathered back into the dataset's order: each readable image once, with
        # its label, row for row where one process has it (the shards interleave, so rank order would not).
        readable = [i for i in range(n) if i not in UNREADABLE[name]]
        feats_1, labels_1 = single[name]
        assert feats_1.shape == (len(readable), 6)
        for got in results:
            feats, labels = got["eval"][name]
            assert feats.shape == (len(readable), 6) and labels.shape == (len(readable),), name
            assert torch.equal(labels, labels_1), name
            assert torch.allclose(feats, feats_1, atol=1e-6, rtol=0), name
    for key in ("knn", "knn_tiny"):
        assert results[0]["eval"][key] == single[key], key
    for got in [single] + [r["eval"] for r in results]:  # each rank counts the other's unreadable image too
        assert got["skipped"] == {"bank": 2, "test": 0, "tiny": 0}
