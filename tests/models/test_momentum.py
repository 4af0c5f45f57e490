import math

import torch
from torch import nn

from mobyssl.host_sync import HostSyncCounter
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


def test_ema_update_with_a_device_flag_reads_nothing_back_and_handles_a_single_parameter():
    """A device flag gates the update without the host reading it (a 0-d tensor given to ``_foreach_lerp_`` as its
    weight would be: it has no tensor overload); a False flag leaves the target untouched, also for a target with a
    single parameter."""
    torch.manual_seed(0)
    for make in (lambda: nn.Linear(3, 2), lambda: nn.Linear(3, 2, bias=False)):
        online, target = make(), make()
        before = [p.clone() for p in target.parameters()]
        with HostSyncCounter() as syncs:
            ema_update(online, target, 0.9, torch.tensor(False))
            ema_update(online, target, 0.75, torch.tensor(True))
        assert syncs.total == 0, syncs.counts
        ema_update(online, target, 0.75, torch.tensor(False))
        for po, pt, new in zip(online.parameters(), before, target.parameters()):
            torch.testing.assert_close(new, 0.75 * pt + 0.25 * po, rtol=0, atol=1e-7)
