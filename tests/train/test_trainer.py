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


def test_pretrain_writes_outputs_and_checkpoint(tiny_cfg, tmp_path):
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
    # One k-NN evaluation, at the end (knn_every=10 epochs is not due), of every (k, top-n) the config asks for.
    knn = metrics_records(run, "knn")
    assert len(knn) == 1 and knn[0]["step"] == 3
    keys = {"knn_top1_k20", "knn_top5_k20", "knn_top1_k200", "knn_top5_k200"}
    assert set(knn[0]) == keys | {"type", "step", "time", "epoch"}
    assert set(result) == keys | {"global_step", "trained_steps"}
    for k in keys:
        assert knn[0][k] == pytest.approx(result[k], rel=1e-6), k
    # The same numbers as `mobyssl knn` on the final checkpoint, exactly: the evaluation during training is the
    # evaluation of the checkpoint (eval mode, no drop path), not of the network in training mode.
    assert main(["knn", "--checkpoint", str(run / "checkpoint.pth"), "--output", str(tmp_path / "knn.json")]) == 0
    cli = json.loads((tmp_path / "knn.json").read_text())
    assert {k: cli[k] for k in keys} == {k: result[k] for k in keys}
    for n in (20, 200):  # 500 test images: multiples of 0.2%, top-5 at least top-1, better than chance (10%)
        top1, top5 = result[f"knn_top1_k{n}"], result[f"knn_top5_k{n}"]
        assert round(top1 * 5) == pytest.approx(top1 * 5) and round(top5 * 5) == pytest.approx(top5 * 5)
        assert 10 < top1 <= top5 < 100
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


def test_bf16_autocast_on_cpu(tiny_cfg, tmp_path, monkeypatch):
    """train.amp=bf16 runs every Linear (backbone and heads) in bf16, train.amp=off none; the first step's loss
    (same seed, same data) then differs by bf16 rounding only."""
    from collections import Counter

    from mobyssl import build

    dtypes = []
    build_method = build.build_method

    def build_with_hooks(cfg):
        method = build_method(cfg)
        for mod in method.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
        return method

    monkeypatch.setattr(build, "build_method", build_with_hooks)
    losses, seen = {}, {}
    for amp in ("bf16", "off"):
        dtypes.clear()
        run = tmp_path / amp
        result = pretrain(tiny_cfg("train.max_steps=1", f"train.amp={amp}", "train.knn_every=-1", f"output_dir={run}"))
        assert result["global_step"] == 1
        losses[amp] = metrics_records(run)[0]["loss"]
        seen[amp] = Counter(dtypes)
    # 2 layers x 4 Linears per encoder, 2 per head; online encoder, projector, predictor and target encoder,
    # projector: (8 + 2 + 2 + 8 + 2) Linears x 2 views.
    assert seen["bf16"] == {torch.bfloat16: 44}
    assert seen["off"] == {torch.float32: 44}
    assert losses["bf16"] != losses["off"]
    assert abs(losses["bf16"] - losses["off"]) < 1e-3 * losses["off"]  # measured: 1.4e-4 relative


def test_bn_variant_trains(tiny_cfg):
    """model.norm_before_mlp=bn: every Swin block of both encoders has a TokenBatchNorm as norm2, whose
    statistics move during training and are saved under BatchNorm's keys, so that the checkpoint loads into
    the synchronised form (GlobalBatchNorm) that multi-process runs convert to."""
    from mobyssl import build
    from mobyssl.models import TokenBatchNorm
    from mobyssl.models.sync_bn import GlobalBatchNorm, convert_sync_batchnorm

    cfg = tiny_cfg("train.max_steps=1", "train.knn_every=-1", "model.backbone=swin_mini_patch2_window4_32",
                   "model.kwargs={depths: [1, 1, 1, 1]}", "model.norm_before_mlp=bn")
    assert pretrain(cfg)["global_step"] == 1
    state = load_checkpoint(Path(cfg.output_dir) / "checkpoint.pth")["method"]
    fresh = build.build_method(cfg)
    blocks = [name for name, mod in fresh.named_modules() if type(mod).__name__ == "SwinTransformerBlock"]
    assert len(blocks) == 8 and sum(b.startswith("encoder_target.") for b in blocks) == 4  # 4 stages x 1, x 2
    bn_keys = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    for b in blocks:
        assert isinstance(fresh.get_submodule(b).norm2, TokenBatchNorm)
        assert {k for k in state if k.startswith(f"{b}.norm2.")} == {f"{b}.norm2.bn.{k}" for k in bn_keys}
        # One step: one forward pass per view through each encoder, each in training mode.
        assert int(state[f"{b}.norm2.bn.num_batches_tracked"]) == 2, b
        assert (state[f"{b}.norm2.bn.running_mean"] - 0).abs().max() > 1e-3, b
        assert (state[f"{b}.norm2.bn.running_var"] - 1).abs().max() > 1e-3, b
    # Synchronised form: every BatchNorm (norm2 and heads) converted, the checkpoint loads into it unchanged, and
    # the target's BatchNorm weights stay frozen.
    synced = convert_sync_batchnorm(fresh, torch.device("cpu"))
    synced.load_state_dict(state, strict=True)
    norms = [m for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 8 + 3 and all(type(m) is GlobalBatchNorm for m in norms)
    assert all(isinstance(synced.get_submodule(b).norm2.bn, GlobalBatchNorm) for b in blocks)
    for name, p in synced.named_parameters():
        assert p.requires_grad == (not name.startswith(("encoder_target.", "projector_target."))), name
    for k, v in synced.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_knn_linear_and_export_from_checkpoint(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg("train.max_steps=2", "train.knn_every=-1")
    pretrain(cfg)
    ckpt = f"{cfg.output_dir}/checkpoint.pth"
    out_json = tmp_path / "knn.json"
    assert main(["knn", "--checkpoint", ckpt, "--output", str(out_json)]) == 0
    res = json.loads(out_json.read_text())
    assert set(res) == {"knn_top1_k20", "knn_top5_k20", "knn_top1_k200", "knn_top5_k200", "model", "command"}
    assert res["command"] == "knn" and res["model"].startswith(f"checkpoint {ckpt} (step 2")
    lin_json = tmp_path / "linear.json"
    assert main(["linear", "--checkpoint", ckpt, "linear.mode=fast", "linear.epochs=2", "--output", str(lin_json)]) == 0
    lin = json.loads(lin_json.read_text())
    assert set(lin) == {"linear_top1", "linear_top5", "model", "command"} and lin["command"] == "linear"
    printed = capsys.readouterr().out
    assert f"linear_top1: {lin['linear_top1']:.2f}" in printed and f"linear_top5: {lin['linear_top5']:.2f}" in printed
    exported = tmp_path / "backbone.pth"
    assert main(["export", "--checkpoint", ckpt, "--output", str(exported)]) == 0
    # The export loads into a plain timm model built with the preset's arguments.
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4,
                              embed_dim=128, depth=2, num_heads=4)
    model.load_state_dict(torch.load(exported, weights_only=True))
    state = load_checkpoint(ckpt)
    assert torch.equal(model.cls_token, state["method"]["encoder.cls_token"])

    # Both evaluations equal the protocol applied by hand: the plain timm model in eval mode embeds the bank
    # (data.train) and the test split in batches of knn.batch_size; k-NN and the fast probe run on those features.
    from mobyssl.build import build_eval_datasets
    from mobyssl.eval import knn_classify, linear_probe_fast

    def embed(ds):
        feats, labels = [], []
        with torch.no_grad():
            for start in range(0, len(ds), cfg.knn.batch_size):
                items = [ds[i] for i in range(start, min(start + cfg.knn.batch_size, len(ds)))]
                feats.append(model(torch.stack([x for x, _ in items])))
                labels += [y for _, y in items]
        return torch.cat(feats), torch.tensor(labels)

    model.eval()
    bank, test = build_eval_datasets(cfg)
    (ftr, ytr), (fte, yte) = embed(bank), embed(test)
    assert ftr.shape == (1000, 128) and fte.shape == (500, 128)
    expected = knn_classify(ftr, ytr, fte, yte, ks=(20, 200), temperature=0.07, num_classes=10)
    assert {k: res[k] for k in expected} == expected
    probe = linear_probe_fast(ftr, ytr, fte, yte, 10, epochs=2, batch_size=1024, lr=1.0, lr_ref_batch=512, seed=0)
    assert {k: lin[k] for k in probe} == probe
    assert 10 < lin["linear_top1"] <= lin["linear_top5"] < 100  # 10 classes: better than chance


def test_full_linear_probe_runs(tiny_cfg, capsys, tmp_path):
    cfg = tiny_cfg("train.max_steps=1", "train.knn_every=-1")
    pretrain(cfg)
    ckpt = f"{cfg.output_dir}/checkpoint.pth"
    out = tmp_path / "linear.json"
    # 500 training images in batches of 256 (the last, partial one dropped): 2 SGD steps over 2 epochs.
    assert main(["linear", "--checkpoint", ckpt, "linear.epochs=2", "linear.batch_size=256",
                 "data.eval_train=bundled:cifar10-sample-test", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert set(res) == {"linear_top1", "linear_top5", "model", "command"} and res["command"] == "linear"
    assert "linear epoch 1/2" in printed and "linear epoch 2/2" in printed
    assert f"linear_top1: {res['linear_top1']:.2f}" in printed and f"linear_top5: {res['linear_top5']:.2f}" in printed
    top1, top5 = res["linear_top1"], res["linear_top5"]
    # Measured on all 500 test images (multiples of 0.2%); two steps lift it above chance (10 classes; an untrained
    # head of std 0.01 gives about 7%).
    assert round(top1 * 5) == pytest.approx(top1 * 5, abs=1e-4) and round(top5 * 5) == pytest.approx(top5 * 5, abs=1e-4)
    assert 12 < top1 <= top5 < 100


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
