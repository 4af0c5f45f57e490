"""Pre-train, then k-NN, against a random-init baseline: one table row for BENCHMARKS.md.

Runs a recipe end to end (default: the quickstart on the bundled sample), times it, and evaluates the
same backbone architecture untrained with the same k-NN protocol, so the row shows what pre-training adds.

    python benchmarks/pretrain_knn.py                                   # quickstart, bundled sample
    python benchmarks/pretrain_knn.py --config moby_swin_cifar10 data.train=.data/cifar10/train.zip \
        data.test=.data/cifar10/test.zip train.epochs=50                # CIFAR-10 on a GPU
    python benchmarks/pretrain_knn.py --config dino_quickstart --extra-test ../shared/data/cifar10/test.zip

The bundled test sample has 500 images, so one k-NN figure on it carries a binomial standard error of about
2 points: two runs that differ by 3 points may not differ at all. ``--extra-test`` also scores both backbones,
with the same k-NN bank (data.eval_train), on a larger labelled test set (e.g. CIFAR-10's 10,000 test images:
standard error about 0.45 points), and reports the 95% interval of each figure.
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
from mobyssl.train.checkpoint import backbone_state_dict, load_backbone_weights, load_checkpoint
from mobyssl.train.trainer import pretrain


def interval95(top1_percent: float, n: int) -> float:
    """Half-width (points) of the normal-approximation 95% interval of an accuracy measured on n images."""
    p = top1_percent / 100
    return 196 * (p * (1 - p) / n) ** 0.5


def count_test_images(cfg) -> int:
    from mobyssl.build import build_eval_datasets

    return len(build_eval_datasets(cfg)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="quickstart")
    p.add_argument("--extra-test", metavar="PATH", help="also score both backbones on this labelled test set")
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
    n_test = count_test_images(cfg)
    extra = None
    if args.extra_test:
        big = load_config(args.config, [f"output_dir={out}", *args.overrides, f"data.test={args.extra_test}"])
        seed_everything(cfg.train.seed)
        random_net = build_backbone(big).to(device)
        trained_net = build_backbone(big).to(device)
        path = os.path.join(cfg.output_dir, "checkpoint.pth")  # an output_dir override wins over the temporary one
        load_backbone_weights(trained_net, backbone_state_dict(load_checkpoint(path), path), path)
        amp = resolve_amp(cfg.train.amp, device)
        extra = {"path": args.extra_test, "images": count_test_images(big),
                 "baseline": run_knn(big, random_net, device, amp), "trained": run_knn(big, trained_net, device, amp)}

    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    print("\n| date | device | torch | config | overrides | wall time | k-NN top-1 k=20 (random init -> trained) | k=200 |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {datetime.date.today()} | {dev} | {torch.__version__} | {args.config} | {' '.join(args.overrides) or '-'} "
          f"| {wall / 60:.1f} min | {baseline['knn_top1_k20']:.1f} -> {trained['knn_top1_k20']:.1f} "
          f"| {baseline['knn_top1_k200']:.1f} -> {trained['knn_top1_k200']:.1f} |")
    ci = interval95(trained["knn_top1_k20"], n_test)
    print(f"k=20 on the {n_test} test images: {baseline['knn_top1_k20']:.1f} -> {trained['knn_top1_k20']:.1f} "
          f"(each +-{ci:.1f} at 95%)")
    if extra is not None:
        b, r = extra["baseline"]["knn_top1_k20"], extra["trained"]["knn_top1_k20"]
        print(f"k=20 on the {extra['images']} images of {extra['path']}: {b:.2f} -> {r:.2f} "
              f"(each +-{interval95(r, extra['images']):.2f} at 95%; gain {r - b:+.2f})")
    print(json.dumps({"wall_s": wall, "test_images": n_test, "baseline": baseline, "trained": trained,
                      "extra_test": extra}))


if __name__ == "__main__":
    main()
