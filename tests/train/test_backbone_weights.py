"""Backbone weights out of checkpoints and exports (``backbone_state_dict``) and into a backbone
(``load_backbone_weights``): each method's evaluated network, every accepted layout, every refusal named."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mobyssl.errors import CheckpointError
from mobyssl.methods import DINO, MoBY, get_method
from mobyssl.models import create_backbone
from mobyssl.train.checkpoint import backbone_state_dict, load_backbone_weights


def _tensor(v):
    return torch.full((2,), float(v))


def _checkpoint(method: str | None, weights: dict) -> dict:
    state = {"method": weights, "optimizer": {}}
    if method is not None:
        state["config"] = {"method": {"name": method}}
    return state


def test_each_method_yields_the_network_it_evaluates():
    weights = {"encoder.w": _tensor(1), "encoder_target.w": _tensor(2), "projector.w": _tensor(3),
               "teacher.w": _tensor(4), "student.w": _tensor(5), "teacher_head.w": _tensor(6)}
    moby = backbone_state_dict(_checkpoint("moby", weights))
    assert list(moby) == ["w"] and torch.equal(moby["w"], _tensor(1))  # the online encoder, not the target
    dino = backbone_state_dict(_checkpoint("dino", weights))
    assert list(dino) == ["w"] and torch.equal(dino["w"], _tensor(4))  # the teacher, not the student or a head
    legacy = backbone_state_dict(_checkpoint(None, weights))  # checkpoints from before the config was stored
    assert torch.equal(legacy["w"], _tensor(1))


def test_backbone_key_names_the_backbone_attribute_of_every_method():
    tiny = dict(out_dim=16, hidden_dim=8, bottleneck_dim=8, n_crops=2)
    built = {"moby": MoBY(lambda dpr, **kw: create_backbone("vit_nano_patch4_32", depth=1), proj_hidden_dim=8,
                          proj_dim=8, pred_hidden_dim=8, queue_size=8),
             "dino": DINO(lambda dpr, **kw: create_backbone("vit_nano_patch4_32", depth=1), **tiny)}
    for name, method in built.items():
        assert getattr(method, get_method(name).backbone_key) is method.backbone, name


def test_exports_and_bare_state_dicts_are_taken_as_they_are():
    sd = {"w": _tensor(1)}
    assert backbone_state_dict({"backbone": sd, "meta": {}}) is sd
    assert backbone_state_dict(sd) == sd


@pytest.mark.parametrize("state, match", [
    ({}, r"x.pth is not a checkpoint layout mobyssl reads \(top-level keys: \)"),
    ({"w": _tensor(1), "epoch": 3}, r"x.pth is not a checkpoint layout .* \(top-level keys: w, epoch\)"),
    (_checkpoint("moby", {"projector.w": _tensor(1)}), r"x.pth has method weights but no 'encoder.\*' backbone keys"),
    (_checkpoint("dino", {"encoder.w": _tensor(1)}), r"x.pth has method weights but no 'teacher.\*' backbone keys"),
])
def test_what_is_not_backbone_weights_is_named(state, match):
    with pytest.raises(CheckpointError, match=match):
        backbone_state_dict(state, "x.pth")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))


def test_matching_weights_are_loaded():
    source, target = _net(), nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    load_backbone_weights(target, source.state_dict(), "x.pth")
    for a, b in zip(source.state_dict().values(), target.state_dict().values()):
        assert torch.equal(a, b)


def test_every_kind_of_mismatch_is_counted_with_an_example():
    sd = _net().state_dict()
    sd.pop("1.bias")  # missing
    sd["2.weight"] = torch.zeros(1)  # unexpected
    sd["0.weight"] = torch.zeros(5, 3)  # another shape
    target = _net()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_backbone_weights(target, sd, "x.pth")
    assert str(e.value).startswith("x.pth does not fit the backbone this config builds (Sequential): tensors "
                                   "1 missing (e.g. 1.bias), 1 unexpected (e.g. 2.weight), 1 of another shape "
                                   "(e.g. 0.weight (5, 3) vs (2, 3)). Use the config")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing half-loaded
    sd = _net().state_dict()
    sd["0.weight"] = torch.zeros(5, 3)
    with pytest.raises(CheckpointError, match=r"tensors 1 of another shape \(e.g. 0.weight \(5, 3\) vs \(2, 3\)\)\. "):
        load_backbone_weights(_net(), sd, "x.pth")


def test_missing_tensors_alone_and_unexpected_ones_alone_are_each_a_mismatch():
    sd = _net().state_dict()
    sd.pop("1.bias")
    with pytest.raises(CheckpointError, match=r"tensors 1 missing \(e.g. 1.bias\)\. Use the config"):
        load_backbone_weights(_net(), sd, "x.pth")
    sd = _net().state_dict()
    sd["2.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"tensors 1 unexpected \(e.g. 2.weight\)\. Use the config"):
        load_backbone_weights(_net(), sd, "x.pth")


def test_non_finite_weights_are_refused_naming_the_file():
    sd = _net().state_dict()
    sd["0.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"^x.pth holds non-finite weights \(1 tensor\(s\) .* e.g. 0.weight\)"):
        load_backbone_weights(_net(), sd, "x.pth")
