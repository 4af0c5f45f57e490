"""Unreadable images in evaluation splits: left out (never replaced), named on stderr, counted, and a
``DataError`` listing them past ``data.max_bad_fraction`` -- in pre-training's k-NN, ``mobyssl knn`` and both
linear probes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from helpers import tinted_split
from torch import nn

from mobyssl.build import build_backbone, build_eval_datasets, make_loader
from mobyssl.cli import main
from mobyssl.config import load_config
from mobyssl.data import DataError
from mobyssl.eval.features import IGNORE_LABEL, SkipUnreadable, extract_features
from mobyssl.eval.linear import linear_probe_full
from mobyssl.eval.runner import run_knn
from mobyssl.train.trainer import pretrain

CPU = torch.device("cpu")


@pytest.fixture
def splits(tmp_path):
    bank = tinted_split(tmp_path / "bank", 8, 0)
    test = tinted_split(tmp_path / "test", 5, 1, bad=("a/bad.png",))
    return bank, test


def test_pretrain_knn_leaves_a_corrupt_test_image_out(tiny_cfg, splits, capfd):
    bank, test = splits
    cfg = tiny_cfg(f"data.eval_train={bank}", f"data.test={test}", "train.max_steps=1", "data.max_bad_fraction=0.1")
    result = pretrain(cfg)
    assert result["global_step"] == 1 and 0 <= result["knn_top1_k20"] <= 100
    err = capfd.readouterr().err
    assert err.count("skipping unreadable image: cannot read image 'a/bad.png'") == 1
    assert "data.test: 1 of 16 images could not be read and were left out of the evaluation: a/bad.png" in err


def test_pretrain_knn_stops_past_max_bad_fraction(tiny_cfg, tmp_path):
    bank = tinted_split(tmp_path / "bank", 8, 0)
    test = tinted_split(tmp_path / "test", 5, 1, bad=("a/bad1.png", "b/bad2.png"))
    cfg = tiny_cfg(f"data.eval_train={bank}", f"data.test={test}", "train.max_steps=1", "data.max_bad_fraction=0.1")
    with pytest.raises(DataError, match=r"data.test=.*2 of 17 images could not be read \(11\.8% > "
                                        r"data.max_bad_fraction=0\.1\): a/bad1.png, b/bad2.png"):
        pretrain(cfg)


def _cfg(tmp_path, *overrides):
    from conftest import TINY

    return load_config("quickstart", TINY + [f"output_dir={tmp_path / 'run'}", *overrides])


@pytest.mark.parametrize("where", ["test", "bank"])
def test_knn_with_an_unreadable_image_equals_knn_without_the_file(tmp_path, where, capfd):
    bank = tinted_split(tmp_path / "bank", 8, 0, bad=("b/bad.png",) if where == "bank" else ())
    test = tinted_split(tmp_path / "test", 5, 1, bad=("a/bad.png",) if where == "test" else ())
    clean = tmp_path / "clean"
    shutil.copytree(bank if where == "bank" else test, clean)
    next(clean.glob("*/bad.png")).unlink()
    cfg = _cfg(tmp_path, f"data.eval_train={bank}", f"data.test={test}", "knn.k=[3,10]", "data.max_bad_fraction=0.1")
    torch.manual_seed(0)
    backbone = build_backbone(cfg)
    skipped = {}
    datasets = build_eval_datasets(cfg)
    with_bad = run_knn(cfg, backbone, CPU, datasets=datasets, skipped=skipped)
    split = "data.test" if where == "test" else "data.eval_train"
    assert skipped == {"data.eval_train": 0, "data.test": 0, split: 1}
    assert run_knn(cfg, backbone, CPU, datasets=datasets) == with_bad  # evaluated again, as during pre-training
    err = capfd.readouterr().err
    assert err.count("skipping unreadable image") == 1  # the reason once per run; the summary at each evaluation
    assert err.count(f"{split}: 1 of ") == 2
    cfg_clean = _cfg(tmp_path, f"data.eval_train={clean if where == 'bank' else bank}",
                     f"data.test={clean if where == 'test' else test}", "knn.k=[3,10]")
    without = run_knn(cfg_clean, backbone, CPU, datasets=build_eval_datasets(cfg_clean))
    assert with_bad == without and set(with_bad) == {"knn_top1_k3", "knn_top5_k3", "knn_top1_k10", "knn_top5_k10"}


def test_features_of_clean_data_are_unchanged_and_bad_rows_dropped(tmp_path):
    num_workers = 0
    test = tinted_split(tmp_path / "test", 5, 1, bad=("a/bad.png",))
    cfg = _cfg(tmp_path, f"data.eval_train={test}", f"data.test={test}")
    ds = build_eval_datasets(cfg)[1]
    torch.manual_seed(0)
    backbone = build_backbone(cfg)
    good = [i for i, k in enumerate(ds.keys) if k != "a/bad.png"]
    plain = make_loader(torch.utils.data.Subset(ds, good), 4, num_workers, CPU)
    f_plain, y_plain = extract_features(backbone, plain, CPU)
    clean_keys = [k for k in ds.keys if k != "a/bad.png"]
    failed = []
    wrapped = make_loader(SkipUnreadable(ds), 4, num_workers, CPU)
    f_wrapped, y_wrapped = extract_features(backbone, wrapped, CPU, failed=failed)
    assert failed == ["a/bad.png"] and len(clean_keys) == len(f_wrapped)
    assert torch.equal(y_wrapped, y_plain)
    # Batches after the bad image are shifted by one image: features agree to float precision.
    assert torch.allclose(f_wrapped, f_plain, atol=1e-5)
    # Clean data: the wrapper changes nothing, bit for bit.
    sub = torch.utils.data.Subset(ds, good)
    sub.keys = clean_keys
    f_sub, _ = extract_features(backbone, make_loader(sub, 4, num_workers, CPU), CPU)
    f_sub_wrapped, _ = extract_features(backbone, make_loader(SkipUnreadable(sub), 4, num_workers, CPU), CPU)
    assert torch.equal(f_sub, f_sub_wrapped)


def _run(capfd, *argv):
    code = main(list(argv))
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", [["knn", "data.num_workers=1"], ["linear", "linear.mode=fast", "linear.epochs=2"],
                                     ["linear", "linear.epochs=1", "linear.batch_size=8"]])
def test_cli_evaluations_leave_unreadable_images_out(tmp_path, tiny_overrides, capfd, command):
    bank = tinted_split(tmp_path / "bank", 8, 0, bad=("c/bank_bad.png",))
    test = tinted_split(tmp_path / "test", 5, 1, bad=("a/bad.png",))
    code, out, err = _run(capfd, command[0], "--config", "quickstart", "--random-init", *tiny_overrides,
                          f"data.eval_train={bank}", f"data.test={test}", f"output_dir={tmp_path / 'run'}",
                          "data.max_bad_fraction=0.1", *command[1:])
    assert code == 0, err
    assert ("knn_top1_k20" if command[0] == "knn" else "linear_top1") in out
    assert "skipped" not in out  # the accuracy dict holds accuracies only
    assert "'a/bad.png'" in err and "'c/bank_bad.png'" in err
    assert "data.test: 1 of 16 images could not be read" in err
    assert "data.eval_train: 1 of 25 images could not be read" in err


@pytest.mark.parametrize("command", [["knn"], ["linear", "linear.mode=fast", "linear.epochs=2"],
                                     ["linear", "linear.epochs=1", "linear.batch_size=8"]])
def test_cli_evaluations_stop_past_max_bad_fraction(tmp_path, tiny_overrides, capfd, command):
    bank = tinted_split(tmp_path / "bank", 8, 0, bad=("c/bank_bad1.png", "c/bank_bad2.png", "a/bank_bad3.png"))
    test = tinted_split(tmp_path / "test", 5, 1)
    code, _, err = _run(capfd, command[0], "--config", "quickstart", "--random-init", *tiny_overrides,
                        f"data.eval_train={bank}", f"data.test={test}", "data.max_bad_fraction=0.1",
                        f"output_dir={tmp_path / 'run'}", *command[1:])
    assert code == 2
    assert "error: data.eval_train=" in err and "3 of 27 images could not be read" in err
    assert "a/bank_bad3.png, c/bank_bad1.png, c/bank_bad2.png" in err and "max_bad_fraction" in err


class _Mean(nn.Module):
    num_features = 3

    def forward(self, x):
        return x.mean(dim=(2, 3))


def test_full_linear_probe_ignores_placeholders_and_survives_a_batch_of_them():
    x = torch.randn(4, 3, 2, 2)
    batches = [(x, torch.tensor([0, 1, IGNORE_LABEL, 1]), ["", "", "a.png", ""]),
               (x, torch.full((4,), IGNORE_LABEL), ["b.png", "c.png", "d.png", "e.png"])]

    class Loader(list):
        batch_size = 4
        sampler = None

    seen, logged = [], []
    out = linear_probe_full(_Mean(), Loader(batches), x.mean(dim=(2, 3)), torch.tensor([0, 1, 0, 1]), 2, CPU,
                            epochs=2, check_unreadable=lambda failed: seen.append(sorted(failed)), log=logged.append)
    assert all(np.isfinite(v) for v in out.values())
    assert len(logged) == 2 and not any("nan" in line for line in logged)  # the last batch had nothing to learn
    assert seen == [["a.png", "b.png", "c.png", "d.png", "e.png"]] * 2


@pytest.mark.slow
def test_torchrun_knn_and_linear_leave_the_same_images_out(tmp_path, tiny_overrides, capfd):
    """Each rank drops its unreadable images before gathering: the votes are those of one process."""
    import json
    import os
    import subprocess
    import sys

    bank = tinted_split(tmp_path / "bank", 8, 0, bad=("c/bank_bad.png",))
    test = tinted_split(tmp_path / "test", 5, 1, bad=("a/bad.png", "b/bad.png"))
    args = ["--config", "quickstart", "--random-init", *tiny_overrides, f"data.eval_train={bank}",
            f"data.test={test}", "data.max_bad_fraction=0.2", f"output_dir={tmp_path / 'run'}"]
    assert main(["knn", *args, "--output", str(tmp_path / "one.json")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mobyssl"]
    proc = subprocess.run([*torchrun, "knn", *args, "--output", str(tmp_path / "two.json")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert {k: v for k, v in one.items() if k.startswith("knn_")} == {k: v for k, v in two.items()
                                                                       if k.startswith("knn_")}
    assert proc.stderr.count("data.test: 2 of 17 images could not be read") == 1  # the main process only
    assert "a/bad.png, b/bad.png" in proc.stderr and "c/bank_bad.png" in proc.stderr
    proc = subprocess.run([*torchrun, "linear", *args, "linear.epochs=2", "linear.batch_size=8"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "linear_top1" in proc.stdout and proc.stderr.count("data.eval_train: 1 of 25 images") <= 1
    proc = subprocess.run([*torchrun, "linear", *args, "linear.epochs=1", "linear.batch_size=8",
                           "data.max_bad_fraction=0.01"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    # Every rank raises the same DataError (rank 0 exits with 2, torchrun with 1): none waits for the others.
    assert proc.returncode == 1 and "exitcode  : 2" in proc.stderr
    assert "error: data.test=" in proc.stderr and "max_bad_fraction=0.01" in proc.stderr
