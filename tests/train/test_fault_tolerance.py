"""Each fault is injected for real: SIGKILL mid-run, truncated checkpoints, NaN losses and gradients,
broken image files, a read-only output directory, a checkpoint write that fails halfway."""

import io
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import metrics_records
from PIL import Image

from mobyssl.cli import main
from mobyssl.data import DataError
from mobyssl.errors import CheckpointError
from mobyssl.methods import MoBY
from mobyssl.train import checkpoint as ckpt_mod
from mobyssl.train.checkpoint import load_checkpoint, step_checkpoints, write_run_checkpoint
from mobyssl.train.trainer import pretrain


def _losses(run):
    """Last logged loss per step (a resumed run logs the steps after its checkpoint again)."""
    return {r["step"]: r["loss"] for r in metrics_records(run)}


# ---------------------------------------------------------------- kill -9 and exact resume


def _cli(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "mobyssl", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


MULTICROP = ["train.batch_size=16", "method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16",
             "method.local_crops_number=2", "method.warmup_teacher_temp=0.03", "method.warmup_teacher_temp_epochs=1"]


def _kill_resume_args(method, tiny_overrides):
    """(pretrain arguments, steps, step to kill after, state keys that must move): a kill mid-epoch 0 and a
    resumed run that crosses into epoch 1 (MoBY, MoCo v3, SiT: 31 steps per epoch; DINO/EsViT: 62)."""
    if method == "moby":
        return ["pretrain", *tiny_overrides], 36, 17, ["criterion.queue_2.queue", "encoder_target.pos_embed"]
    if method == "sit":  # the corruption draws from the global RNG: a resume must restore it
        tiny = [o for o in tiny_overrides if not o.startswith("method.")]
        return ["pretrain", "--config", "sit_quickstart", *tiny, "method.hidden_dim=32", "method.out_dim=16",
                "method.drop_type=[zeros, noise, copy]"], 36, 17, ["teacher.blocks.0.attn.qkv.weight",
                                                                   "student_decoder.to_pixels.weight"]
    if method == "mocov3":
        tiny = [o for o in tiny_overrides if not o.startswith("method.")]
        return ["pretrain", "--config", "mocov3_quickstart", *tiny, "method.proj_hidden_dim=32", "method.proj_dim=16"], \
            36, 17, ["encoder_target.blocks.0.attn.qkv.weight", "projector.net.1.running_mean"]
    tiny = [o for o in tiny_overrides if not o.startswith(("method.", "train.batch_size"))]
    if method == "esvit":  # its recipe's 1.4M Swin, not the tiny ViT
        tiny = [o for o in tiny if not o.startswith("model.")]
    return ["pretrain", "--config", f"{method}_quickstart", *tiny, *MULTICROP], 66, 31, [
        "criterion.center", "teacher.norm.weight"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["moby", "dino", "esvit", "mocov3", "sit"])
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_trajectory(tmp_path, tiny_overrides, method):
    args, steps, kill_after, moving = _kill_resume_args(method, tiny_overrides)
    common = [*args, "data.num_workers=1", f"train.max_steps={steps}", "train.save_every_steps=5",
              "train.knn_every=-1"]
    ref = _cli(common + [f"output_dir={tmp_path / 'ref'}"])
    killed = _cli(common + [f"output_dir={tmp_path / 'killed'}"])
    deadline = time.time() + 300
    while max(_losses(tmp_path / "killed"), default=0) < kill_after:
        assert killed.poll() is None, killed.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert max(_losses(tmp_path / "killed")) < steps

    resumed = _cli(common + [f"output_dir={tmp_path / 'killed'}", "--resume"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    ref_out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_out

    expected, got = _losses(tmp_path / "ref"), _losses(tmp_path / "killed")
    assert sorted(expected) == sorted(got) == list(range(1, steps + 1))
    assert got == expected  # step for step, bit for bit
    first = load_checkpoint(step_checkpoints(tmp_path / "ref")[-1])["method"]  # the oldest one kept
    final_ref = load_checkpoint(tmp_path / "ref" / "checkpoint.pth")["method"]
    final = load_checkpoint(tmp_path / "killed" / "checkpoint.pth")["method"]
    assert set(final) == set(final_ref)
    for k, value in final_ref.items():  # every weight, buffer, queue and centre
        assert torch.equal(final[k], value), k
    for k in moving:  # ... and the trajectory went somewhere
        assert not torch.equal(first[k], final_ref[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_saves_the_current_step_and_resume_finishes(tmp_path, tiny_overrides, sig):
    # Pre-emption (SLURM sends SIGTERM) or Ctrl-C: finish the step, write a checkpoint, exit 128 + signal.
    common = ["pretrain", *tiny_overrides, "train.max_steps=12", "train.knn_every=-1", f"output_dir={tmp_path / 'run'}"]
    proc = _cli(common)
    deadline = time.time() + 300
    while max(_losses(tmp_path / "run"), default=0) < 4:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out
    assert f"stopped by {signal.Signals(sig).name}" in out and "--resume" in out
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert state["global_step"] == max(_losses(tmp_path / "run")) < 12  # the step it stopped at, saved
    resumed = _cli(common + ["--resume"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pth")["global_step"] == 12


# ---------------------------------------------------------------- checkpoint files


def test_rotation_keeps_the_newest_and_points_latest_at_it(tmp_path):
    for step in (1, 2, 3, 4):
        write_run_checkpoint({"global_step": step}, tmp_path, step, keep_last=2, keep_epoch=1 if step == 2 else None)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["checkpoint_step00000004.pth", "checkpoint_step00000003.pth"]
    assert load_checkpoint(tmp_path / "checkpoint.pth")["global_step"] == 4
    assert load_checkpoint(tmp_path / "checkpoint_epoch0001.pth")["global_step"] == 2  # permanent copy survives
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_checkpoint_is_reported_and_skipped(tiny_cfg, capsys):
    pretrain(tiny_cfg("train.max_steps=4", "train.save_every_steps=2", "train.knn_every=-1"))
    run = Path(tiny_cfg().output_dir)
    newest = run / "checkpoint_step00000004.pth"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated on disk
    capsys.readouterr()
    result = pretrain(tiny_cfg("train.max_steps=6", "train.save_every_steps=2", "train.knn_every=-1"), resume=True)
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and str(newest) in out
    assert "resumed from" in out and "checkpoint_step00000002.pth" in out
    assert result["global_step"] == 6
    assert load_checkpoint(run / "checkpoint.pth")["global_step"] == 6


def _failing_save(monkeypatch, fails):
    """torch.save writes half of the checkpoints numbered in ``fails``, then the disk is full."""
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] in fails:
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    return real_save


def test_checkpoint_write_failing_halfway_keeps_the_previous_one(tiny_cfg, monkeypatch, capsys):
    real_save = _failing_save(monkeypatch, fails={2})
    result = pretrain(tiny_cfg("train.max_steps=3", "train.save_every_steps=1", "train.knn_every=-1"))
    assert result["global_step"] == 3  # training went on
    out = capsys.readouterr().out
    assert "could not write a checkpoint at step 2" in out and "No space left" in out
    assert "checkpoint_step00000001.pth) is intact" in out
    run = Path(tiny_cfg().output_dir)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert load_checkpoint(run / "checkpoint.pth")["global_step"] == 3  # the next write worked again
    assert "checkpoint_step00000003.pth" in out.splitlines()[-1]  # the final message names the file written
    assert not list(run.glob("*.tmp"))


def test_a_final_checkpoint_that_cannot_be_written_is_an_error_naming_the_last_good_one(tiny_cfg, monkeypatch,
                                                                                      capsys):
    real_save = _failing_save(monkeypatch, fails={2, 3})
    with pytest.raises(CheckpointError) as e:
        pretrain(tiny_cfg("train.max_steps=3", "train.save_every_steps=1", "train.knn_every=-1"))
    run = Path(tiny_cfg().output_dir)
    assert "final checkpoint could not be written" in str(e.value)
    assert f"{run / 'checkpoint_step00000001.pth'} (step 1)" in str(e.value)
    assert "done:" not in capsys.readouterr().out  # no claim of a finished run
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert load_checkpoint(run / "checkpoint.pth")["global_step"] == 1


def test_read_only_output_dir_fails_before_training(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    target = ro / "run"
    if os.access(ro, os.W_OK):  # root ignores permission bits: use a read-only filesystem instead
        target = Path("/sys/mobyssl-test-run")
        if os.access("/sys", os.W_OK) and not Path("/sys").is_mount():
            pytest.skip("no read-only location to test with")
    code = main(["pretrain", f"output_dir={target}", "data.num_workers=0"])
    err = capsys.readouterr().err
    assert code == 2 and "is not writable" in err and str(target) in err
    assert not target.exists()


# ---------------------------------------------------------------- non-finite guard


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _inject(monkeypatch, bad_calls, kind):
    original = MoBY.forward
    calls = {"n": 0}

    def forward(self, views):
        out = original(self, views)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            out["loss"] = out["loss"] * float("nan") if kind == "loss" else _NanGrad.apply(out["loss"])
        return out

    monkeypatch.setattr(MoBY, "forward", forward)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_step_is_skipped_and_training_continues(tiny_cfg, monkeypatch, capsys, kind):
    _inject(monkeypatch, {2}, kind)
    result = pretrain(tiny_cfg("train.max_steps=4", "train.knn_every=-1"))
    assert result["global_step"] == 4
    assert "step 2: 1 step(s) with a non-finite loss or gradient skipped" in capsys.readouterr().out
    run = Path(tiny_cfg().output_dir)
    records = metrics_records(run)
    assert records[-1]["skipped_steps"] == 1
    state = load_checkpoint(run / "checkpoint.pth")
    assert int(next(iter(state["optimizer"]["state"].values()))["step"]) == 3  # 4 steps, 1 skipped
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())


def test_divergence_stops_with_diagnostic_checkpoint(tiny_cfg, monkeypatch):
    _inject(monkeypatch, set(range(3, 100)), "loss")
    with pytest.raises(FloatingPointError, match="3 steps in a row") as e:
        pretrain(tiny_cfg("train.max_steps=20", "train.max_bad_steps=3", "train.save_every_steps=1",
                          "train.knn_every=-1"))
    assert "checkpoint_diagnostic.pth" in str(e.value)
    run = Path(tiny_cfg().output_dir)
    assert load_checkpoint(run / "checkpoint_diagnostic.pth")["global_step"] == 5  # after bad steps 3, 4, 5
    assert load_checkpoint(run / "checkpoint.pth")["global_step"] == 2  # the last good step


def test_divergence_is_caught_at_the_next_check_when_logging_sparsely(tiny_cfg, monkeypatch):
    # Counts stay on the device between log steps (no per-step host sync); the stop comes at the next check.
    _inject(monkeypatch, set(range(2, 100)), "loss")
    with pytest.raises(FloatingPointError, match="steps in a row"):
        pretrain(tiny_cfg("train.max_steps=30", "train.max_bad_steps=3", "train.log_every=5", "train.knn_every=-1"))
    run = Path(tiny_cfg().output_dir)
    assert load_checkpoint(run / "checkpoint_diagnostic.pth")["global_step"] == 5
    state = load_checkpoint(run / "checkpoint_diagnostic.pth")
    assert int(next(iter(state["optimizer"]["state"].values()))["step"]) == 1  # only step 1 was applied


def test_collapse_is_reported(tiny_cfg, monkeypatch, capsys):
    original = MoBY.forward

    def collapsed(self, views):
        out = original(self, views)
        out["feature_std"] = out["feature_std"] * 0  # every image at the same point
        return out

    monkeypatch.setattr(MoBY, "forward", collapsed)
    pretrain(tiny_cfg("train.max_steps=2", "train.knn_every=-1"))
    assert "may be collapsing" in capsys.readouterr().out


def test_collapse_is_reported_by_the_method_that_trains(tiny_overrides, tmp_path, monkeypatch, capsys):
    """The trainer asks the method: a DINO run warns from DINO's statistics (the student copying uniform targets)."""
    from mobyssl.config import load_config
    from mobyssl.methods import DINO

    original = DINO.forward

    def collapsed(self, views):
        out = original(self, views)
        out["kl_teacher_student"] = out["kl_teacher_student"] * 0
        out["teacher_entropy"] = out["teacher_entropy"] * 0 + math.log(self.criterion.out_dim)
        return out

    monkeypatch.setattr(DINO, "forward", collapsed)
    tiny = [o for o in tiny_overrides if not o.startswith("method.")]
    pretrain(load_config("dino_quickstart", [*tiny, f"output_dir={tmp_path}/run", "method.out_dim=64",
                                             "method.hidden_dim=32", "method.bottleneck_dim=16",
                                             "method.local_crops_number=2", "train.max_steps=2",
                                             "train.knn_every=-1"]))
    out = capsys.readouterr().out
    assert "may be collapsing (kl_teacher_student 0.0000 < 0.01" in out and "uniform targets" in out


def test_healthy_run_logs_collapse_statistics_without_warning(tiny_cfg, capsys):
    """Smoke check only: the statistics reach the log and a healthy run does not warn. Their exact values are
    pinned by tests/losses/test_moby_loss.py::test_logged_statistics_match_hand_computation."""
    pretrain(tiny_cfg("train.max_steps=3", "train.knn_every=-1"))
    records = metrics_records(tiny_cfg().output_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(0.1 < r["feature_std"] <= 1.5 and -1 <= r["neg_sim"] < 0.9 and -1 <= r["pos_sim"] <= 1
               for r in records)
    assert "collapsing" not in capsys.readouterr().out


# ---------------------------------------------------------------- bad data


def _jpeg(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def _bad_folder(root):
    good = Image.new("RGB", (40, 40), (200, 30, 30))
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(16):
            (root / c / f"{i}.jpg").write_bytes(_jpeg(Image.new("RGB", (36, 36), (i * 10, 100, 50))))
    a = root / "a"
    (a / "corrupt.jpg").write_bytes(os.urandom(3000))
    (a / "truncated.jpg").write_bytes(_jpeg(Image.effect_noise((64, 64), 50).convert("RGB"))[:400])
    (a / "empty.png").write_bytes(b"")
    good.convert("CMYK").save(a / "cmyk.jpg")
    good.convert("RGBA").save(a / "rgba.png")
    good.convert("L").save(a / "gray.png")
    good.convert("P").save(a / "palette.png")
    Image.new("RGB", (1, 1)).save(a / "tiny.png")
    Image.new("RGB", (3000, 2000)).save(a / "huge.png")
    (a / "notes.txt").write_text("not an image")
    (a / ".DS_Store").write_bytes(b"\0\1")
    return {"corrupt.jpg", "truncated.jpg", "empty.png"}


def test_bad_images_are_skipped_listed_and_counted(tmp_path, tiny_cfg, capfd):
    bad = _bad_folder(tmp_path / "imgs")
    cfg = tiny_cfg(f"data.train={tmp_path / 'imgs'}", "data.test=null", "train.batch_size=8",
                   "method.queue_size=16", "train.epochs=1", "data.max_bad_fraction=0.5")
    result = pretrain(cfg)
    assert result["global_step"] == 41 // 8
    err = capfd.readouterr().err
    for name in bad:
        assert f"a/{name}" in err
    skipped = metrics_records(cfg.output_dir)[-1]["skipped_images"]
    assert len(bad) <= skipped <= len(bad) + 2  # a replacement may itself be bad


def test_too_many_bad_images_stop_the_run(tmp_path, tiny_cfg):
    _bad_folder(tmp_path / "imgs")
    cfg = tiny_cfg(f"data.train={tmp_path / 'imgs'}", "data.test=null", "train.batch_size=8",
                   "method.queue_size=16", "train.epochs=1", "data.max_bad_fraction=0.01")
    with pytest.raises(DataError, match="max_bad_fraction") as e:
        pretrain(cfg)
    assert "corrupt.jpg" in str(e.value) or "truncated.jpg" in str(e.value) or "empty.png" in str(e.value)


def test_every_readable_mode_loads_as_rgb(tmp_path):
    from mobyssl.data import open_dataset

    _bad_folder(tmp_path / "imgs")
    ds = open_dataset(str(tmp_path / "imgs"))
    assert not any(k.endswith((".txt", ".DS_Store")) for k in ds.keys)
    for name in ("cmyk.jpg", "rgba.png", "gray.png", "palette.png", "tiny.png", "huge.png"):
        img = ds.load(ds.keys.index(f"a/{name}"))
        assert img.mode == "RGB"
    with pytest.raises(DataError, match="truncated.jpg"):
        ds.load(ds.keys.index("a/truncated.jpg"))
