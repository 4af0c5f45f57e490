"""What the trainer offers every method around a step: a weight-decay schedule, per-parameter gradient
clipping, and the ``on_step_start`` / ``on_after_backward`` hooks (DINO's teacher temperature and frozen
last layer). Expected values are written here from the formulas, not taken from the code under test."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import metrics_records, record_step_groups
from torch import nn

from mobyssl.methods import MoBY
from mobyssl.methods.base import Method
from mobyssl.train import trainer
from mobyssl.train.optim import build_adamw, clip_each_gradient_
from mobyssl.train.trainer import make_scaler, make_schedules, pretrain, train_step

CPU = torch.device("cpu")


def expected_wd(step: int, start: float, end: float, total: int) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * step / total)) / 2


def test_weight_decay_schedule_is_a_cosine_over_the_steps(tiny_cfg):
    cfg = tiny_cfg("train.weight_decay=0.04", "train.weight_decay_end=0.4", "train.epochs=2")
    s = make_schedules(cfg, steps_per_epoch=5)
    assert len(s.weight_decay) == 10
    assert s.weight_decay[0] == pytest.approx(0.04, rel=1e-12)
    assert s.weight_decay[5] == pytest.approx(0.22, rel=1e-12)  # halfway
    assert s.weight_decay[9] == pytest.approx(expected_wd(9, 0.04, 0.4, 10), rel=1e-12) and s.weight_decay[9] < 0.4
    assert make_schedules(tiny_cfg(), steps_per_epoch=5).weight_decay is None  # MoBY: constant


def test_optimizer_decays_its_decayed_group_on_the_schedule(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("train.weight_decay=0.04", "train.weight_decay_end=0.4", "train.knn_every=-1",
                   "train.epochs=1", "train.max_steps=4")
    used = []
    original = trainer.build_adamw

    monkeypatch.setattr(trainer, "build_adamw", lambda *a, **k: record_step_groups(original(*a, **k), used,
                                                                                  "weight_decay"))
    pretrain(cfg)
    total = 1000 // 32  # the bundled sample's 1,000 images in batches of 32: the schedule's full length
    assert [u[0] for u in used] == pytest.approx([expected_wd(i, 0.04, 0.4, total) for i in range(4)], rel=1e-12)
    assert [u[1] for u in used] == [0.0] * 4  # biases and norms are never decayed
    logged = metrics_records(cfg.output_dir, "train")
    assert [r["weight_decay"] for r in logged] == pytest.approx([u[0] for u in used], rel=1e-6)


def test_clip_each_gradient_scales_each_tensor_on_its_own():
    a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    a.grad, b.grad, c.grad = torch.tensor([6.0, 8.0]), torch.tensor([0.6, 0.8]), torch.zeros(2)
    total = clip_each_gradient_([a, b, c], 3.0)
    assert total.item() == pytest.approx(math.sqrt(100 + 1), rel=1e-6)  # the norm before clipping
    assert torch.allclose(a.grad, torch.tensor([6.0, 8.0]) * 3 / (10 + 1e-6), rtol=1e-6)  # norm 10 -> 3
    assert torch.equal(b.grad, torch.tensor([0.6, 0.8])) and torch.equal(c.grad, torch.zeros(2))  # under the limit
    a.grad = torch.tensor([30.0, 40.0])
    clip_each_gradient_([a], math.inf)  # no limit: unchanged
    assert torch.equal(a.grad, torch.tensor([30.0, 40.0]))


class Toy(Method):
    """Two parameters with very different gradients (100 and 0.1 per entry); ``frozen`` drops ``last``'s gradient in
    epoch 0 the way DINO freezes its head's last layer."""

    name = "toy"

    def __init__(self, frozen: bool = False):
        super().__init__()
        self.big = nn.Parameter(torch.zeros(4, 4))
        self.last = nn.Parameter(torch.ones(4, 4))
        self.frozen = frozen
        self.epochs_seen: list[int] = []

    @property
    def backbone(self):
        return self

    def forward(self, views):
        return {"loss": 100 * self.big.sum() + 0.1 * self.last.sum()}

    def on_after_backward(self, epoch):
        self.epochs_seen.append(epoch)
        if self.frozen and epoch < 1:
            self.last.grad = None


def _step(method, opt, **kw):
    return train_step(method, [torch.zeros(2, 1)], opt, make_scaler(CPU, None), 1.0, 3.0, **kw)


def test_train_step_clips_per_parameter_or_globally():
    m = Toy()
    _step(m, torch.optim.SGD(m.parameters(), lr=1.0), clip_mode="per_parameter")
    # big's gradient (norm 400) is cut to norm 3; last's (norm 0.4) is left as it is.
    assert torch.allclose(m.big, torch.full((4, 4), -100 * 3 / (400 + 1e-6)), rtol=1e-5)
    assert torch.allclose(m.last, torch.full((4, 4), 1 - 0.1), rtol=1e-6)
    m = Toy()
    _step(m, torch.optim.SGD(m.parameters(), lr=1.0), clip_mode="global")
    scale = 3 / math.sqrt(400**2 + 0.4**2)  # one factor for both
    assert torch.allclose(m.big, torch.full((4, 4), -100 * scale), rtol=1e-5)
    assert torch.allclose(m.last, torch.full((4, 4), 1 - 0.1 * scale), rtol=1e-5)


def test_a_gradient_dropped_after_backward_keeps_the_parameter_out_of_the_step():
    m = Toy(frozen=True)
    opt = build_adamw([m], 0.1, 0.5, (0.9, 0.999), CPU)  # with weight decay, which a zeroed gradient would apply
    assert any(p is m.last for p in opt.param_groups[0]["params"])
    _step(m, opt, epoch=0)
    assert torch.equal(m.last, torch.ones(4, 4))  # not moved, not decayed
    assert m.last not in opt.state  # no moments, no step count: its AdamW state starts when it is unfrozen
    assert not torch.equal(m.big, torch.zeros(4, 4))
    _step(m, opt, epoch=1)
    assert not torch.equal(m.last, torch.ones(4, 4)) and m.last in opt.state
    assert m.epochs_seen == [0, 1]


def test_the_trainer_calls_the_hooks_with_the_step_and_its_epoch(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("train.knn_every=-1", "train.epochs=2", "train.max_steps=6", "train.batch_size=200",
                   "method.queue_size=200")
    starts, after = [], []
    monkeypatch.setattr(MoBY, "on_step_start", lambda self, *a: starts.append(a), raising=False)
    monkeypatch.setattr(MoBY, "on_after_backward", lambda self, epoch: after.append(epoch), raising=False)
    pretrain(cfg)
    assert starts == [(i, 10, 5) for i in range(6)]  # 0-based: the index into every schedule
    assert after == [0, 0, 0, 0, 0, 1]  # 1,000 images in batches of 200: 5 steps per epoch


SMALL_HEADS = {"moby": {}, "mocov3": {"proj_hidden_dim": 16, "proj_dim": 8}, "sit": {"hidden_dim": 16, "out_dim": 8},
               "dino": {"out_dim": 64, "hidden_dim": 16, "bottleneck_dim": 8, "local_crops_number": 0},
               "esvit": {"out_dim": 64, "hidden_dim": 16, "bottleneck_dim": 8, "local_crops_number": 0}}


@pytest.mark.parametrize("method, peak_on_last_warmup_step", [("moby", False), ("mocov3", False), ("dino", True),
                                                               ("esvit", True), ("sit", True)])
def test_each_method_gets_its_own_warmup_form(tiny_cfg, monkeypatch, method, peak_on_last_warmup_step):
    from mobyssl.methods import get_method

    assert get_method(method).warmup_ends_at_peak is peak_on_last_warmup_step
    seen = []
    real = trainer.make_schedules
    monkeypatch.setattr(trainer, "make_schedules", lambda *a: seen.append(a[2]) or real(*a))
    cfg = tiny_cfg("train.knn_every=-1", "train.max_steps=1")
    if method != "moby":  # the tiny config's method.* keys are MoBY's
        cfg.method = get_method(method).Options(name=method, **SMALL_HEADS[method])
    pretrain(cfg)
    assert seen == [peak_on_last_warmup_step]
    s = real(cfg, 5, peak_on_last_warmup_step)  # 1 warm-up epoch of 5 steps
    peak = cfg.train.lr * cfg.train.batch_size / cfg.train.lr_ref_batch
    assert (s.lr[4] == pytest.approx(peak)) is peak_on_last_warmup_step
