"""Linear probes: the fast one standardises with training statistics; the full one trains only its head."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import KeyedRows, record_step_lrs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mobyssl.eval import linear as linear_module
from mobyssl.eval import linear_probe_fast, linear_probe_full

CPU = torch.device("cpu")


def _shifted_split():
    """Two balanced classes split at 0 on feature 0 in training; the test split is the same shifted by +10."""
    g = torch.Generator().manual_seed(0)
    n = 200
    margin = 1.0 + torch.rand(n, generator=g)
    x0 = torch.cat([-margin, margin])  # exactly symmetric: training mean 0 on feature 0
    y = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    train = torch.stack([x0, torch.randn(2 * n, generator=g)], dim=1)
    test = torch.stack([x0 + 10.0, torch.randn(2 * n, generator=g)], dim=1)
    return train, y, test, y.clone()


def test_fast_probe_standardises_with_training_statistics_only():
    xtr, ytr, xte, yte = _shifted_split()
    # With the training split's mean/std every test point lies far on the class-1 side: exactly half are right.
    # (The test split's own statistics would undo the shift and give 100%.)
    out = linear_probe_fast(xtr, ytr, xte, yte, num_classes=2, epochs=10, batch_size=64, lr=1.0)
    assert out == {"linear_top1": 50.0, "linear_top5": 100.0}
    # Unshifted, the same probe is right on every point: the 50% above is the shift, not a failure to learn.
    assert linear_probe_fast(xtr, ytr, xtr, ytr, num_classes=2, epochs=10,
                             batch_size=64)["linear_top1"] == 100.0


def test_fast_probe_is_unaffected_by_a_scale_and_shift_of_both_splits():
    # Standardising with training statistics makes the probe invariant to an affine change of the features.
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 3, generator=g)
    xtr, xte = torch.randn(600, 6, generator=g), torch.randn(300, 6, generator=g)
    ytr, yte = (xtr @ w).argmax(1), (xte @ w).argmax(1)
    scale, shift = torch.tensor([100.0, 0.01, 1, 5, 1, 0.2]), torch.tensor([1000.0, -3, 0, 7, 2, -50])
    a = linear_probe_fast(xtr, ytr, xte, yte, num_classes=3, epochs=5, batch_size=100)
    b = linear_probe_fast(xtr * scale + shift, ytr, xte * scale + shift, yte, num_classes=3, epochs=5, batch_size=100)
    assert a["linear_top1"] == pytest.approx(b["linear_top1"], abs=100 / 300 + 1e-9)  # one point of rounding
    assert a["linear_top1"] > 90


class FrozenBackbone(nn.Module):
    """An identity-like "backbone": a Linear initialised to the identity, then a BatchNorm whose running
    statistics would move if it ran in training mode. Records its mode at every forward."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim
        self.proj = nn.Linear(dim, dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(dim))
            self.proj.bias.zero_()
        self.norm = nn.BatchNorm1d(dim)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.norm(self.proj(x))


def _separable(n_per_class: int, dim: int = 8, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = 0.3 * torch.randn(len(y), dim, generator=g)
    x[torch.arange(len(y)), y] += 3.0
    return x, y


def _full_probe(monkeypatch, backbone, epochs=4, batch=16, lr=0.4, ref=64, n=40):
    xtr, ytr = _separable(n)
    xte, yte = _separable(20, seed=1)
    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=batch, shuffle=True,
                        generator=torch.Generator().manual_seed(0), drop_last=True)
    used = []  # the lr of every param group at each optimizer step
    original = linear_module._sgd

    monkeypatch.setattr(linear_module, "_sgd", lambda *a, **k: record_step_lrs(original(*a, **k), used))
    with torch.no_grad():  # the precomputed test features, as the runner computes them (eval mode)
        test_feats = backbone.eval()(xte)
    backbone.modes.clear()
    backbone.train()  # the probe must put it in eval mode itself
    out = linear_probe_full(backbone, loader, test_feats, yte, num_classes=3, device=CPU, epochs=epochs, lr=lr,
                            lr_ref_batch=ref)
    return out, used, len(loader)


def test_full_probe_learns_separable_data_and_leaves_the_backbone_alone(monkeypatch):
    torch.manual_seed(0)
    backbone = FrozenBackbone(8)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    out, _, _ = _full_probe(monkeypatch, backbone)
    assert out == {"linear_top1": 100.0, "linear_top5": 100.0}
    after = backbone.state_dict()
    for k, v in before.items():  # weights and BatchNorm running statistics (a forward in train mode moves them)
        assert torch.equal(v, after[k]), k
    assert backbone.modes and not any(backbone.modes)  # every forward ran in eval mode
    assert not backbone.training
    assert all(not p.requires_grad for p in backbone.parameters())


def test_full_probe_scores_zero_when_every_test_label_is_wrong():
    # The accuracy is measured against the test labels: the same probe, every test label shifted to a wrong class.
    torch.manual_seed(0)
    backbone = FrozenBackbone(8)
    xtr, ytr = _separable(40)
    xte, yte = _separable(20, seed=1)
    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=16, shuffle=True)
    with torch.no_grad():
        test_feats = backbone.eval()(xte)
    wrong = (yte + 1) % 3
    out = linear_probe_full(backbone, loader, test_feats, wrong, num_classes=3, device=CPU, epochs=4, lr=0.4,
                            lr_ref_batch=64)
    assert out["linear_top1"] == 0.0


@pytest.mark.parametrize("batch, ref, lr", [(16, 64, 0.4), (8, 512, 1.0)])
def test_full_probe_lr_is_scaled_by_the_global_batch_and_follows_a_cosine(monkeypatch, batch, ref, lr):
    torch.manual_seed(0)
    epochs = 3
    out, used, per_epoch = _full_probe(monkeypatch, FrozenBackbone(8), epochs=epochs, batch=batch, lr=lr, ref=ref)
    total = epochs * per_epoch
    assert per_epoch == 120 // batch and len(used) == total
    base = lr * batch / ref  # one process: the global batch is the loader's batch
    for i, groups in enumerate(used):
        expected = 0.5 * base * (1 + math.cos(math.pi * i / total))
        for value in groups:
            assert value == pytest.approx(expected, rel=1e-12), (i, value, expected)
    assert used[0][0] == pytest.approx(base, rel=1e-12)
    assert used[-1][0] < base * 0.01


# --------------------------------------------------------------------------- the full probe's training loop


def _recording_sgd(monkeypatch):
    """Records the arguments ``_sgd`` is given and the optimiser it returns (the head's parameters are its own)."""
    calls = []
    original = linear_module._sgd

    def recording(head, lr, momentum, weight_decay):
        opt = original(head, lr, momentum, weight_decay)
        calls.append({"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "opt": opt,
                      "init": [p.detach().clone() for p in head.parameters()]})
        return opt

    monkeypatch.setattr(linear_module, "_sgd", recording)
    return calls


def test_full_probe_defaults_are_the_configs_linear_defaults(monkeypatch):
    """Called without hyper-parameters, the full probe uses linear.* defaults: epochs, lr per ref batch, momentum, wd."""
    from mobyssl.config import LinearConfig

    defaults = LinearConfig()
    calls = _recording_sgd(monkeypatch)
    epochs_seen = []
    x, y = _separable(2, dim=4, classes=2)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    linear_probe_full(FrozenBackbone(4), loader, x, y, num_classes=2, device=CPU,
                      check_unreadable=lambda failed: epochs_seen.append(len(failed)))
    assert len(epochs_seen) == defaults.epochs == 100
    (call,) = calls
    assert call["lr"] == pytest.approx(defaults.lr * 4 / defaults.lr_ref_batch, rel=1e-12)
    assert defaults.lr * 4 / defaults.lr_ref_batch == pytest.approx(1.0 * 4 / 512, rel=1e-12)
    assert call["momentum"] == defaults.momentum == 0.9
    assert call["weight_decay"] == defaults.weight_decay == 0.0


def test_full_probe_lr_follows_the_world_size_and_the_head_is_wrapped_on_its_device(monkeypatch):
    """Under torchrun the lr scales with the global batch (loader batch x world size); DDP gets the probe's device."""
    from mobyssl import distributed

    wrapped = []
    real_wrap = distributed.wrap_ddp

    def recording_wrap(module, device):
        wrapped.append(device)
        return real_wrap(module, device)

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "wrap_ddp", recording_wrap)
    torch.manual_seed(0)
    _, used, _ = _full_probe(monkeypatch, FrozenBackbone(8), epochs=1, batch=16, lr=0.4, ref=64)
    assert used[0][0] == pytest.approx(0.4 * 16 * 2 / 64, rel=1e-12)
    assert wrapped == [CPU]


def test_full_probe_sets_the_samplers_epoch_before_each_epoch():
    """A sampler with ``set_epoch`` (the distributed one) is told each epoch's number, so every epoch reshuffles."""

    class RecordingSampler(torch.utils.data.Sampler):
        def __init__(self, n):
            self.n, self.epochs, self.log = n, [], []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __iter__(self):
            self.log.append(("iter", len(self.epochs)))
            return iter(range(self.n))

        def __len__(self):
            return self.n

    x, y = _separable(4, dim=4, classes=2)
    sampler = RecordingSampler(len(y))
    loader = DataLoader(TensorDataset(x, y), batch_size=4, sampler=sampler)
    linear_probe_full(FrozenBackbone(4), loader, x, y, num_classes=2, device=CPU, epochs=3, lr=0.1)
    assert sampler.epochs == [0, 1, 2]
    assert sampler.log == [("iter", 1), ("iter", 2), ("iter", 3)]  # set before the epoch's first batch


def test_full_probe_runs_the_backbone_under_autocast_when_given_an_amp_dtype():
    """With ``amp_dtype`` the frozen backbone runs under autocast of that dtype on the probe's device; without, not."""

    class AutocastRecorder(FrozenBackbone):
        def forward(self, x):
            self.autocast = getattr(self, "autocast", [])
            on = torch.is_autocast_enabled("cpu")
            self.autocast.append((on, torch.get_autocast_dtype("cpu") if on else None))
            return super().forward(x)

    x, y = _separable(4, dim=4, classes=2)
    for amp, expected in ((torch.bfloat16, (True, torch.bfloat16)), (None, (False, None))):
        backbone = AutocastRecorder(4)
        loader = DataLoader(TensorDataset(x, y), batch_size=4)
        out = linear_probe_full(backbone, loader, x, y, num_classes=2, device=CPU, amp_dtype=amp, epochs=2, lr=0.1)
        assert backbone.autocast == [expected] * 4, amp  # 2 epochs of 2 batches
        assert set(out) == {"linear_top1", "linear_top5"}
    assert not torch.is_autocast_enabled("cpu")


def test_full_probe_learns_from_the_readable_images_of_a_partly_unreadable_batch(monkeypatch):
    """A batch with some unreadable images still trains the head on the others (placeholders carry IGNORE_LABEL)."""
    from mobyssl.eval.features import IGNORE_LABEL

    torch.manual_seed(0)
    x, y = _separable(8, dim=4, classes=3)  # 24 rows, in batches of 8: one unreadable row per batch
    keys = [""] * len(y)
    labels = y.clone()
    for i in (0, 9, 18):
        keys[i], labels[i] = f"bad{i}.png", IGNORE_LABEL
        x[i] = 0.0  # the black placeholder
    loader = DataLoader(KeyedRows(x, labels, keys), batch_size=8)
    calls = _recording_sgd(monkeypatch)
    seen = []
    out = linear_probe_full(FrozenBackbone(4), loader, x, y, num_classes=3, device=CPU, epochs=20, lr=2.0,
                            lr_ref_batch=8, check_unreadable=lambda failed: seen.append(sorted(failed)))
    assert out["linear_top1"] > 90  # the head learned (a random head scores about a third)
    weight = calls[0]["opt"].param_groups[0]["params"][0]
    assert not torch.equal(weight, calls[0]["init"][0])
    assert seen == [["bad0.png", "bad18.png", "bad9.png"]] * 20


def test_full_probe_leaves_the_head_unchanged_on_batches_of_unreadable_images_only(monkeypatch):
    """A batch with nothing readable makes a zero loss: the head keeps its initial weights and the log says 0."""
    from mobyssl.eval.features import IGNORE_LABEL

    torch.manual_seed(0)
    x = torch.randn(8, 4)
    loader = DataLoader(KeyedRows(x, torch.full((8,), IGNORE_LABEL), [f"{i}.png" for i in range(8)]), batch_size=4)
    calls = _recording_sgd(monkeypatch)
    logged = []
    linear_probe_full(FrozenBackbone(4), loader, x, torch.zeros(8, dtype=torch.long), num_classes=3, device=CPU,
                      epochs=2, lr=1.0, lr_ref_batch=4, log=logged.append)
    (call,) = calls
    params = call["opt"].param_groups[0]["params"]
    assert len(params) == 2
    for now, initial in zip(params, call["init"]):
        assert torch.equal(now, initial)
    assert [line.split("  ")[:2] for line in logged] == [["linear epoch 1/2", "loss 0.0000"],
                                                          ["linear epoch 2/2", "loss 0.0000"]]


def test_full_probe_logs_each_epochs_loss_and_elapsed_seconds():
    """The main process logs ``linear epoch i/n  loss L  Ts`` once per epoch, T the seconds since the probe began."""
    import re

    x, y = _separable(4, dim=4, classes=2)
    logged = []
    linear_probe_full(FrozenBackbone(4), DataLoader(TensorDataset(x, y), batch_size=4), x, y, num_classes=2,
                      device=CPU, epochs=3, lr=0.1, log=logged.append)
    assert len(logged) == 3
    for i, line in enumerate(logged, 1):
        m = re.fullmatch(rf"linear epoch {i}/3  loss (\d+\.\d{{4}})  (\d+)s", line)
        assert m, line
        assert 0 <= int(m.group(2)) < 60  # the time elapsed, not a wall-clock timestamp


def test_full_probe_head_starts_from_small_random_weights_and_zero_bias(monkeypatch):
    """MoBY/DINO's linear head: weights ~ N(0, 0.01^2), bias 0 (a larger init slows the short probes down)."""
    calls = _recording_sgd(monkeypatch)
    torch.manual_seed(0)
    x, y = torch.randn(8, 256), torch.arange(8) % 40
    linear_probe_full(FrozenBackbone(256), DataLoader(TensorDataset(x, y), batch_size=8), x, y, num_classes=40,
                      device=CPU, epochs=1)
    weight, bias = calls[0]["init"]
    assert weight.shape == (40, 256) and 0.0097 < weight.std().item() < 0.0103  # 10,240 draws: +-0.0001
    assert abs(weight.mean().item()) < 0.0005 and torch.equal(bias, torch.zeros(40))


def test_top1_and_top5_accuracy_by_hand():
    # 7 classes; each row's scores rank the classes 6, 5, 4, 3, 2, 1, 0 (class 6 first).
    logits = torch.arange(7.0).repeat(4, 1)
    labels = torch.tensor([6, 2, 1, 0])  # rank 1, rank 5, rank 6, rank 7
    top1, top5 = linear_module._accuracy(logits, labels)
    assert top1 == pytest.approx(25.0) and top5 == pytest.approx(50.0)
    assert linear_module._accuracy(logits[:, :3], torch.tensor([2, 2, 0, 1])) == pytest.approx((50.0, 100.0))


def test_the_probe_optimiser_is_sgd_with_the_given_settings():
    opt = linear_module._sgd(nn.Linear(3, 2), 0.3, 0.8, 0.01)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.3, 0.8, 0.01)


def test_fast_probe_defaults_are_the_configs_linear_defaults():
    import inspect

    from mobyssl.config import LinearConfig, TrainConfig

    d, params = LinearConfig(), inspect.signature(linear_probe_fast).parameters
    got = {k: params[k].default for k in ("epochs", "batch_size", "lr", "lr_ref_batch", "momentum", "weight_decay",
                                          "seed")}
    assert got == {"epochs": d.epochs, "batch_size": d.batch_size, "lr": d.lr, "lr_ref_batch": d.lr_ref_batch,
                   "momentum": d.momentum, "weight_decay": d.weight_decay, "seed": TrainConfig().seed}


def _fast_run(monkeypatch, seed=0, global_seed=0):
    """A fast probe over 10 samples (label = sample index) in batches of 4 for 2 epochs: the lr of each step and
    the samples of each batch, in order."""
    import types

    used, batches = [], []
    original = linear_module._sgd
    monkeypatch.setattr(linear_module, "_sgd", lambda *a, **k: record_step_lrs(original(*a, **k), used))

    def cross_entropy(logits, y, **kw):
        batches.append(y.tolist())
        return F.cross_entropy(logits, y, **kw)

    monkeypatch.setattr(linear_module, "F", types.SimpleNamespace(cross_entropy=cross_entropy))
    torch.manual_seed(global_seed)  # the probe's shuffling must not depend on it
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(1))
    linear_probe_fast(x, torch.arange(10), x, torch.arange(10), num_classes=10, epochs=2, batch_size=4, lr=0.3,
                      lr_ref_batch=64, momentum=0.8, seed=seed)
    return [u[0] for u in used], batches


def test_fast_probe_lr_schedule_batches_and_seeded_shuffling(monkeypatch):
    lrs, batches = _fast_run(monkeypatch)
    base = 0.3 * 4 / 64
    assert lrs == pytest.approx([0.5 * base * (1 + math.cos(math.pi * t / 6)) for t in range(6)], rel=1e-12)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]  # 3 batches per epoch, the last one short
    for epoch in (batches[:3], batches[3:]):
        assert sorted(sum(epoch, [])) == list(range(10))  # every sample once per epoch
    assert sum(batches[:3], []) != list(range(10)) and batches[:3] != batches[3:]  # shuffled, anew each epoch
    assert _fast_run(monkeypatch, global_seed=5)[1] == batches  # the order depends on the probe's seed only
    assert _fast_run(monkeypatch, seed=1)[1] != batches


def test_fast_probe_logs_five_times_with_the_epoch_and_loss():
    x, y = _separable(4, dim=4)
    lines: list[str] = []
    linear_probe_fast(x, y, x, y, num_classes=3, epochs=15, batch_size=4, log=lines.append)
    assert [line.split("  loss ")[0] for line in lines] == [f"linear (fast) epoch {e}/15" for e in (3, 6, 9, 12, 15)]
    assert all(float(line.split("  loss ")[1]) > 0 for line in lines)
    lines.clear()
    linear_probe_fast(x, y, x, y, num_classes=3, epochs=12, batch_size=4, log=lines.append)  # every 12 // 5 = 2
    assert [line.split("  loss ")[0] for line in lines] == [f"linear (fast) epoch {e}/12" for e in range(2, 13, 2)]
    lines.clear()
    linear_probe_fast(x, y, x, y, num_classes=3, epochs=3, batch_size=4, log=lines.append)
    assert [line.split("  loss ")[0] for line in lines] == [f"linear (fast) epoch {e}/3" for e in (1, 2, 3)]
