import json
from pathlib import Path

import pytest
import timm
import torch
from helpers import metrics_records

from mobyssl.cli import main
from mobyssl.errors import RunDirError
from mobyssl.models.momentum import cosine_momentum
from mobyssl.train.checkpoint import CheckpointError, load_checkpoint
from mobyssl.train.trainer import pretrain


def test_pretrain_writes_outputs_and_checkpoint(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=3")
    result = pretrain(cfg)
    run = Path(cfg.output_dir)
    assert result["global_step"] == 3
    assert (run / "config.yaml").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    train = metrics_records(run, "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["img_per_s"] > 0 for r in train)
    # Momentum follows the cosine schedule over the full run (2 epochs x 31 steps), not max_steps.
    assert train[0]["momentum"] == pytest.approx(cosine_momentum(1, 62, 0.99), abs=1e-6)
    knn = metrics_records(run, "knn")
    assert knn and 0 <= knn[-1]["knn_top1_k20"] <= 100 and "knn_top5_k200" in knn[-1]
    state = load_checkpoint(run / "checkpoint.pth")
    assert {"method", "optimizer", "scaler", "rng", "epoch", "global_step", "config"} <= set(state)
    assert state["global_step"] == 3
    assert "criterion.queue_1.queue" in state["method"] and int(state["method"]["criterion.queue_1.ptr"]) == 96


def test_resume_continues_step_counter_queue_and_momentum(tiny_cfg):
    pretrain(tiny_cfg("train.max_steps=2", "train.knn_every=-1"))
    cfg = tiny_cfg("train.max_steps=4", "train.knn_every=-1")
    first = load_checkpoint(Path(cfg.output_dir) / "checkpoint.pth")
    result = pretrain(cfg, resume=True)
    assert result["global_step"] == 4
    run = Path(cfg.output_dir)
    steps = [r["step"] for r in metrics_records(run, "train")]
    assert steps == [1, 2, 3, 4]  # the resumed run logs steps 3 and 4, not 1 and 2 again
    resumed = [r for r in metrics_records(run, "train") if r["step"] == 3][0]
    assert resumed["momentum"] == pytest.approx(cosine_momentum(3, 62, 0.99), abs=1e-6)
    state = load_checkpoint(run / "checkpoint.pth")
    assert int(state["method"]["criterion.queue_1.ptr"]) == 0  # 4 x 32 = 128 = queue size: wrapped
    assert not torch.equal(state["method"]["encoder.cls_token"], first["method"]["encoder.cls_token"])


def test_resume_without_checkpoint_is_a_clear_error(tiny_cfg):
    with pytest.raises(CheckpointError, match="no checkpoint that loads"):
        pretrain(tiny_cfg(), resume=True)


def test_bf16_autocast_on_cpu(tiny_cfg):
    result = pretrain(tiny_cfg("train.max_steps=2", "train.amp=bf16", "train.knn_every=-1"))
    assert result["global_step"] == 2


def test_bn_variant_trains(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=1", "train.knn_every=-1", "model.backbone=swin_mini_patch2_window4_32",
                   "model.kwargs={depths: [1, 1, 1, 1]}", "model.norm_before_mlp=bn")
    assert pretrain(cfg)["global_step"] == 1


def test_knn_linear_and_export_from_checkpoint(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg("train.max_steps=2", "train.knn_every=-1")
    pretrain(cfg)
    ckpt = f"{cfg.output_dir}/checkpoint.pth"
    out_json = tmp_path / "knn.json"
    assert main(["knn", "--checkpoint", ckpt, "--output", str(out_json)]) == 0
    res = json.loads(out_json.read_text())
    assert set(res) == {"knn_top1_k20", "knn_top5_k20", "knn_top1_k200", "knn_top5_k200", "model", "command"}
    assert res["command"] == "knn" and res["model"].startswith(f"checkpoint {ckpt} (step 2")
    assert main(["linear", "--checkpoint", ckpt, "linear.mode=fast", "linear.epochs=2"]) == 0
    assert "linear_top1" in capsys.readouterr().out
    exported = tmp_path / "backbone.pth"
    assert main(["export", "--checkpoint", ckpt, "--output", str(exported)]) == 0
    # The export loads into a plain timm model built with the preset's arguments.
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4,
                              embed_dim=128, depth=2, num_heads=4)
    model.load_state_dict(torch.load(exported, weights_only=True))
    state = load_checkpoint(ckpt)
    assert torch.equal(model.cls_token, state["method"]["encoder.cls_token"])


def test_full_linear_probe_runs(tiny_cfg, capsys):
    cfg = tiny_cfg("train.max_steps=1", "train.knn_every=-1")
    pretrain(cfg)
    ckpt = f"{cfg.output_dir}/checkpoint.pth"
    assert main(["linear", "--checkpoint", ckpt, "linear.epochs=1", "linear.batch_size=256",
                 "data.eval_train=bundled:cifar10-sample-test"]) == 0
    assert "linear_top1" in capsys.readouterr().out


@pytest.mark.gpu
def test_pretrain_on_gpu_in_bf16(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=3", "train.device=cuda", "train.amp=auto")
    result = pretrain(cfg)
    assert result["global_step"] == 3 and result["knn_top1_k20"] >= 0


def test_fresh_run_refuses_an_output_dir_that_holds_a_run(tiny_cfg):
    pretrain(tiny_cfg("train.max_steps=1", "train.knn_every=-1"))
    before = (Path(tiny_cfg().output_dir) / "checkpoint.pth").resolve().read_bytes()
    with pytest.raises(RunDirError, match="--resume"):
        pretrain(tiny_cfg("train.max_steps=2", "train.knn_every=-1"))
    assert (Path(tiny_cfg().output_dir) / "checkpoint.pth").resolve().read_bytes() == before
