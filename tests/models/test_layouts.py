"""Published checkpoint layouts (DINO, EsViT, MoBY, original Swin) convert to timm's and give the same features.

Each test writes a checkpoint the way the authors' code does (by the inverse key mapping from one of our
backbones, with their extra entries: heads, optimizer state, argparse / yacs metadata, Swin's buffers), loads it
through ``load_checkpoint`` + ``backbone_state_dict`` into a fresh backbone, and compares features bit for bit.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types

import pytest
import torch

from mobyssl.build import build_backbone
from mobyssl.config import load_config
from mobyssl.errors import CheckpointError
from mobyssl.models.layouts import original_swin_to_timm, timm_to_original_swin
from mobyssl.train.checkpoint import backbone_state_dict, load_backbone_weights, load_checkpoint


def _pair(recipe):
    """Two backbones of a recipe with different random weights: the source and the one loaded into."""
    cfg = load_config(recipe)
    torch.manual_seed(0)
    source = build_backbone(cfg).eval()
    torch.manual_seed(1)
    target = build_backbone(cfg).eval()
    return cfg, source, target


def _same_features(a, b):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return torch.equal(a.forward_features(x), b.forward_features(x))


def _original_swin(sd, depths):
    """Our (timm) Swin keys -> the original layout, with the buffers the original code saves."""
    out = timm_to_original_swin(sd)
    for stage, depth in enumerate(depths):
        for block in range(depth):
            out[f"layers.{stage}.blocks.{block}.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
            if block % 2:
                out[f"layers.{stage}.blocks.{block}.attn_mask"] = torch.zeros(4, 16, 16)
    return out


def _load_into(target, path):
    load_backbone_weights(target, backbone_state_dict(load_checkpoint(path), str(path)), str(path))


def test_original_swin_layout_round_trips_and_moves_patch_merging():
    _, swin, _ = _pair("esvit_quickstart")
    sd = swin.state_dict()
    old = timm_to_original_swin(sd)
    last = len(swin.layers) - 1  # timm: stages 1..last merge patches first; the original: stages 0..last-1, last
    assert f"layers.{last}.downsample.reduction.weight" in sd and "layers.0.downsample.reduction.weight" not in sd
    assert "layers.0.downsample.reduction.weight" in old and f"layers.{last}.downsample.reduction.weight" not in old
    assert original_swin_to_timm(old).keys() == sd.keys()


def test_dino_checkpoint_loads_the_teachers_backbone(tmp_path):
    _, source, target = _pair("dino_quickstart")
    teacher = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    teacher["head.last_layer.weight_g"] = torch.ones(8, 1)
    student = {f"module.backbone.{k}": v + 1 for k, v in source.state_dict().items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": student, "teacher": teacher, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3,
                "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536),
                "dino_loss": {"center": torch.zeros(1, 8)}}, path)
    assert not _same_features(source, target)
    _load_into(target, path)
    assert _same_features(source, target)  # the teacher's weights, not the student's (+1)


def test_esvit_checkpoint_with_original_swin_layout(tmp_path):
    _, source, target = _pair("esvit_quickstart")
    depths = [len(stage.blocks) for stage in source.layers]
    teacher = {f"backbone.{k}": v for k, v in _original_swin(source.state_dict(), depths).items()}
    teacher["head.mlp.0.weight"] = torch.zeros(4, 4)
    teacher["head_dense.mlp.0.weight"] = torch.zeros(4, 4)
    student = {f"module.{k}": v for k, v in teacher.items()}
    path = tmp_path / "checkpoint0100.pth"
    torch.save({"student": student, "teacher": teacher, "epoch": 100, "args": argparse.Namespace(arch="swin_tiny")},
               path)
    _load_into(target, path)
    assert _same_features(source, target)


def _fake_yacs_node_class():
    """A class pickled as ``yacs.config.CfgNode``, holding what yacs' CfgNode holds (a dict plus attribute state)."""

    class CfgNode(dict):
        def __init__(self, init=None, new_allowed=False):
            super().__init__(init or {})
            self.__dict__["__immutable__"] = False
            self.__dict__["__deprecated_keys__"] = set()
            self.__dict__["__renamed_keys__"] = {}
            self.__dict__["__new_allowed__"] = new_allowed

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    return CfgNode


def test_moby_checkpoint_loads_the_online_encoder_without_yacs(tmp_path, monkeypatch):
    _, source, target = _pair("esvit_quickstart")
    depths = [len(stage.blocks) for stage in source.layers]
    online = _original_swin(source.state_dict(), depths)
    model = {f"encoder.{k}": v for k, v in online.items()}
    model.update({f"encoder_k.{k}": v + 1 for k, v in online.items()})
    model.update({"projector.linear1.weight": torch.zeros(4, 4), "queue1": torch.zeros(4, 8),
                  "queue_ptr": torch.zeros(1, dtype=torch.long)})
    node = _fake_yacs_node_class()
    yacs, yacs_config = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    yacs_config.CfgNode = node
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", yacs_config)
    path = tmp_path / "moby_swin_t_300ep_pretrained.pth"
    torch.save({"model": model, "optimizer": {}, "lr_scheduler": {}, "max_accuracy": 0.0, "epoch": 299,
                "config": node({"MODEL": node({"TYPE": "moby", "NAME": "moby__swin_tiny"}), "SEED": 0})}, path)
    monkeypatch.delitem(sys.modules, "yacs.config")
    monkeypatch.delitem(sys.modules, "yacs")
    state = load_checkpoint(path)
    assert state["config"]["MODEL"]["TYPE"] == "moby"  # read as plain data, yacs not needed
    _load_into(target, path)
    assert _same_features(source, target)  # the online encoder, not encoder_k (+1)


def test_bare_original_swin_state_dict_with_a_classifier(tmp_path):
    _, source, target = _pair("esvit_quickstart")
    depths = [len(stage.blocks) for stage in source.layers]
    sd = {f"module.{k}": v for k, v in _original_swin(source.state_dict(), depths).items()}
    sd["module.head.weight"], sd["module.head.bias"] = torch.zeros(10, 8), torch.zeros(10)
    path = tmp_path / "swin.pth"
    torch.save(sd, path)
    _load_into(target, path)
    assert _same_features(source, target)


def test_unknown_layout_names_what_is_read(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"weights": {"a": torch.zeros(1)}, "step": 3}, path)
    with pytest.raises(CheckpointError, match=r"top-level keys: weights, step.*DINO / EsViT.*MoBY"):
        backbone_state_dict(load_checkpoint(path), str(path))


def test_knn_command_evaluates_a_dino_checkpoint(tmp_path):
    _, source, _ = _pair("dino_quickstart")
    path = tmp_path / "dino.pth"
    torch.save({"student": {f"module.backbone.{k}": v for k, v in source.state_dict().items()},
                "teacher": {f"backbone.{k}": v for k, v in source.state_dict().items()},
                "args": argparse.Namespace(arch="vit_small")}, path)
    proc = subprocess.run([sys.executable, "-m", "mobyssl", "knn", "--checkpoint", str(path), "--config",
                           "dino_quickstart", "data.num_workers=0", "knn.k=[5]"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "knn_top1_k5" in proc.stdout and "DINO checkpoint (its teacher's backbone)" in proc.stdout + proc.stderr


def test_patch_merging_reordered_for_unfold_computes_the_same_function():
    """OpenMMLab merges patches with nn.Unfold (channel-major order); the original Swin concatenates the four
    neighbours. With the reordered norm and reduction weights both give the same output."""
    from mobyssl.models.layouts import _unfold_order

    torch.manual_seed(0)
    b, h, w, c = 2, 4, 6, 3
    x = torch.randn(b, h, w, c)
    norm_w, norm_b, reduction = torch.randn(4 * c), torch.randn(4 * c), torch.randn(2 * c, 4 * c)
    # Original Swin: cat(x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]) -> LayerNorm -> Linear.
    merged = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    original = torch.nn.functional.layer_norm(merged, (4 * c,), norm_w, norm_b) @ reduction.T
    # OpenMMLab: Unfold(2, stride 2) over (B, C, H, W) -> (B, C * 4, L) -> tokens -> LayerNorm -> Linear.
    unfolded = torch.nn.functional.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)
    theirs = torch.nn.functional.layer_norm(unfolded, (4 * c,), _unfold_order(norm_w), _unfold_order(norm_b))
    theirs = theirs @ _unfold_order(reduction).T
    torch.testing.assert_close(theirs, original.reshape(b, -1, 2 * c))


@pytest.mark.parametrize("recipe", ["esvit_quickstart", "quickstart"])
def test_openmmlab_layout_names_every_tensor_once(recipe):
    from mobyssl.models.layouts import to_openmmlab

    _, net, _ = _pair(recipe)
    sd = net.state_dict()
    out = to_openmmlab(net, sd)["state_dict"]
    assert len(out) == len(sd)
    if recipe == "esvit_quickstart":  # mmdet keeps only backbone.* keys; the final norm is stage 3's output norm
        assert all(k.startswith("backbone.") for k in out)
        assert "backbone.stages.0.downsample.reduction.weight" in out and "backbone.norm3.weight" in out
        assert "backbone.stages.0.blocks.0.attn.w_msa.qkv.weight" in out
        assert "backbone.stages.0.blocks.0.ffn.layers.0.0.weight" in out
    else:  # mmseg's ViT loads keys as they are
        assert {"cls_token", "pos_embed", "patch_embed.projection.weight", "ln1.weight",
                "layers.0.attn.attn.in_proj_weight", "layers.0.ffn.layers.1.bias", "layers.0.ln2.bias"} <= set(out)
