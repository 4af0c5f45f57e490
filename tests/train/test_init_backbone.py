"""``model.init``: pre-training starts from given backbone weights, for every method, and bad files stop early."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mobyssl.build import build_backbone, build_method
from mobyssl.config import load_config
from mobyssl.errors import CheckpointError
from mobyssl.train.trainer import init_backbone, pretrain

# Small heads for each quickstart recipe, so building the method takes well under a second.
SMALL = {
    "quickstart": ["method.proj_hidden_dim=32", "method.pred_hidden_dim=32", "method.proj_dim=16"],
    "mocov3_quickstart": ["method.proj_hidden_dim=32", "method.proj_dim=16"],
    "dino_quickstart": ["method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16"],
    "esvit_quickstart": ["method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16"],
    "sit_quickstart": ["method.hidden_dim=32", "method.out_dim=16"],
}


def _weights(cfg, path, seed=5):
    torch.manual_seed(seed)
    source = build_backbone(cfg)
    torch.save(source.state_dict(), path)
    return source.state_dict()


@pytest.mark.parametrize("recipe", sorted(SMALL))
def test_the_trained_backbone_and_its_momentum_copy_start_from_the_weights(recipe, tmp_path):
    cfg = load_config(recipe, SMALL[recipe])
    expected = _weights(cfg, tmp_path / "init.pth")
    torch.manual_seed(0)
    method = build_method(cfg)
    heads_before = {k: v.clone() for k, v in method.state_dict().items()
                    if not k.startswith(type(method).backbone_key + ".")}
    init_backbone(method, str(tmp_path / "init.pth"), log=lambda *a: None)
    # Every backbone-shaped submodule (online and momentum encoders, student and teacher) holds the weights,
    # the evaluated one among them.
    backbones = {name: m for name, m in method.named_modules() if name and set(expected) <= set(m.state_dict())}
    assert len(backbones) == 2 and any(m is method.backbone for m in backbones.values())
    for name, net in backbones.items():
        got = net.state_dict()
        for key, value in expected.items():
            assert torch.equal(got[key], value), (name, key)
    # Heads keep their fresh initialisation (only backbones are replaced).
    changed = [k for k, v in method.state_dict().items() if k in heads_before and not torch.equal(heads_before[k], v)]
    backbone_like = [k for k in changed if any(k.endswith(b) for b in expected)]
    assert changed == backbone_like


def test_pretrain_starts_from_the_weights_and_says_so(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.max_steps=1", "train.knn_every=-1", "train.lr=1e-12", "train.min_lr=0", "train.warmup_lr=0", "train.warmup_epochs=0")
    expected = _weights(cfg, tmp_path / "init.pth")
    cfg = tiny_cfg("train.max_steps=1", "train.knn_every=-1", "train.lr=1e-12", "train.min_lr=0", "train.warmup_lr=0", "train.warmup_epochs=0",
                   f"model.init={tmp_path / 'init.pth'}")
    lines = []
    pretrain(cfg, log=lines.append)
    assert any(f"backbone initialised from {tmp_path / 'init.pth'}" in str(line) for line in lines)
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    for key, value in expected.items():  # one step at lr 1e-12 leaves them (almost) as loaded
        assert torch.allclose(state["method"][f"encoder.{key}"].float(), value, atol=1e-6), key


def test_a_missing_file_names_the_key_before_anything_is_written(tiny_cfg, tmp_path):
    cfg = tiny_cfg(f"model.init={tmp_path / 'nope.pth'}")
    with pytest.raises(CheckpointError, match=r"config key 'model.init': checkpoint .*nope.pth does not exist"):
        pretrain(cfg)
    assert not (tmp_path / "run").exists()


def test_weights_of_another_architecture_are_refused_with_the_keys(tiny_cfg, tmp_path):
    other = load_config("quickstart", ["model.kwargs={depth: 3}"])
    _weights(other, tmp_path / "deeper.pth")
    cfg = tiny_cfg(f"model.init={tmp_path / 'deeper.pth'}")  # TINY has depth 2
    with pytest.raises(CheckpointError, match=r"model.init=.*deeper.pth.*blocks\.2\."):
        pretrain(cfg)
    assert not (tmp_path / "run").exists()


def test_command_line_init_from_a_published_dino_checkpoint(tiny_overrides, tmp_path):
    cfg = load_config("quickstart", tiny_overrides)
    sd = _weights(cfg, tmp_path / "unused.pth")
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()},
                "student": {f"module.backbone.{k}": v for k, v in sd.items()}}, tmp_path / "dino.pth")
    proc = subprocess.run([sys.executable, "-m", "mobyssl", "pretrain", *tiny_overrides, "train.max_steps=1",
                           "train.knn_every=-1", f"output_dir={tmp_path / 'run'}", f"model.init={tmp_path / 'dino.pth'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "backbone initialised from" in proc.stdout + proc.stderr
