import numpy as np
import pytest
from torch import nn

from mobyssl.train.optim import param_groups, warmup_cosine


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
