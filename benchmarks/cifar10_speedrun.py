"""MoBY pre-training under wall-clock budgets, then k-NN and a linear probe: accuracy per minute.

For each budget the script sizes the run (epochs) from a short throughput calibration so that the
whole cosine schedule fits the budget, pre-trains, and evaluates on the test split with k-NN
(k=20, T=0.07 and k=200, T=0.1) and a fast linear probe. One markdown row per budget.

    # on a GPU, CIFAR-10 copied into a git-ignored folder:
    python benchmarks/cifar10_speedrun.py --budgets 2 5 9 data.train=.data/cifar10/train.zip \\
        data.test=.data/cifar10/test.zip
    # smoke test on a CPU with the bundled sample:
    python benchmarks/cifar10_speedrun.py --budgets 0.3 --config quickstart train.device=cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import tempfile
import time

import torch

from mobyssl.build import build_backbone, build_train_dataset
from mobyssl.config import load_config
from mobyssl.eval.runner import run_knn, run_linear
from mobyssl.runtime import resolve_amp, resolve_device
from mobyssl.train.checkpoint import backbone_state_dict, load_checkpoint
from mobyssl.train.trainer import pretrain


def _quiet(*_a, **_k):
    pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="moby_swin_cifar10")
    p.add_argument("--budgets", type=float, nargs="+", default=[2, 5, 9], help="minutes of pre-training")
    p.add_argument("--calibration-steps", type=int, default=30)
    p.add_argument("--linear-epochs", type=int, default=100)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="mobyssl-speedrun-")

    def cfg_for(name, *extra):
        return load_config(args.config, ["train.knn_every=-1", "train.log_every=50", *args.overrides,
                                         f"output_dir={root}/{name}", *extra])

    base = cfg_for("calibration")
    n_images = len(build_train_dataset(base))
    t0 = time.time()
    pretrain(cfg_for("calibration", f"train.max_steps={args.calibration_steps}"), log=_quiet)
    # The calibration includes start-up (model build, worker start, compilation); count it against the budget.
    per_step = (time.time() - t0) / args.calibration_steps
    steps_per_epoch = n_images // base.train.batch_size
    device = resolve_device(base.train.device)
    amp = resolve_amp(base.train.amp, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print("| date | device | config | overrides | budget (min) | epochs | pre-training time | k-NN k=20 T=0.07 "
          "| k-NN k=200 T=0.1 | linear (fast) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for budget in args.budgets:
        epochs = max(1, math.floor(budget * 60 / per_step / steps_per_epoch))
        warmup = min(base.train.warmup_epochs, max(epochs // 10, 0))
        cfg = cfg_for(f"budget{budget:g}", f"train.epochs={epochs}", f"train.warmup_epochs={warmup}")
        t0 = time.time()
        pretrain(cfg, log=_quiet)
        wall = time.time() - t0
        backbone = build_backbone(cfg)
        backbone.load_state_dict(backbone_state_dict(load_checkpoint(f"{cfg.output_dir}/checkpoint.pth")))
        backbone.to(device)
        knn20 = run_knn(load_config(args.config, [*args.overrides, "knn.k=[20]", "knn.temperature=0.07"]),
                        backbone, device, amp)
        knn200 = run_knn(load_config(args.config, [*args.overrides, "knn.k=[200]", "knn.temperature=0.1"]),
                         backbone, device, amp)
        lin = run_linear(load_config(args.config, [*args.overrides, "linear.mode=fast",
                                                   f"linear.epochs={args.linear_epochs}"]),
                         backbone, device, amp, log=_quiet)
        print(f"| {datetime.date.today()} | {name} | {args.config} | {' '.join(args.overrides) or '-'} | {budget:g} "
              f"| {epochs} | {wall / 60:.1f} min | {knn20['knn_top1_k20']:.1f} | {knn200['knn_top1_k200']:.1f} "
              f"| {lin['linear_top1']:.1f} |", flush=True)
        print(json.dumps({"budget_min": budget, "epochs": epochs, "wall_s": wall, **knn20, **knn200, **lin}))


if __name__ == "__main__":
    main()
