import math

import numpy as np
import pytest
import torch
from torch import nn

from mobyssl.train.optim import build_adamw, param_groups, warmup_cosine


def test_no_weight_decay_on_biases_and_1d_parameters():
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    decay, no_decay = param_groups([net], 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[2].weight)}
    assert len(no_decay["params"]) == 4  # two biases, LayerNorm weight and bias


def test_warmup_then_cosine():
    s = warmup_cosine(1.0, 0.01, total_steps=110, warmup_steps=10, warmup_start=0.0)
    assert len(s) == 110
    assert s[0] == 0.0 and s[5] == pytest.approx(0.5)
    assert s[10] == pytest.approx(1.0)
    assert s[60] == pytest.approx(0.505)
    assert s[-1] == pytest.approx(0.01, abs=1e-3)
    assert np.all(np.diff(s[10:]) <= 0)


def test_frozen_parameters_are_left_out():
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    net[0].weight.requires_grad_(False)
    net[1].bias.requires_grad_(False)
    decay, no_decay = param_groups([net], 0.05)
    assert {id(p) for p in decay["params"]} == {id(net[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(net[0].bias), id(net[1].weight), id(net[2].bias)}


def test_warmup_cosine_phase_boundaries_by_hand():
    s = warmup_cosine(2.0, 0.5, total_steps=8, warmup_steps=4, warmup_start=0.4)
    # Warm-up 0.4 -> 2.0 in 4 steps (the peak not included), then cosine 2.0 -> 0.5 over 4 steps (0.5 not reached).
    assert s[:4] == pytest.approx([0.4, 0.8, 1.2, 1.6], rel=1e-12)
    expected = [0.5 + 0.75 * (1 + math.cos(math.pi * t / 4)) for t in range(4)]
    assert s[4:] == pytest.approx(expected, rel=1e-12)


def test_warmup_longer_than_the_run_and_no_warmup():
    s = warmup_cosine(1.0, 0.0, total_steps=4, warmup_steps=10, warmup_start=0.2)
    assert len(s) == 4 and s == pytest.approx([0.2, 0.4, 0.6, 0.8], rel=1e-12)  # warm-up cut at the run's end
    s = warmup_cosine(1.0, 0.0, total_steps=4, warmup_steps=0, warmup_start=0.2)
    assert s == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])
    assert len(warmup_cosine(1.0, 0.0, total_steps=1)) == 1


@pytest.mark.parametrize("fused_available", [True, False])
def test_build_adamw_groups_lr_and_betas(monkeypatch, fused_available):
    """Decay and no-decay groups, lr and betas, with the fused kernel and without (PyTorch lacking one)."""
    from mobyssl.train import optim

    asked = []
    monkeypatch.setattr(optim, "fused_adamw_on", lambda device_type: asked.append(device_type) or fused_available)
    a, b = nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2))
    opt = build_adamw([a, b], 3e-4, 0.05, [0.9, 0.95], torch.device("cpu"))
    assert isinstance(opt, torch.optim.Optimizer) and "AdamW" in type(opt).__name__
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(a.weight), id(b[0].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(a.bias), id(b[0].bias), id(b[1].weight), id(b[1].bias)}
    for g in opt.param_groups:
        assert g["lr"] == 3e-4 and g["betas"] == (0.9, 0.95)
    assert opt.defaults["fused"] is (True if fused_available else None) and asked == ["cpu"]


def test_fused_adamw_is_found_on_this_cpu():
    """PyTorch 2.4 and later have a fused AdamW on the CPU: the training path uses it."""
    from mobyssl.train.optim import fused_adamw_on

    assert fused_adamw_on("cpu")


def test_warmup_cosine_defaults_no_warmup_and_warm_up_from_zero():
    """Without warm-up arguments the schedule starts at ``base``; a warm-up without ``warmup_start`` starts at 0."""
    plain = warmup_cosine(2.0, 0.5, 4)
    np.testing.assert_allclose(plain, [0.5 + 0.75 * (1 + math.cos(math.pi * t / 4)) for t in range(4)], rtol=0, atol=0)
    assert plain[0] == 2.0
    warm = warmup_cosine(2.0, 0.5, 4, warmup_steps=2)
    np.testing.assert_array_equal(warm[:2], [0.0, 1.0])


def test_a_bias_is_never_decayed_whatever_its_shape():
    """A parameter named ``*.bias`` goes to the no-decay group even when it is not 1-D (e.g. a per-head bias)."""

    class PerHeadBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 4)
            self.proj.bias = nn.Parameter(torch.zeros(2, 2))  # 2-D bias, not used in a forward here

    m = PerHeadBias()
    decay, no_decay = param_groups([m], 0.05)
    assert [id(p) for p in decay["params"]] == [id(m.proj.weight)]
    assert [id(p) for p in no_decay["params"]] == [id(m.proj.bias)]


def test_decay_all_puts_every_trainable_parameter_in_the_decayed_group():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    decay, no_decay = param_groups([model], 0.1, decay_all=True)
    assert decay["weight_decay"] == 0.1 and no_decay["params"] == []
    assert [p.shape for p in decay["params"]] == [(4, 3), (4,), (4,), (4,), (2, 4)]  # not the frozen bias
    split, rest = param_groups([model], 0.1)
    assert [p.shape for p in split["params"]] == [(4, 3), (2, 4)] and len(rest["params"]) == 3


def test_warmup_ending_at_the_peak_is_dinos_linspace():
    s = warmup_cosine(2.0, 0.5, total_steps=8, warmup_steps=4, warmup_start=0.4, warmup_ends_at_peak=True)
    # DINO's utils.cosine_scheduler: np.linspace(0.4, 2.0, 4) with its endpoint, so the peak comes twice.
    assert s[:4] == pytest.approx([0.4, 0.4 + 1.6 / 3, 0.4 + 3.2 / 3, 2.0], rel=1e-12)
    assert s[4:] == pytest.approx([0.5 + 0.75 * (1 + math.cos(math.pi * t / 4)) for t in range(4)], rel=1e-12)
