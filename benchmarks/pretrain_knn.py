"""Pre-train, then k-NN, against a random-init baseline: one table row for BENCHMARKS.md.

Runs a recipe end to end (default: the quickstart on the bundled sample), times it, and evaluates the
same backbone architecture untrained with the same k-NN protocol, so the row shows what pre-training adds.

    python benchmarks/pretrain_knn.py                                   # quickstart, bundled sample
    python benchmarks/pretrain_knn.py --config moby_swin_cifar10 data.train=.data/cifar10/train.zip \
        data.test=.data/cifar10/test.zip train.epochs=50                # CIFAR-10 on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time

import torch

from mobyssl.build import build_backbone
from mobyssl.config import load_config
from mobyssl.eval.runner import run_knn
from mobyssl.runtime import resolve_amp, resolve_device, seed_everything
from mobyssl.train.trainer import pretrain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="quickstart")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    out = tempfile.mkdtemp(prefix="mobyssl-bench-")
    cfg = load_config(args.config, [f"output_dir={out}", *args.overrides])
    device = resolve_device(cfg.train.device)

    seed_everything(cfg.train.seed)
    baseline = run_knn(cfg, build_backbone(cfg).to(device), device, resolve_amp(cfg.train.amp, device))

    t0 = time.time()
    trained = pretrain(cfg)
    wall = time.time() - t0

    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    print("\n| date | device | torch | config | overrides | wall time | k-NN top-1 k=20 (random init -> trained) | k=200 |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {datetime.date.today()} | {dev} | {torch.__version__} | {args.config} | {' '.join(args.overrides) or '-'} "
          f"| {wall / 60:.1f} min | {baseline['knn_top1_k20']:.1f} -> {trained['knn_top1_k20']:.1f} "
          f"| {baseline['knn_top1_k200']:.1f} -> {trained['knn_top1_k200']:.1f} |")
    print(json.dumps({"wall_s": wall, "baseline": baseline, "trained": trained}))


if __name__ == "__main__":
    main()
