import math

import pytest
import torch
from torch import nn

from mobyssl.models.momentum import copy_weights, cosine_momentum, ema_update


def test_cosine_momentum_schedule_endpoints_and_midpoint():
    assert cosine_momentum(0, 100, 0.99) == 0.99
    assert math.isclose(cosine_momentum(50, 100, 0.99), 0.995)
    assert cosine_momentum(100, 100, 0.99) == 1.0
    # k = 25: 1 - 0.01 * (cos(pi/4) + 1) / 2
    assert math.isclose(cosine_momentum(25, 100, 0.99), 1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    values = [cosine_momentum(k, 100, 0.99) for k in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_ema_update_is_momentum_weighted_average():
    torch.manual_seed(0)
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    o = [p.clone() for p in online.parameters()]
    t = [p.clone() for p in target.parameters()]
    ema_update(online, target, 0.9)
    for po, pt, new in zip(o, t, target.parameters()):
        assert torch.allclose(new, 0.9 * pt + 0.1 * po)
    # The online network is untouched.
    for po, p in zip(o, online.parameters()):
        assert torch.equal(po, p)


def test_copy_weights_freezes_target():
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    copy_weights(online, target)
    assert torch.equal(online.weight, target.weight)
    assert not any(p.requires_grad for p in target.parameters())


def test_ema_update_with_a_device_flag():
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    t = [p.clone() for p in target.parameters()]
    ema_update(online, target, 0.9, torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(t, target.parameters()))  # skipped step: untouched
    ema_update(online, target, 0.9, torch.tensor(True))
    for po, pt, new in zip(online.parameters(), t, target.parameters()):
        assert torch.allclose(new, 0.9 * pt + 0.1 * po)


def test_cosine_momentum_for_runs_of_zero_and_one_step():
    """No steps: the base momentum (no division by zero); one step: that step already ends the schedule at 1."""
    assert cosine_momentum(0, 0, 0.99) == 0.99
    assert cosine_momentum(0, 1, 0.99) == 0.99
    assert cosine_momentum(1, 1, 0.99) == 1.0


@pytest.mark.parametrize("tensor_lerp", [True, False], ids=["foreach_lerp", "older_pytorch_fallback"])
def test_ema_update_with_a_device_flag_both_paths_and_a_single_parameter(monkeypatch, tensor_lerp):
    """With a device flag, the foreach-lerp path and the fallback for PyTorch without a tensor-weight lerp give the
    same update (also for a target with a single parameter); a False flag leaves the target untouched."""
    import mobyssl.models.momentum as momentum

    monkeypatch.setattr(momentum, "lerp_takes_a_tensor_weight", lambda: tensor_lerp)
    torch.manual_seed(0)
    for make in (lambda: nn.Linear(3, 2), lambda: nn.Linear(3, 2, bias=False)):
        online, target = make(), make()
        before = [p.clone() for p in target.parameters()]
        ema_update(online, target, 0.9, torch.tensor(False))
        assert all(torch.equal(a, b) for a, b in zip(before, target.parameters()))
        ema_update(online, target, 0.75, torch.tensor(True))
        for po, pt, new in zip(online.parameters(), before, target.parameters()):
            torch.testing.assert_close(new, 0.75 * pt + 0.25 * po, rtol=0, atol=1e-7)


def test_this_pytorch_has_the_tensor_weight_lerp():
    """Both supported PyTorch versions (2.11, 2.14) have it: the fallback is for older ones only."""
    from mobyssl.models.momentum import lerp_takes_a_tensor_weight

    assert lerp_takes_a_tensor_weight()
