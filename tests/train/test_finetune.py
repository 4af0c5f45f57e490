"""``mobyssl finetune``: the recipe's pieces, exact resume after a stop, and bad input."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from mobyssl.build import build_backbone
from mobyssl.cli import main
from mobyssl.errors import CheckpointError, DataError, RunDirError
from mobyssl.train import finetune as ft
from mobyssl.train.checkpoint import load_checkpoint
from mobyssl.train.trainer import train_step

FAST = ["finetune.epochs=2", "finetune.batch_size=64", "finetune.warmup_epochs=1", "train.log_every=4"]


def _run(tiny_cfg, out, *overrides, resume=False):
    cfg = tiny_cfg(*FAST, *overrides)
    torch.manual_seed(0)  # the same backbone each time
    backbone = build_backbone(cfg, drop_path_rate=cfg.finetune.drop_path)
    return ft.finetune(cfg, backbone, out, torch.device("cpu"), resume=resume, log=lambda *a: None)


def test_train_step_scales_each_groups_lr_by_its_layer_decay():
    params = [torch.nn.Parameter(torch.ones(2)) for _ in range(3)]
    opt = torch.optim.SGD([{"params": [params[0]], "lr_scale": 0.5}, {"params": [params[1]], "lr_scale": 0.25},
                           {"params": [params[2]]}], lr=1.0)

    class Quadratic(torch.nn.Module):
        def forward(self, views):
            return {"loss": sum((p ** 2).sum() for p in params)}

        def on_after_backward(self, epoch):
            pass

    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=2**30)
    train_step(Quadratic(), [torch.zeros(1)], opt, scaler, 0.1, None)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.025, 0.1])
    assert params[0].detach().tolist() == pytest.approx([0.9, 0.9])  # 1 - 0.05 * 2
    assert params[2].detach().tolist() == pytest.approx([0.8, 0.8])


def test_the_optimizer_decays_the_lr_layer_by_layer(tiny_cfg):
    from timm.optim import create_optimizer_v2

    cfg = tiny_cfg()
    model = ft.Classifier(build_backbone(cfg), 10)
    opt = create_optimizer_v2(model.model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    depth = len(model.model.blocks)
    assert scale_of[id(model.model.head.weight)] == 1.0
    assert scale_of[id(model.model.blocks[-1].mlp.fc1.weight)] == 0.5
    assert scale_of[id(model.model.patch_embed.proj.weight)] == pytest.approx(0.5 ** (depth + 1))


def test_the_head_starts_near_zero_and_the_loss_is_cross_entropy_on_soft_targets():
    backbone = build_backbone(__import__("mobyssl.config", fromlist=["load_config"]).load_config(
        "quickstart", ["model.kwargs={depth: 1}"]))
    model = ft.Classifier(backbone, 7)
    assert model.model.head.weight.abs().max() < 1e-3 and not model.model.head.bias.any()
    logits = torch.randn(4, 7)
    labels = torch.tensor([0, 3, 6, 2])
    hard = torch.nn.functional.one_hot(labels, 7).float()
    assert torch.allclose(ft.SoftTargetLoss()(logits, hard), torch.nn.functional.cross_entropy(logits, labels))


def test_without_mixup_targets_are_smoothed_one_hot(tiny_cfg):
    cfg = tiny_cfg("finetune.mixup=0", "finetune.cutmix=0", "finetune.label_smoothing=0.2")
    images, targets = ft.make_mixup(cfg, 4)(torch.zeros(2, 3, 4, 4), torch.tensor([1, 3]))
    assert torch.allclose(targets, torch.tensor([[0.05, 0.85, 0.05, 0.05], [0.05, 0.05, 0.05, 0.85]]))


def test_mixup_draws_depend_on_seed_and_step_and_leave_numpy_alone(tiny_cfg):
    mixup = ft.make_mixup(tiny_cfg(), 10)
    images, labels = torch.rand(8, 3, 8, 8), torch.arange(8)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = ft._mix(mixup, images.clone(), labels, seed=0, step=5)
    b = ft._mix(mixup, images.clone(), labels, seed=0, step=5)
    c = ft._mix(mixup, images.clone(), labels, seed=0, step=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert np.array_equal(np.random.get_state()[1], before)
    assert torch.allclose(a[1].sum(1), torch.ones(8))  # soft targets


def test_posterize_to_zero_bits_gives_black_instead_of_an_error():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8))
    assert not np.asarray(ft._posterize(img, 0)).any()
    assert np.array_equal(np.asarray(ft._posterize(img, 2)), np.asarray(img) & 0xC0)
    assert ft._posterize(img, 8) is img


@pytest.mark.slow
def test_a_stopped_run_resumed_ends_where_an_uninterrupted_one_does(tiny_cfg, tmp_path, monkeypatch):
    ref = _run(tiny_cfg, tmp_path / "ref")
    assert 0 <= ref["top1"] <= 100
    records = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["type"] == "eval"] == [1, 2]

    real_mix, calls = ft._mix, {"n": 0}

    def stop_at_step_20(*args, **kwargs):  # mid-epoch 2 (15 steps per epoch): SIGTERM, as a scheduler would
        calls["n"] += 1
        if calls["n"] == 20:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_mix(*args, **kwargs)

    monkeypatch.setattr(ft, "_mix", stop_at_step_20)
    from mobyssl.train.guards import TrainingInterrupted

    with pytest.raises(TrainingInterrupted, match="step 20"):
        _run(tiny_cfg, tmp_path / "stopped")
    monkeypatch.setattr(ft, "_mix", real_mix)
    resumed = _run(tiny_cfg, tmp_path / "stopped", resume=True)
    a = load_checkpoint(tmp_path / "ref" / "checkpoint.pth")
    b = load_checkpoint(tmp_path / "stopped" / "checkpoint.pth")
    assert a["global_step"] == b["global_step"] == 30
    for key, value in a["finetune"].items():
        assert torch.equal(value, b["finetune"][key]), key
    assert resumed["top1"] == ref["top1"]
    # The fine-tuned backbone (without its head) is what the evaluation commands read from such a checkpoint.
    assert main(["knn", "--checkpoint", str(tmp_path / "ref" / "checkpoint.pth"), "knn.k=[5]"]) == 0


@pytest.mark.slow
def test_bf16_and_compiled_fine_tunes_follow_the_eager_float32_one(tiny_cfg, tmp_path, monkeypatch):
    """``train.amp=bf16`` runs every Linear of the backbone and the new head in bf16 (none without it);
    ``train.compile=true`` gives the eager losses up to float rounding; all finish an epoch with finite losses."""
    linear_dtypes = []
    real_init = ft.Classifier.__init__

    def init_with_hooks(self, backbone, num_classes):
        real_init(self, backbone, num_classes)
        for module in self.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda m, args, out: linear_dtypes.append(out.dtype))

    from torch._dynamo.utils import counters

    losses, dtypes = {}, {}
    for name, amp, overrides in (("eager", None, []), ("bf16", torch.bfloat16, []),
                                 ("compiled", None, ["train.compile=true"])):
        monkeypatch.setattr(ft.Classifier, "__init__", init_with_hooks if name != "compiled" else real_init)
        linear_dtypes.clear()
        cfg = tiny_cfg(*FAST, "finetune.epochs=1", *overrides)
        torch.manual_seed(0)
        backbone = build_backbone(cfg, drop_path_rate=cfg.finetune.drop_path)
        torch._dynamo.reset()
        counters["frames"].clear()
        result = ft.finetune(cfg, backbone, tmp_path / name, torch.device("cpu"), amp_dtype=amp, log=lambda *a: None)
        assert (counters["frames"]["ok"] > 0) == (name == "compiled")  # dynamo compiled the step, and only then
        assert 0 <= result["top1"] <= 100
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in records if r["type"] == "train"]
        dtypes[name] = set(linear_dtypes)
        assert len(losses[name]) >= 3 and all(np.isfinite(losses[name])), losses[name]
    assert dtypes == {"eager": {torch.float32}, "bf16": {torch.bfloat16}, "compiled": set()}
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-3)
    assert losses["bf16"][0] == pytest.approx(losses["eager"][0], rel=2e-2) and losses["bf16"] != losses["eager"]


def test_unlabelled_training_images_are_refused_naming_the_key(tiny_cfg, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(flat / f"{i}.png")
    with pytest.raises(DataError, match="data.train=.*no class folders.*data.eval_train"):
        _run(tiny_cfg, tmp_path / "out", f"data.train={flat}")
    assert not (tmp_path / "out").exists()


def test_a_folder_with_files_is_refused_and_resume_needs_a_checkpoint(tiny_cfg, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError):
        _run(tiny_cfg, busy)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    with pytest.raises(CheckpointError, match="no fine-tuning checkpoint"):
        _run(tiny_cfg, tmp_path / "empty", resume=True)


def test_the_quickstart_recipe_fine_tunes_on_its_sample_as_it_is(capsys):
    """The README's `mobyssl finetune --checkpoint runs/quickstart/checkpoint.pth` needs no override."""
    code = main(["finetune", "--config", "quickstart", "--random-init", "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0 and "7 steps/epoch x 30 epochs" in out, err


def test_cli_dry_run_names_the_default_output_folder(capsys, tmp_path):
    code = main(["finetune", "--config", "quickstart", "--random-init", "--dry-run", "finetune.epochs=3",
                 "finetune.batch_size=64"])
    out, err = capsys.readouterr()
    assert code == 0 and "runs/finetune_random_init" in out and "15 steps/epoch x 3 epochs" in out
    assert "finetune.warmup_epochs=5 is longer than finetune.epochs=3: shortened to 0.5" in err


def test_a_new_run_that_fails_before_its_first_step_leaves_no_folder(tiny_cfg, tmp_path, monkeypatch):
    import mobyssl.train.trainer as trainer

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(trainer, "train_step", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        _run(tiny_cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # so the same command can simply be run again
