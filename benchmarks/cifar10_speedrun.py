"""MoBY (or any method) pre-training under a wall-clock budget, then k-NN and a linear probe.

A short calibration run measures the step time (from the step timestamps in ``metrics.jsonl``, so that
compilation is not spread over the steps) and the start-up time (model build, data decode, compilation).
Each budget then gets one run whose cosine schedule is sized to fit: ``epochs = (budget - start-up) /
(step time x steps per epoch)``. During the run k-NN (``knn.k``, ``knn.temperature`` of the config; the
speedrun's protocol is k=20, T=0.07) is measured every ``--curve-every`` minutes of training, which gives
the accuracy-against-time curve; its times exclude the evaluations themselves. After the run: k-NN at
k=20 / T=0.07 and k=200 / T=0.1, and a fast linear probe. The pre-training time reported is the whole
``pretrain`` call (start-up and compilation included) minus the time spent in the curve's evaluations.

    # with the epochs an earlier calibration gave (no calibration run):
    python benchmarks/cifar10_speedrun.py --budgets 8 --epochs 160 ...
    # on a GPU, CIFAR-10 copied into a git-ignored folder:
    python benchmarks/cifar10_speedrun.py --budgets 10 --config moby_vit_small_cifar10 \\
        data.train=.data/cifar10/train.zip data.test=.data/cifar10/test.zip data.pipeline=gpu_resident \\
        train.compile=true
    # smoke test on a CPU with the bundled sample:
    python benchmarks/cifar10_speedrun.py --budgets 0.5 --config quickstart --calibration-steps 12 \\
        --curve-every 0.2 train.device=cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from mobyssl.build import build_backbone, build_train_dataset
from mobyssl.config import load_config
from mobyssl.eval.runner import run_knn, run_linear
from mobyssl.runtime import resolve_amp, resolve_device
from mobyssl.train.checkpoint import backbone_state_dict, load_checkpoint
from mobyssl.train.trainer import pretrain


def _quiet(*_a, **_k):
    pass


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_time(records: list[dict], skip: int) -> float:
    """Seconds per step from the timestamps of logged train steps after the first ``skip`` steps."""
    train = [r for r in records if r["type"] == "train" and r["step"] > skip]
    if len(train) < 2:
        raise SystemExit(f"calibration logged {len(train)} train steps after step {skip}: raise "
                         "--calibration-steps or lower train.log_every")
    return (train[-1]["time"] - train[0]["time"]) / (train[-1]["step"] - train[0]["step"])


def curve(records: list[dict], start: float) -> list[tuple[float, float, dict]]:
    """(training minutes, epoch, k-NN results) per in-run evaluation, and the seconds spent evaluating.

    The run logs the last step of every epoch, so an evaluation lasts from that step's record to its own;
    a point's time is its step's record less the earlier evaluations."""
    points, spent, last_train = [], 0.0, None
    for r in records:
        if r["type"] == "train":
            last_train = r
        elif r["type"] == "knn" and last_train is not None:
            points.append(((last_train["time"] - start - spent) / 60, r.get("epoch", 0), r))
            spent += r["time"] - last_train["time"]
    return points, spent


def top1(knn_record: dict) -> float:
    """The first k's top-1 of a k-NN record."""
    return next(v for k, v in knn_record.items() if k.startswith("knn_top1"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="moby_vit_small_cifar10")
    p.add_argument("--budgets", type=float, nargs="+", default=[10], help="minutes of pre-training, start-up "
                   "included")
    p.add_argument("--calibration-steps", type=int, default=60)
    p.add_argument("--epochs", type=int, nargs="+", help="epochs per budget, from an earlier calibration on the same "
                   "device: skips the calibration run (its compilation alone can take a minute)")
    p.add_argument("--curve-every", type=float, default=1.0, help="minutes of training between k-NN evaluations")
    p.add_argument("--linear-epochs", type=int, default=100)
    p.add_argument("--keep", default="", help="folder that receives each run's metrics.jsonl and config")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mobyssl-speedrun-"))
    keep = Path(args.keep) if args.keep else None

    def cfg_for(name, *extra):
        return load_config(args.config, ["train.knn_every=-1", "train.pictures_every=0", *args.overrides,
                                         f"output_dir={root}/{name}", *extra])

    base = cfg_for("calibration")
    n_images = len(build_train_dataset(base))
    steps_per_epoch = n_images // base.train.batch_size
    device = resolve_device(base.train.device)
    amp = resolve_amp(base.train.amp, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if args.epochs:
        if len(args.epochs) != len(args.budgets):
            raise SystemExit("--epochs needs one value per --budgets value")
        per_step, startup = None, 0.0
    else:
        log_every = max(1, args.calibration_steps // 12)
        t0 = time.time()
        pretrain(cfg_for("calibration", f"train.max_steps={args.calibration_steps}",
                         f"train.log_every={log_every}"), log=_quiet)
        records = read_metrics(root / "calibration")
        per_step = step_time(records, skip=args.calibration_steps // 3)
        first = min(r["time"] for r in records if r["type"] == "train")
        startup = first - t0 - per_step * min(r["step"] for r in records if r["type"] == "train")
        print(f"calibration: {per_step * 1000:.1f} ms/step ({base.train.batch_size / per_step:,.0f} img/s), start-up "
              f"{startup:.0f} s, {steps_per_epoch} steps/epoch ({per_step * steps_per_epoch:.1f} s/epoch)",
              flush=True)

    rows = []
    for b, budget in enumerate(args.budgets):
        if args.epochs:
            epochs = args.epochs[b]
            every = max(1, round(epochs * args.curve_every / budget))
        else:
            epochs = max(1, math.floor((budget * 60 - startup) / (per_step * steps_per_epoch)))
            every = max(1, round(args.curve_every * 60 / (per_step * steps_per_epoch)))
        warmup = min(base.train.warmup_epochs, max(epochs // 10, 0))
        run = f"budget{budget:g}"
        cfg = cfg_for(run, f"train.epochs={epochs}", f"train.warmup_epochs={warmup}", f"train.knn_every={every}",
                      f"train.log_every={steps_per_epoch}")
        print(f"budget {budget:g} min: {epochs} epochs (warm-up {warmup}), k-NN every {every} epochs", flush=True)
        t0 = time.time()
        pretrain(cfg, log=print)
        wall = time.time() - t0
        records = read_metrics(root / run)
        points, evals = curve(records, t0)
        if keep:
            keep.mkdir(parents=True, exist_ok=True)
            (keep / f"{run}_metrics.jsonl").write_text((root / run / "metrics.jsonl").read_text())
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
        train_min = (wall - evals) / 60
        shown = ", ".join(f"{m:.1f} min (epoch {e}): {top1(r):.1f}" for m, e, r in points)
        rows.append(f"| {datetime.date.today()} | {name} | {args.config} | {' '.join(args.overrides) or '-'} "
                    f"| {budget:g} | {epochs} | {train_min:.1f} min | {knn20['knn_top1_k20']:.1f} "
                    f"| {knn200['knn_top1_k200']:.1f} | {lin['linear_top1']:.1f} | {shown} |")
        result = {"budget_min": budget, "epochs": epochs, "wall_s": wall, "eval_s_in_run": evals,
                  "per_step_s": per_step, "startup_s": startup, "curve": [(m, e) for m, e, _ in points],
                  **knn20, **knn200, **lin}
        print(json.dumps(result), flush=True)
        if keep:
            (keep / f"{run}_result.json").write_text(json.dumps(result, indent=1))
    print("| date | device | config | overrides | budget (min) | epochs | pre-training time | k-NN k=20 T=0.07 "
          "| k-NN k=200 T=0.1 | linear (fast) | k-NN curve (training minutes) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
