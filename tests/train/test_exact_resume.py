"""A run stopped at step 2 and resumed to step 4 is bit-for-bit the run that went to step 4 at once
(the default CPU pipeline, in process; the kill -9 version is in test_fault_tolerance.py, marked slow)."""

from pathlib import Path

import pytest
import torch
from helpers import metrics_records, write_shards

from mobyssl.train import trainer
from mobyssl.train.checkpoint import load_checkpoint
from mobyssl.train.trainer import pretrain


def _run(tiny_cfg, monkeypatch, out: Path, steps: int, workers: int, resume=False, extra=True) -> dict:
    """pretrain to ``steps``; returns {step: full-precision loss} of the steps this call trained. ``extra``: add
    the MoBY overrides below to ``tiny_cfg``'s (False: ``tiny_cfg`` gives the whole config)."""
    losses = {}
    original = trainer.train_step

    def recording(*args, **kwargs):
        outputs, ok = original(*args, **kwargs)
        losses[len(losses)] = outputs["loss"].item()
        return outputs, ok

    monkeypatch.setattr(trainer, "train_step", recording)
    # Batch 8 keeps 3 runs fast; the queue of 32 wraps at step 4. Drop path (on the 2nd of the 2 blocks: timm
    # spreads the rate linearly from 0) draws from the global RNG, so the RNG state must be resumed too.
    cfg = tiny_cfg(f"output_dir={out}", f"train.max_steps={steps}", "train.save_every_steps=2", "train.knn_every=-1",
                   f"data.num_workers={workers}", "train.batch_size=8", "method.queue_size=32",
                   "model.drop_path_rate=0.3") if extra else tiny_cfg()
    result = pretrain(cfg, resume=resume)
    assert result["global_step"] == steps
    first = steps - result["trained_steps"] + 1
    return {first + i: v for i, v in losses.items()}


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_at_step_2_gives_the_uninterrupted_run(tiny_cfg, tmp_path, monkeypatch, workers):
    straight = _run(tiny_cfg, monkeypatch, tmp_path / "straight", 4, workers)
    assert sorted(straight) == [1, 2, 3, 4]
    first = _run(tiny_cfg, monkeypatch, tmp_path / "resumed", 2, workers)
    resumed = _run(tiny_cfg, monkeypatch, tmp_path / "resumed", 4, workers, resume=True)
    assert sorted(first) == [1, 2] and sorted(resumed) == [3, 4]
    for step in (1, 2):
        assert first[step] == straight[step], step
    for step in (3, 4):  # full precision, as computed
        assert resumed[step] == straight[step], (step, resumed[step], straight[step])

    # The logged records of steps 3 and 4 agree too (every logged value but the timing).
    logged = {r["step"]: r for r in metrics_records(tmp_path / "resumed", "train")}
    reference = {r["step"]: r for r in metrics_records(tmp_path / "straight", "train")}
    assert sorted(logged) == [1, 2, 3, 4]
    for step in (3, 4):
        a, b = logged[step], reference[step]
        for key in set(a) | set(b):
            if key not in ("time", "img_per_s"):
                assert a[key] == b[key], (step, key, a[key], b[key])

    # Final checkpoints: every weight, queue, pointer, BatchNorm statistic, the optimizer and the RNG states.
    a = load_checkpoint(tmp_path / "resumed" / "checkpoint.pth")
    b = load_checkpoint(tmp_path / "straight" / "checkpoint.pth")
    assert a["global_step"] == b["global_step"] == 4
    assert set(a["method"]) == set(b["method"])
    for key, value in b["method"].items():
        assert torch.equal(a["method"][key], value), key
    assert int(a["method"]["criterion.queue_1.ptr"]) == 0  # 4 x 8 keys: the 32-row queue wrapped once
    assert not torch.equal(a["method"]["criterion.queue_1.queue"][:8], a["method"]["criterion.queue_1.queue"][24:])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in sb:
            assert torch.equal(sa[key], sb[key]), key
    assert len(a["optimizer"]["state"]) == len(b["optimizer"]["state"]) > 0
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


@pytest.mark.parametrize("recipe", ["dino_quickstart", "esvit_quickstart"])
def test_multicrop_methods_resume_at_step_2_to_the_uninterrupted_run(tiny_overrides, tmp_path, monkeypatch, recipe):
    """DINO and EsViT: centres, teacher, the per-step weight decay and teacher temperature, 6 crops per image."""
    from mobyssl.config import load_config

    tiny = [o for o in tiny_overrides if not o.startswith(("method.", "model."))]

    def cfg(out, steps):
        return load_config(recipe, [*tiny, f"output_dir={out}", f"train.max_steps={steps}",
                                    "train.save_every_steps=2", "train.knn_every=-1", "train.batch_size=8",
                                    "method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16",
                                    "method.local_crops_number=4", "method.warmup_teacher_temp=0.03", "method.warmup_teacher_temp_epochs=1",
                                    "model.drop_path_rate=0.3"])

    def run(out, steps, resume=False):
        return _run(lambda *overrides: cfg(out, steps), monkeypatch, out, steps, 0, resume, extra=False)

    straight = run(tmp_path / "straight", 4)
    first = run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4, resume=True)
    assert sorted(straight) == [1, 2, 3, 4] and sorted(first) == [1, 2] and sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == straight[step], (step, resumed[step], straight[step])
    a = load_checkpoint(tmp_path / "resumed" / "checkpoint.pth")
    b = load_checkpoint(tmp_path / "straight" / "checkpoint.pth")
    assert set(a["method"]) == set(b["method"]) and "criterion.center" in b["method"]
    for key, value in b["method"].items():
        assert torch.equal(a["method"][key], value), key
    assert b["method"]["criterion.center"].abs().max() > 0


def test_a_stream_of_shards_resumes_at_step_2_to_the_uninterrupted_run(tiny_cfg, tmp_path, monkeypatch):
    """WebDataset shards are read as a stream (data/shards.py); a resumed epoch replays its order exactly."""
    write_shards(tmp_path / "shards", [9, 14, 11])
    with_shards = lambda *o: tiny_cfg(f"data.train={tmp_path / 'shards'}", "data.shuffle_buffer=8", *o)  # noqa: E731
    straight = _run(with_shards, monkeypatch, tmp_path / "straight", 4, 1)
    first = _run(with_shards, monkeypatch, tmp_path / "resumed", 2, 1)
    resumed = _run(with_shards, monkeypatch, tmp_path / "resumed", 4, 1, resume=True)
    assert [first[s] for s in (1, 2)] == [straight[s] for s in (1, 2)]
    assert [resumed[s] for s in (3, 4)] == [straight[s] for s in (3, 4)]
    zipped = _run(tiny_cfg, monkeypatch, tmp_path / "zip", 2, 1)
    assert zipped[1] != straight[1]  # the shards' own order, not the zip's
    a = load_checkpoint(tmp_path / "resumed" / "checkpoint.pth")["method"]
    b = load_checkpoint(tmp_path / "straight" / "checkpoint.pth")["method"]
    assert all(torch.equal(a[k], b[k]) for k in b)
