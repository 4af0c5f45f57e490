"""`mobyssl pretrain` under torchrun with 2 CPU processes (gloo), then a resume from its checkpoint."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


def _torchrun(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mobyssl", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_torchrun_pretrain_then_resume(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    common = ["pretrain", *tiny_overrides, f"output_dir={run}"]
    out = _torchrun(*common, "train.max_steps=2", "train.knn_every=-1", cwd=tmp_path)
    assert "batch 32 (2 x 16)" in out
    state = torch.load(run / "checkpoint.pth", weights_only=True)
    assert state["global_step"] == 2
    assert int(state["method"]["criterion.queue_1.ptr"]) == 64  # 2 steps x global batch 32: keys gathered
    # BatchNorms were synchronised during training but are saved as plain BatchNorm state.
    assert "projector.net.1.running_mean" in state["method"]
    # Each rank's RNG (drop path) is saved, and the two streams differ.
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])

    # The resumed run continues with the checkpoint's config; k-NN at the end is a safe change.
    out = _torchrun(*common, "train.max_steps=4", "train.knn_every=0", "--resume", cwd=tmp_path)
    assert "resumed from" in out and "knn_top1_k20" in out and "train.knn_every -1 -> 0" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Only rank 0 writes: each step appears once.
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]
    knn = [r for r in records if r["type"] == "knn"]
    assert len(knn) == 1 and 0 <= knn[0]["knn_top1_k20"] <= 100
    assert torch.load(run / "checkpoint.pth", weights_only=True)["global_step"] == 4


def test_distributed_evaluation_matches_one_process(tmp_path, tiny_overrides):
    from mobyssl.cli import main
    from mobyssl.config import load_config
    from mobyssl.train.trainer import pretrain

    run = tmp_path / "run"
    pretrain(load_config("quickstart", [*tiny_overrides, f"output_dir={run}", "train.max_steps=2",
                                        "train.knn_every=-1"]))
    ckpt = str(run / "checkpoint.pth")
    assert main(["knn", "--checkpoint", ckpt, "--output", str(tmp_path / "one.json")]) == 0
    _torchrun("knn", "--checkpoint", ckpt, "--output", str(tmp_path / "two.json"), cwd=tmp_path)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert set(one) == set(two) and one["model"] == two["model"]
    for k in one:  # every test image and bank image embedded once, gathered: the same votes
        if k.startswith("knn_"):
            assert abs(one[k] - two[k]) < 1e-9, (k, one[k], two[k])
    out = _torchrun("linear", "--checkpoint", ckpt, "linear.epochs=1", "linear.batch_size=128",
                    "data.eval_train=bundled:cifar10-sample-test", "--output", str(tmp_path / "lin.json"), cwd=tmp_path)
    lin = json.loads((tmp_path / "lin.json").read_text())
    assert 0 <= lin["linear_top1"] <= 100 and "linear epoch 1/1" in out


def test_distributed_fewshot_correspondence_and_finetune(tmp_path, tiny_overrides):
    from mobyssl.cli import main
    from mobyssl.config import load_config
    from mobyssl.train.trainer import pretrain

    run = tmp_path / "run"
    pretrain(load_config("quickstart", [*tiny_overrides, f"output_dir={run}", "train.max_steps=2",
                                        "train.knn_every=-1"]))
    ckpt = str(run / "checkpoint.pth")
    for command, extra in (("fewshot", ["fewshot.shots=[1, 5]", "fewshot.trials=2"]),
                           ("correspondence", ["correspondence.top_k=5", "correspondence.jitter_prob=0"])):
        assert main([command, "--checkpoint", ckpt, *extra, "--output", str(tmp_path / f"{command}1.json")]) == 0
        _torchrun(command, "--checkpoint", ckpt, *extra, "--output", str(tmp_path / f"{command}2.json"), cwd=tmp_path)
        one = json.loads((tmp_path / f"{command}1.json").read_text())
        two = json.loads((tmp_path / f"{command}2.json").read_text())
        # Features gathered back into the dataset's order: the same draws, the same classifiers, the same scores.
        for key in one:
            if key not in ("model", "command"):
                assert abs(one[key] - two[key]) < 1e-4, (command, key, one[key], two[key])  # sums in float32
    out = _torchrun("finetune", "--checkpoint", ckpt, "finetune.epochs=1", "finetune.batch_size=64",
                    f"finetune.output_dir={tmp_path / 'ft'}", cwd=tmp_path)
    assert "epoch 1/1: top-1" in out and "batch 64" in out
    records = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["type"] == "eval"] == [1]  # rank 0 alone writes
    # visualize: rank 0 draws, the other process ends without touching --out (no race for the files).
    # (--run-dir and --number: torchrun's parser would take --run and --num for its --run-path and --numa-binding.)
    out = _torchrun("visualize", "--run-dir", str(run), "--number", "2", "--k", "3", "--out",
                    str(tmp_path / "pictures"), cwd=tmp_path)
    assert main(["visualize", "--run", str(run), "--num", "2", "--k", "3", "--out", str(tmp_path / "pictures1")]) == 0
    drawn = sorted(p.name for p in (tmp_path / "pictures").iterdir())
    assert out.count("wrote ") == 1 and drawn == sorted(p.name for p in (tmp_path / "pictures1").iterdir())
    assert "curves.png" in drawn and len(drawn) >= 4


def test_torchrun_streams_each_process_its_own_shards(tmp_path, tiny_overrides):
    from helpers import write_shards

    # 5 shards: process 0 reads shards 0, 2, 4 (12 + 10 + 16 images), process 1 shards 1, 3 (18 + 20). With 16
    # images per process and step, process 0 has 2 steps of data and process 1 has 2: an epoch is 2 steps.
    write_shards(tmp_path / "shards", [12, 18, 10, 20, 16])
    run = tmp_path / "run"
    out = _torchrun("pretrain", *tiny_overrides, f"output_dir={run}", f"data.train={tmp_path / 'shards'}",
                    "train.knn_every=-1", cwd=tmp_path)
    assert "38 images in 3 shards (process 0 of 2: its own 3 of 5 shards)" in out
    assert "2 steps/epoch x 2 epochs" in out
    assert torch.load(run / "checkpoint.pth", weights_only=True)["global_step"] == 4
