"""Regression tests for inputs that once did harm: each asserts the harm is gone, through the command line.

Every refusal must come before any work, as exit code 2 and one line naming the key or file and the fix,
and leave what the user had untouched.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from helpers import metrics_records

from mobyssl.cli import main
from mobyssl.train.checkpoint import load_checkpoint

FAST = ["train.knn_every=-1", "train.max_steps=2"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def trained(tmp_path, tiny_overrides, capsys):
    """A finished 2-step run in tmp_path/run."""
    out = tmp_path / "run"
    code, _, err = run(capsys, "pretrain", *tiny_overrides, *FAST, f"output_dir={out}")
    assert code == 0, err
    return out


# ---------------------------------------------------------------- values that trained garbage


@pytest.mark.parametrize("override, key", [
    ("train.lr=inf", "train.lr"), ("train.weight_decay=inf", "train.weight_decay"), ("train.lr=.nan", "train.lr"),
    ("train.min_lr=-0.5", "train.min_lr"), ("method.proj_dim=0", "method.proj_dim"),
    ("train.warmup_lr=-1e-3", "train.warmup_lr"), ("train.min_lr=0.5", "train.min_lr"),
])
def test_values_that_spoil_training_are_refused_before_anything_is_written(capsys, tmp_path, tiny_overrides,
                                                                           override, key):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "pretrain", *tiny_overrides, f"output_dir={out}", override)
    assert code == 2 and f"'{key}'" in one_line(err)
    assert not out.exists() and "done" not in stdout


# ---------------------------------------------------------------- the user's own files


def test_empty_output_dir_is_refused(capsys, tiny_overrides):
    code, _, err = run(capsys, "pretrain", *tiny_overrides, "output_dir=")
    assert code == 2 and "'output_dir'" in one_line(err)


def test_a_run_never_writes_into_a_folder_holding_the_users_files(capsys, tmp_path, tiny_overrides, monkeypatch):
    own = tmp_path / "config.yaml"
    own.write_text("my: precious config\n")
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "pretrain", *tiny_overrides, *FAST, "output_dir=.")
    line = one_line(err)
    assert code == 2 and "is not empty" in line and "config.yaml" in line and str(tmp_path) in line
    assert own.read_text() == "my: precious config\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # nothing added, not even a lock


def test_an_output_dir_that_is_a_file_is_named_as_such(capsys, tmp_path, tiny_overrides):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    code, _, err = run(capsys, "pretrain", *tiny_overrides, *FAST, f"output_dir={f}")
    assert code == 2 and "is a file, not a folder" in one_line(err)
    assert f.read_text() == "x"


# ---------------------------------------------------------------- resume with other settings


def test_resume_with_other_settings_lists_the_keys_and_changes_nothing(capsys, trained, tiny_overrides):
    before = (trained / "config.yaml").read_text()
    ckpt = load_checkpoint(trained / "checkpoint.pth")
    code, out, err = run(capsys, "pretrain", *tiny_overrides, *FAST, f"output_dir={trained}", "--resume",
                         "train.lr=2e-3", "train.max_steps=4")
    line = one_line(err)
    assert code == 2 and "train.lr" in line and "--accept-changes" in line
    assert "train.max_steps 2 -> 4" not in line  # safe to change: not a reason to refuse
    assert (trained / "config.yaml").read_text() == before
    assert load_checkpoint(trained / "checkpoint.pth")["global_step"] == ckpt["global_step"] == 2
    assert not list(trained.glob("config_step*.yaml"))


def test_accepted_changes_continue_and_are_recorded_beside_the_original_config(capsys, trained, tiny_overrides):
    before = (trained / "config.yaml").read_text()
    code, out, err = run(capsys, "pretrain", *tiny_overrides, "train.knn_every=-1", f"output_dir={trained}",
                         "--resume", "train.epochs=3", "train.max_steps=4", "--accept-changes")
    assert code == 0, err
    assert "accepted change since the checkpoint: train.epochs 2 -> 3" in out
    assert "trained 2 steps (to step 4)" in out
    assert (trained / "config.yaml").read_text() == before  # the run's first config is never replaced
    assert "epochs: 3" in (trained / "config_step00000002.yaml").read_text()
    assert load_checkpoint(trained / "checkpoint.pth")["global_step"] == 4


def test_a_change_of_architecture_is_refused_even_when_accepted(capsys, trained, tiny_overrides):
    code, _, err = run(capsys, "pretrain", *tiny_overrides, *FAST, f"output_dir={trained}", "--resume",
                       "--accept-changes", "method.queue_size=64", "model.kwargs={depth: 3}")
    line = one_line(err)
    assert code == 2 and "method.queue_size 128 -> 64" in line and "model.kwargs" in line
    assert "do not fit" in line


def test_resume_without_config_continues_with_the_runs_own_config(capsys, trained):
    # No recipe, no overrides but the folder: the checkpoint's config (a 1-block ViT, batch 32) is used.
    code, out, err = run(capsys, "pretrain", f"output_dir={trained}", "--resume", "train.max_steps=3")
    assert code == 0, err
    assert "resumed from" in out and "trained 1 steps (to step 3)" in out
    assert "changed since the checkpoint (safe): train.max_steps 2 -> 3" in out


def test_resuming_a_finished_run_says_so_and_writes_nothing(capsys, trained):
    files = sorted(p.name for p in trained.iterdir())
    metrics = (trained / "metrics.jsonl").read_text()
    code, out, err = run(capsys, "pretrain", f"output_dir={trained}", "--resume")
    assert code == 0, err
    assert "nothing to train" in out and "at step 2" in out and "done:" not in out
    assert sorted(p.name for p in trained.iterdir()) == files
    assert (trained / "metrics.jsonl").read_text() == metrics


# ---------------------------------------------------------------- two runs, one folder


def test_a_second_run_in_the_same_output_dir_is_refused_naming_the_first(capsys, tmp_path, tiny_overrides):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mobyssl.train.rundir import RunLock\n"
         f"lock = RunLock({str(out)!r}, fresh=True).acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run(capsys, "pretrain", *tiny_overrides, *FAST, f"output_dir={out}")
        line = one_line(err)
        assert code == 2 and "in use by another mobyssl run" in line and f"pid {holder.pid}" in line
        assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 10  # the kernel drops the lock with the process: the folder is free again
    while time.time() < deadline:
        code, _, err = run(capsys, "pretrain", *tiny_overrides, *FAST, f"output_dir={out}")
        if code == 0:
            break
        time.sleep(0.2)
    assert code == 0, err
    assert [r["step"] for r in metrics_records(out)] == [1, 2]  # one run's records, not two mixed


# ---------------------------------------------------------------- exports


def test_export_never_writes_over_a_training_checkpoint(capsys, trained, tiny_overrides):
    target = (trained / "checkpoint.pth").resolve()
    before = target.read_bytes()
    for output in (trained / "checkpoint.pth", target):
        code, _, err = run(capsys, "export", "--checkpoint", str(trained / "checkpoint.pth"), "--output", str(output),
                           "--overwrite")
        assert code == 2 and str(output.name) in one_line(err)
    assert target.read_bytes() == before
    code, out, err = run(capsys, "pretrain", *tiny_overrides, "train.knn_every=-1", "train.max_steps=3",
                         f"output_dir={trained}", "--resume")
    assert code == 0, err  # the run still resumes


def test_export_replaces_an_existing_file_only_with_overwrite(capsys, trained, tmp_path):
    dest = tmp_path / "backbone.pth"
    dest.write_text("an older file")
    args = ["export", "--checkpoint", str(trained / "checkpoint.pth"), "--output", str(dest)]
    code, _, err = run(capsys, *args)
    assert code == 2 and "--overwrite" in one_line(err) and dest.read_text() == "an older file"
    code, out, err = run(capsys, *args, "--overwrite")
    assert code == 0, err
    sd = torch.load(dest, weights_only=True)
    assert torch.equal(sd["cls_token"], load_checkpoint(trained / "checkpoint.pth")["method"]["encoder.cls_token"])
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------- evaluation


def test_checkpoint_and_random_init_exclude_each_other(capsys, trained):
    with pytest.raises(SystemExit) as e:
        main(["knn", "--checkpoint", str(trained / "checkpoint.pth"), "--random-init"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_every_report_names_the_model_it_evaluated(capsys, trained, tmp_path, tiny_overrides):
    result = tmp_path / "knn.json"
    code, out, err = run(capsys, "knn", "--checkpoint", str(trained / "checkpoint.pth"), "--output", str(result))
    assert code == 0, err
    assert f"evaluating checkpoint {trained / 'checkpoint.pth'} (step 2, moby online encoder" in out
    assert json.loads(result.read_text())["model"].startswith(f"checkpoint {trained / 'checkpoint.pth'}")
    code, out, err = run(capsys, "knn", "--random-init", *tiny_overrides, "--output", str(result))
    assert code == 0, err
    assert "evaluating random init (vit_nano_patch4_32, train.seed=0)" in out
    assert json.loads(result.read_text())["model"].startswith("random init")


def test_output_paths_are_checked_before_the_evaluation(capsys, trained, tmp_path):
    ckpt = str(trained / "checkpoint.pth")
    for bad, says in ((tmp_path / "missing" / "r.json", "does not exist"), (tmp_path, "is a folder")):
        code, out, err = run(capsys, "knn", "--checkpoint", ckpt, "--output", str(bad))
        assert code == 2 and says in one_line(err) and "evaluating" not in out
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    code, out, err = run(capsys, "knn", "--checkpoint", ckpt, "--output", str(notes))
    assert code == 2 and "not a results file" in one_line(err) and notes.read_text() == "mine"


def test_a_checkpoint_that_does_not_fit_names_the_config_keys(capsys, trained):
    code, _, err = run(capsys, "knn", "--checkpoint", str(trained / "checkpoint.pth"), "model.kwargs={depth: 3}",
                       "data.image_size=64")
    line = one_line(err)
    assert code == 2 and "model.kwargs" in line and "data.image_size 32 -> 64" in line
    assert "blocks." not in line  # config keys, not tensor names


def test_an_exported_backbone_of_another_shape_is_summarised(capsys, trained, tmp_path, tiny_overrides):
    exported = tmp_path / "backbone.pth"
    assert main(["export", "--checkpoint", str(trained / "checkpoint.pth"), "--output", str(exported)]) == 0
    capsys.readouterr()
    code, _, err = run(capsys, "knn", "--checkpoint", str(exported), "--config", "quickstart", *tiny_overrides,
                       "model.kwargs={depth: 3}")
    line = one_line(err)
    assert code == 2 and re.search(r"\d+ missing \(e\.g\. blocks\.2\.", line) and "model.kwargs" in line


def test_a_folder_given_as_checkpoint_is_named_as_such(capsys, trained):
    code, _, err = run(capsys, "knn", "--checkpoint", str(trained))
    assert code == 2 and "is a folder" in one_line(err) and str(trained / "checkpoint.pth") in err


def test_dry_run_checks_everything_and_writes_nothing(capsys, tmp_path, tiny_overrides):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "pretrain", *tiny_overrides, f"output_dir={out}", "--dry-run")
    assert code == 0, err and "dry run" in stdout
    assert not out.exists()
    code, _, err = run(capsys, "pretrain", *tiny_overrides, f"output_dir={out}", "--dry-run",
                       "data.test=/nonexistent/test")
    assert code == 2 and "data.test" in one_line(err)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_worker_errors_show_the_underlying_message(capsys, tmp_path, tiny_overrides):
    bad = tmp_path / "imgs"
    bad.mkdir()
    for i in range(40):
        (bad / f"{i}.jpg").write_bytes(b"not a jpeg")
    code, _, err = run(capsys, "pretrain", *tiny_overrides, *FAST, "data.num_workers=1", f"data.train={bad}",
                       "data.test=null", f"output_dir={tmp_path / 'run'}")
    line = one_line([ln for ln in err.splitlines() if "error:" in ln][0])
    assert code == 2 and "DataLoader worker" not in line and "Original Traceback" not in line
    assert str(bad) in line


# ---------------------------------------------------------------- found by the hostile probe


def _nan_copy(trained, tmp_path):
    """A copy of the run's checkpoint whose weights hold NaN (what checkpoint_diagnostic.pth looks like)."""
    state = load_checkpoint(trained / "checkpoint.pth")
    state["method"]["encoder.cls_token"] = torch.full_like(state["method"]["encoder.cls_token"], float("nan"))
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    return path


def test_non_finite_weights_are_never_trained_from_evaluated_or_exported(capsys, trained, tmp_path):
    nan = _nan_copy(trained, tmp_path)
    for argv in (["pretrain", f"output_dir={tmp_path / 'new'}", "--resume", str(nan)],
                 ["knn", "--checkpoint", str(nan)],
                 ["export", "--checkpoint", str(nan), "--output", str(tmp_path / "bb.pth")]):
        code, out, err = run(capsys, *argv)
        line = one_line(err)
        assert code == 2 and str(nan) in line and "non-finite" in line and "cls_token" in line, line
        assert "evaluating" not in out
    assert not (tmp_path / "new").exists() and not (tmp_path / "bb.pth").exists()


def test_a_new_run_that_fails_before_its_first_step_leaves_the_folder_as_it_was(capsys, tmp_path, tiny_overrides):
    bad = tmp_path / "imgs"
    bad.mkdir()
    from PIL import Image

    for i in range(60):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(bad / f"{i}.png")
    for i in range(3):
        (bad / f"broken{i}.png").write_bytes(b"not a png")  # 5% > max_bad_fraction 0.01: refused after the lock
    new, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    for out in (new, empty):
        code, _, err = run(capsys, "pretrain", *tiny_overrides, *FAST, "data.pipeline=gpu_resident", "train.device=cpu",
                           f"data.train={bad}", "data.test=null", f"output_dir={out}")
        assert code == 2 and "broken0.png" in err
    assert not new.exists()  # created by the run, removed again
    assert empty.is_dir() and not list(empty.iterdir())  # the user's empty folder stays, empty


def test_an_image_size_the_patches_do_not_tile_is_refused(capsys, tmp_path, tiny_overrides):
    code, _, err = run(capsys, "pretrain", *tiny_overrides, *FAST, "data.image_size=33", f"output_dir={tmp_path / 'r'}")
    line = one_line(err)
    assert code == 2 and "data.image_size=33" in line and "data.image_size=32 or 36" in line


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
def test_a_closed_stdout_pipe_ends_quietly(tmp_path, unbuffered):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    rfd, wfd = os.pipe()
    os.close(rfd)  # the reader is gone before the command writes
    with os.fdopen(wfd, "wb") as w:
        proc = subprocess.run([sys.executable, "-m", "mobyssl", "backbones"], stdout=w, stderr=subprocess.PIPE,
                              text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
