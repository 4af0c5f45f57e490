"""The lr the optimizer really uses: train.lr x batch_size / lr_ref_batch, linear warm-up, then cosine.

Every expected value comes from a formula written here, not from ``warmup_cosine``.
"""

import math
from pathlib import Path

import pytest
from helpers import metrics_records, record_step_lrs

from mobyssl.data import open_dataset
from mobyssl.train import trainer
from mobyssl.train.logging import MetricsLogger
from mobyssl.train.trainer import make_schedules, pretrain


def expected_lr(step: int, *, lr, batch, ref, warmup_lr, min_lr, epochs, warmup_epochs, steps_per_epoch) -> float:
    """The lr of 0-based optimizer step ``step``, by hand."""
    scale = batch / ref
    base, start, final = lr * scale, warmup_lr * scale, min_lr * scale
    total = epochs * steps_per_epoch
    warm = int(round(warmup_epochs * steps_per_epoch))
    if step < warm:
        return start + (base - start) * step / warm
    t, n = step - warm, total - warm
    return final + (base - final) * (1 + math.cos(math.pi * t / n)) / 2


@pytest.mark.parametrize("batch, ref", [(32, 512), (64, 128), (16, 16)])
def test_make_schedules_at_the_phase_boundaries(tiny_cfg, batch, ref):
    p = dict(lr=2e-3, batch=batch, ref=ref, warmup_lr=1e-4, min_lr=3e-5, epochs=4, warmup_epochs=1.5,
             steps_per_epoch=10)
    cfg = tiny_cfg(f"train.lr={p['lr']}", f"train.batch_size={batch}", f"train.lr_ref_batch={ref}",
                   f"train.warmup_lr={p['warmup_lr']}", f"train.min_lr={p['min_lr']}", f"train.epochs={p['epochs']}",
                   f"train.warmup_epochs={p['warmup_epochs']}")
    s = make_schedules(cfg, steps_per_epoch=10)
    assert s.total_steps == 40 and s.steps_per_epoch == 10 and len(s.lr) == 40
    scale = batch / ref
    # 15 warm-up steps (0..14), cosine over steps 15..39.
    assert s.lr[0] == pytest.approx(1e-4 * scale, rel=1e-12)  # first step: the scaled warmup_lr
    assert s.lr[14] == pytest.approx((1e-4 + (2e-3 - 1e-4) * 14 / 15) * scale, rel=1e-12)  # last warm-up step
    assert s.lr[15] == pytest.approx(2e-3 * scale, rel=1e-12)  # first cosine step: the scaled peak
    last = 3e-5 + (2e-3 - 3e-5) * (1 + math.cos(math.pi * 24 / 25)) / 2
    assert s.lr[39] == pytest.approx(last * scale, rel=1e-12)  # last step, just above the scaled min_lr
    for i, value in enumerate(s.lr):
        assert value == pytest.approx(expected_lr(i, **p), rel=1e-12), i


def test_make_schedules_without_warmup_starts_at_the_peak(tiny_cfg):
    cfg = tiny_cfg("train.lr=1e-3", "train.batch_size=256", "train.lr_ref_batch=512", "train.warmup_epochs=0",
                   "train.min_lr=0", "train.epochs=2")
    s = make_schedules(cfg, steps_per_epoch=5)
    assert s.lr[0] == pytest.approx(5e-4, rel=1e-12)
    assert s.lr[5] == pytest.approx(2.5e-4, rel=1e-12)  # halfway down the cosine to 0
    assert s.lr[9] == pytest.approx(5e-4 * (1 + math.cos(math.pi * 9 / 10)) / 2, rel=1e-12)


def _image_folder(root: Path, n: int) -> Path:
    """The first ``n`` images of the bundled CIFAR-10 sample as an ImageFolder tree."""
    sample = open_dataset("bundled:cifar10-sample-train")
    for i in range(n):
        path = root / sample.keys[i]
        path.parent.mkdir(parents=True, exist_ok=True)
        sample.load(i).save(path)
    return root


@pytest.mark.parametrize("batch, ref, lr", [(16, 512, 4e-3), (8, 12, 1e-3)])
def test_optimizer_and_logged_lr_follow_the_scaled_schedule(tiny_cfg, tmp_path, monkeypatch, batch, ref, lr):
    # 32 images: 32 // batch steps per epoch, 2 epochs, 1 warm-up epoch: every phase in a few seconds.
    data = _image_folder(tmp_path / "data", 32)
    spe = 32 // batch
    p = dict(lr=lr, batch=batch, ref=ref, warmup_lr=lr / 10, min_lr=lr / 20, epochs=2, warmup_epochs=1,
             steps_per_epoch=spe)
    cfg = tiny_cfg(f"data.train={data}", "train.knn_every=-1", f"train.batch_size={batch}", f"train.lr={lr}",
                   f"train.lr_ref_batch={ref}", f"train.warmup_lr={p['warmup_lr']}", f"train.min_lr={p['min_lr']}",
                   "train.epochs=2", "train.warmup_epochs=1", "method.queue_size=32", "model.kwargs={depth: 1}")

    used = []  # per optimizer step: the lr of every param group when optimizer.step() runs
    original = trainer.build_adamw

    monkeypatch.setattr(trainer, "build_adamw", lambda *a, **k: record_step_lrs(original(*a, **k), used))
    assert pretrain(cfg)["global_step"] == 2 * spe

    total = 2 * spe
    expected = [expected_lr(i, **p) for i in range(total)]
    assert len(used) == total
    for i, groups in enumerate(used):
        assert len(groups) == 2  # decay and no-decay groups both follow the schedule
        for value in groups:
            assert value == pytest.approx(expected[i], rel=1e-9), (i, groups, expected[i])
    logged = metrics_records(cfg.output_dir, "train")
    assert [r["step"] for r in logged] == list(range(1, total + 1))
    for r in logged:  # metrics.jsonl keeps 7 significant digits
        assert r["lr"] == pytest.approx(expected[r["step"] - 1], rel=1e-6), r
    # The phases really are distinct: warm-up rises to the scaled peak, which the cosine leaves.
    assert used[0][0] == pytest.approx(lr / 10 * batch / ref, rel=1e-9)
    assert used[spe][0] == pytest.approx(lr * batch / ref, rel=1e-9)
    assert used[-1][0] < used[spe][0]


def test_logged_lr_keeps_its_significant_digits(tmp_path):
    # Real recipes have tiny scaled lrs: MoBY's warmup_lr 5e-7 at batch 64 per 512 is 6.25e-8, min_lr 6.25e-7.
    # Rounding to 6 decimals would log the first as 0.0 and the second as 1e-06 (metrics.jsonl and TensorBoard).
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step, lr in enumerate([6.25e-8, 6.25e-7, 1.2345678e-5, 6.25e-4], start=1):
        logger.log("train", step, lr=lr)
    logger.close()
    logged = [r["lr"] for r in metrics_records(tmp_path, "train")]
    assert logged == pytest.approx([6.25e-8, 6.25e-7, 1.2345678e-5, 6.25e-4], rel=1e-6)
