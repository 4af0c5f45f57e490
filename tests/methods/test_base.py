"""The method contract's defaults, on a toy method (MoBY overrides some of them; new methods inherit them)."""

import torch
from torch import nn

from mobyssl.methods.base import Method
from mobyssl.models.momentum import cosine_momentum


class _Buffer(nn.Module):
    """Takes part in ``accumulate`` like a queue: writes wait until ``flush``."""

    def __init__(self):
        super().__init__()
        self.defer_updates = False
        self.flushed = 0

    def flush(self):
        self.flushed += 1


class _Toy(Method):
    base_momentum = 0.9

    def __init__(self, with_target: bool = True):
        super().__init__()
        self.online = nn.Linear(3, 2)
        self.head = nn.Linear(2, 2)
        self.buffer = _Buffer()
        if with_target:
            self.target = nn.Linear(3, 2)
            self.target.requires_grad_(False)

    def momentum_pairs(self):
        return [(self.online, self.target)] if hasattr(self, "target") else []


def test_default_trainable_modules_are_the_children_with_trainable_parameters():
    """Frozen targets and parameter-free children are not handed to the optimizer; the rest are, in order."""
    toy = _Toy()
    assert toy.trainable_modules() == [toy.online, toy.head]
    toy.head.requires_grad_(False)
    assert toy.trainable_modules() == [toy.online]


def test_default_on_step_end_moves_targets_by_the_cosine_momentum():
    """m(step) follows the cosine from base_momentum; the target moves by (1 - m) towards the online net."""
    torch.manual_seed(0)
    toy = _Toy()
    before = toy.target.weight.clone()
    out = toy.on_step_end(3, 10)
    m = cosine_momentum(3, 10, 0.9)
    assert out == {"momentum": m} and 0.9 < m < 1.0
    torch.testing.assert_close(toy.target.weight, m * before + (1 - m) * toy.online.weight, rtol=0, atol=1e-7)
    assert not toy.target.weight.requires_grad


def test_on_step_end_skipped_step_and_no_targets():
    """A skipped step (apply=False) leaves the targets as they were; a method without targets logs nothing."""
    toy = _Toy()
    before = toy.target.weight.clone()
    toy.on_step_end(1, 10, apply=torch.tensor(False))
    assert torch.equal(toy.target.weight, before)
    assert _Toy(with_target=False).on_step_end(1, 10) == {}


def test_accumulate_defers_buffer_writes_and_flushes_once_even_on_error():
    """Inside ``accumulate`` buffers defer their writes; on exit, normal or not, each flushes exactly once."""
    toy = _Toy()
    with toy.accumulate():
        assert toy.buffer.defer_updates
    assert not toy.buffer.defer_updates and toy.buffer.flushed == 1
    try:
        with toy.accumulate():
            raise RuntimeError("step failed")
    except RuntimeError:
        pass
    assert not toy.buffer.defer_updates and toy.buffer.flushed == 2


def test_no_collapse_signs_by_default_and_the_monitor_warns_every_tenth_time():
    from mobyssl.train.guards import CollapseMonitor

    assert _Toy().collapse_signs({"loss": 0.0, "feature_std": 0.0, "kl_teacher_student": 0.0}) is None
    monitor, said = CollapseMonitor(), []
    assert monitor.check(None, 1, said.append) is False and said == []
    for step in range(1, 22):
        assert monitor.check("feature_std 0.010 < 0.1", step, said.append) is True
    assert len(said) == 3 and "step 1:" in said[0] and "step 11:" in said[1] and "step 21:" in said[2]
    assert "may be collapsing (feature_std 0.010 < 0.1)" in said[0]
