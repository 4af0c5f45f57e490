import math

import pytest
import torch
from helpers import perturb, random_bn_stats
from PIL import Image
from torch import nn
from torchvision import transforms as T

from mobyssl.config import load_config
from mobyssl.data.transforms import NORMALIZATION
from mobyssl.errors import ConfigError
from mobyssl.losses import DINOLoss
from mobyssl.methods import dino as dino_mod
from mobyssl.methods import get_method
from mobyssl.methods.dino import DINO, forward_by_size, teacher_temperatures
from mobyssl.models import create_backbone
from mobyssl.runtime import device_memory_bytes
from mobyssl.train.optim import param_groups
from mobyssl.train.trainer import make_scaler, train_step

OUT, HIDDEN, BOTTLENECK = 32, 16, 8
GLOBAL, LOCAL = 32, 16  # crop sides in pixels


# ---------------------------------------------------------------------------------------------------------------
# Helpers

def _backbone_fn(calls=None):
    """A tiny ViT factory with the trainer's signature; ``calls`` records ``(drop_path_rate, multi_size)``."""

    def backbone_fn(dpr, multi_size=False):
        if calls is not None:
            calls.append((dpr, multi_size))
        return create_backbone("vit_nano_patch4_32", drop_path_rate=dpr, depth=1, multi_size=multi_size)

    return backbone_fn


def _dino(n_crops=4, calls=None, **kw):
    args = dict(out_dim=OUT, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK, n_crops=n_crops)
    args.update(kw)
    return DINO(_backbone_fn(calls), **args)


def _views(n_crops=4, b=3, dtype=torch.float32):
    """The 2 global crops, then the local ones."""
    return ([torch.randn(b, 3, GLOBAL, GLOBAL, dtype=dtype) for _ in range(2)]
            + [torch.randn(b, 3, LOCAL, LOCAL, dtype=dtype) for _ in range(n_crops - 2)])



def _linears(head):
    return [(lin.in_features, lin.out_features) for lin in head.mlp if isinstance(lin, nn.Linear)]


def _magnitude(head):
    return head.last_layer.parametrizations.weight.original0


def _hand_momentum(step, total, base):
    """DINO's ``momentum_schedule[it]`` for its 0-based iteration ``it = step - 1`` (``step``: 1-based, just taken)."""
    return 1 - (1 - base) * (1 + math.cos(math.pi * (step - 1) / total)) / 2


def _hand_teacher_temp(step, steps_per_epoch, warmup_temp, temp, warmup_epochs):
    """Per epoch: ``warmup_temp -> temp`` linearly over ``warmup_epochs`` with both ends included, then ``temp``."""
    epoch = step // steps_per_epoch
    if epoch >= warmup_epochs:
        return temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (temp - warmup_temp) * epoch / (warmup_epochs - 1)


def _crop_by_crop(m, views):
    """Student and teacher head outputs computed one crop at a time (no batching by size), crop-major rows."""
    with torch.no_grad():
        student = torch.cat([m.student_head(m.student(v)) for v in views])
        teacher = torch.cat([m.teacher_head(m.teacher(v)) for v in views[:2]])
    return student, teacher


def _dino_cfg(tmp_path, *overrides):
    return load_config("quickstart", ["method.name=dino", "data.num_workers=0", "model.backbone=vit_nano_patch4_32",
                                      "model.kwargs={depth: 1}", f"output_dir={tmp_path / 'run'}", *overrides])


# ---------------------------------------------------------------------------------------------------------------
# Construction

def test_registry():
    assert get_method("dino") is DINO and DINO.name == "dino"


def test_drop_path_rates_reach_the_backbone_fn_student_first():
    calls = []
    _dino(calls=calls, drop_path_rate=0.3, teacher_drop_path_rate=0.05)
    assert calls == [(0.3, True), (0.05, True)]  # the student, then the teacher


@pytest.mark.parametrize("n_crops, multi_size", [(2, False), (3, True), (10, True)])
def test_multi_size_backbones_only_with_local_crops(n_crops, multi_size):
    calls = []
    _dino(n_crops=n_crops, calls=calls)
    assert [ms for _, ms in calls] == [multi_size, multi_size]


def test_constructor_defaults_are_dinos():
    """Drop path 0.1 / 0, a 3-layer 2048-256-65536 head without BN whose last layer's norm is fixed, momentum 0.996,
    temperatures 0.04 (no warm-up) / 0.1, centre momentum 0.9, last layer frozen 1 epoch, 2 + 8 crops."""
    calls = []
    m = DINO(_backbone_fn(calls))
    assert calls == [(0.1, True), (0.0, True)]
    dim = m.student.num_features
    for head in (m.student_head, m.teacher_head):
        assert _linears(head) == [(dim, 2048), (2048, 2048), (2048, 256)]
        assert not any(isinstance(layer, nn.BatchNorm1d) for layer in head.modules())
        assert tuple(head.last_layer.parametrizations.weight.original1.shape) == (65536, 256)
    assert not _magnitude(m.student_head).requires_grad  # norm_last_layer=True
    assert m.criterion.out_dim == 65536 and m.criterion.n_crops == m.n_crops == 10
    assert m.criterion.student_temp == 0.1 and m.criterion.center_momentum == 0.9
    assert m.base_momentum == 0.996 and m.momentum_at(1, 100) == 0.996
    assert m.teacher_temp.item() == pytest.approx(0.04, rel=1e-7)
    m.on_step_start(0, 100, 10)  # no warm-up: 0.04 from the first step
    assert m.teacher_temp.item() == pytest.approx(0.04, rel=1e-7)
    assert m.freeze_last_layer == 1


def test_teacher_starts_as_exact_copy_of_the_student_parameters_and_buffers(monkeypatch):
    # Every BatchNorm starts with its own random statistics, so equal buffers prove they were copied; the teacher
    # is built from a fresh random init, so equal parameters prove they were copied too.
    random_bn_stats(monkeypatch)
    torch.manual_seed(0)
    m = _dino(use_bn_in_head=True, drop_path_rate=0.2, teacher_drop_path_rate=0.0)
    for student, teacher in ((m.student, m.teacher), (m.student_head, m.teacher_head)):
        s, t = student.state_dict(), teacher.state_dict()
        assert list(s) == list(t)
        for k in s:
            assert torch.equal(s[k], t[k]), k
        for ps, pt in zip(student.parameters(), teacher.parameters()):
            assert ps.data_ptr() != pt.data_ptr()  # copies, not shared storage
    bn = [k for k in m.student_head.state_dict() if k.endswith("running_mean")]
    assert len(bn) == 2 and int(m.student_head.mlp[1].num_batches_tracked) > 0  # the BatchNorms are really there
    assert not torch.equal(m.student_head.mlp[1].running_mean, m.student_head.mlp[4].running_mean)  # and random


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_teacher_is_frozen_and_the_students_last_layer_follows_norm_last_layer(norm_last_layer):
    m = _dino(norm_last_layer=norm_last_layer)
    assert all(not p.requires_grad for mod in (m.teacher, m.teacher_head) for p in mod.parameters())
    assert all(p.requires_grad for p in m.student.parameters())
    for name, p in m.student_head.named_parameters():
        expected = not norm_last_layer if name == "last_layer.parametrizations.weight.original0" else True
        assert p.requires_grad == expected, name
    assert torch.equal(_magnitude(m.student_head), torch.ones(OUT, 1))  # g starts at 1 either way
    assert torch.equal(_magnitude(m.teacher_head), torch.ones(OUT, 1))


@pytest.mark.parametrize("layers, bn", [(1, False), (2, True), (3, False)])
def test_heads_have_the_configured_widths_layers_and_batchnorm(layers, bn):
    m = _dino(out_dim=24, hidden_dim=12, bottleneck_dim=6, head_layers=layers, use_bn_in_head=bn)
    dim = m.student.num_features
    expected = [(dim, 6)] if layers == 1 else [(dim, 12)] + [(12, 12)] * (layers - 2) + [(12, 6)]
    for head in (m.student_head, m.teacher_head):
        assert _linears(head) == expected
        assert sum(isinstance(layer, nn.BatchNorm1d) for layer in head.modules()) == (layers - 1 if bn else 0)
        assert tuple(head.last_layer.parametrizations.weight.original1.shape) == (24, 6)
    assert m.student_head(torch.randn(2, dim)).shape == (2, 24) and m.criterion.out_dim == 24


def test_backbones_modules_and_momentum_pairs():
    m = _dino()
    assert m.backbone is m.teacher and m.trained_backbone is m.student
    assert m.trainable_modules() == [m.student, m.student_head]
    pairs = m.momentum_pairs()
    assert len(pairs) == 2
    assert pairs[0][0] is m.student and pairs[0][1] is m.teacher
    assert pairs[1][0] is m.student_head and pairs[1][1] is m.teacher_head
    # backbone_key names the attribute holding ``backbone`` in the state dict (exported weights).
    keys = {k[len(m.backbone_key) + 1:] for k in m.state_dict() if k.startswith(m.backbone_key + ".")}
    assert keys == set(m.backbone.state_dict())


# ---------------------------------------------------------------------------------------------------------------
# Config

def test_from_config_wires_every_option_into_the_method(tmp_path):
    """Every method.* and model.* value reaches DINO (non-default values, so a dropped argument cannot pass)."""
    cfg = _dino_cfg(tmp_path, "train.epochs=6", "model.drop_path_rate=0.15", "model.target_drop_path_rate=0.05",
                    "method.out_dim=40", "method.hidden_dim=20", "method.bottleneck_dim=12", "method.head_layers=2",
                    "method.use_bn_in_head=true", "method.norm_last_layer=false", "method.momentum=0.95",
                    "method.teacher_temp=0.06", "method.warmup_teacher_temp=0.03",
                    "method.warmup_teacher_temp_epochs=2", "method.student_temp=0.2", "method.center_momentum=0.8",
                    "method.freeze_last_layer=3", "method.local_crops_number=3", f"method.local_crop_size={LOCAL}")
    calls = []
    m = DINO.from_config(cfg, _backbone_fn(calls))
    assert calls == [(0.15, True), (0.05, True)]
    dim = m.student.num_features
    for head in (m.student_head, m.teacher_head):
        assert _linears(head) == [(dim, 20), (20, 12)]
        assert sum(isinstance(layer, nn.BatchNorm1d) for layer in head.modules()) == 1
        assert tuple(head.last_layer.parametrizations.weight.original1.shape) == (40, 12)
    assert _magnitude(m.student_head).requires_grad  # norm_last_layer=false
    assert m.criterion.out_dim == 40 and m.criterion.n_crops == m.n_crops == 5  # 2 + local_crops_number
    assert m.criterion.student_temp == 0.2 and m.criterion.center_momentum == 0.8
    assert m.momentum_at(1, 60) == 0.95
    # Teacher temperature 0.03 -> 0.06 over 2 epochs (here of 10 steps), then 0.06.
    assert m.teacher_temp.item() == pytest.approx(0.03, rel=1e-7)
    for step, temp in ((0, 0.03), (9, 0.03), (10, 0.06), (59, 0.06)):
        m.on_step_start(step, 60, 10)
        assert m.teacher_temp.item() == pytest.approx(temp, rel=1e-7), step
    # Last layer frozen during epochs 0..2.
    for epoch, dropped in ((2, True), (3, False)):
        for p in m.student_head.parameters():
            p.grad = torch.ones_like(p)
        m.on_after_backward(epoch)
        assert (m.student_head.last_layer.parametrizations.weight.original1.grad is None) == dropped, epoch
    # And it runs on views of those sizes.
    out = m(_views(5, b=2))
    assert torch.isfinite(out["loss"])


def test_from_config_keeps_the_last_layers_norm_fixed_by_default(tmp_path):
    cfg = _dino_cfg(tmp_path, "method.out_dim=16", "method.hidden_dim=8", "method.bottleneck_dim=4")
    m = DINO.from_config(cfg, _backbone_fn())
    assert cfg.method.norm_last_layer is True and not _magnitude(m.student_head).requires_grad


def test_from_config_without_local_crops_builds_single_size_backbones(tmp_path):
    cfg = _dino_cfg(tmp_path, "method.out_dim=16", "method.hidden_dim=8", "method.bottleneck_dim=4",
                    "method.local_crops_number=0")
    calls = []
    m = DINO.from_config(cfg, _backbone_fn(calls))
    assert [ms for _, ms in calls] == [False, False] and m.n_crops == 2


@pytest.mark.parametrize("size, fix", [(18, "16 or 20"), (10, "8 or 12")])
def test_local_crops_that_do_not_tile_into_patches_are_a_config_error(tmp_path, size, fix):
    small = ["method.out_dim=16", "method.hidden_dim=8", "method.bottleneck_dim=4", "method.local_crops_number=2"]
    cfg = _dino_cfg(tmp_path, *small, f"method.local_crop_size={size}")
    with pytest.raises(ConfigError, match=rf"method\.local_crop_size={size} is not a multiple of the patch size 4 .*"
                                          rf"Use method\.local_crop_size={fix}"):
        DINO.from_config(cfg, _backbone_fn())
    cfg = _dino_cfg(tmp_path, *small[:3], "method.local_crops_number=0", f"method.local_crop_size={size}")
    DINO.from_config(cfg, _backbone_fn())  # no local crops: the size is not used


class _Patched(nn.Module):
    """A stand-in backbone: ``patch_size`` on a ``patch_embed`` (or no patch embedding at all)."""

    num_features = 8

    def __init__(self, patch_size=None):
        super().__init__()
        if patch_size is not None:
            self.patch_embed = nn.Module()
            self.patch_embed.patch_size = patch_size
        self.proj = nn.Linear(3, 8)

    def forward(self, x):
        return self.proj(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("patch, size, error", [
    (16, 10, "patch size 16 .*Use method\\.local_crop_size=16\\.$"),   # smaller than one patch: one patch up
    ((4, 8), 12, "patch size 4x8 .*Use method\\.local_crop_size=8 or 16\\."),  # both sides must tile
    (None, 10, None), ((4, 4), 12, None), (4, 12, None),            # no patch embedding; int or pair patch sizes
])
def test_local_crop_check_reads_any_patch_size(tmp_path, patch, size, error):
    small = ["method.out_dim=16", "method.hidden_dim=8", "method.bottleneck_dim=4", "method.local_crops_number=2",
             f"method.local_crop_size={size}"]
    cfg = _dino_cfg(tmp_path, *small)
    build = lambda dpr, multi_size=False: _Patched(patch)  # noqa: E731
    if error is None:
        assert DINO.from_config(cfg, build).n_crops == 4
    else:
        with pytest.raises(ConfigError, match=error):
            DINO.from_config(cfg, build)


def test_warmup_longer_than_training_is_a_config_error(tmp_path):
    small = ["method.out_dim=16", "method.hidden_dim=8", "method.bottleneck_dim=4"]
    cfg = _dino_cfg(tmp_path, "train.epochs=4", "method.warmup_teacher_temp_epochs=5", *small)
    with pytest.raises(ConfigError, match=r"method\.warmup_teacher_temp_epochs=5.*train\.epochs=4"):
        DINO.from_config(cfg, _backbone_fn())
    cfg = _dino_cfg(tmp_path, "train.epochs=4", "method.warmup_teacher_temp_epochs=4", *small)
    DINO.from_config(cfg, _backbone_fn())  # as long as training is fine


def test_head_memory_by_hand():
    # 5 float32 copies of the last layer (10 x (4 + 1)) and 3 of the outputs (6 images x (3 crops + 2) x 10).
    assert dino_mod.head_memory_bytes(10, 4, 1, 6, 3) == 4 * (5 * 10 * 5 + 3 * 6 * 5 * 10)
    assert dino_mod.head_memory_bytes(10, 4, 2, 6, 3) == 2 * dino_mod.head_memory_bytes(10, 4, 1, 6, 3)


def test_a_head_wider_than_this_machines_memory_is_refused_before_it_is_built(tmp_path):
    total = device_memory_bytes(torch.device("cpu"))
    assert total and total > 2**30
    bottleneck = 65536  # the largest allowed: 2**20 x 65536 x 5 x 4 bytes = 1.25 TiB of last layers
    assert dino_mod.head_memory_bytes(2**20, bottleneck, 1, 1, 2) > total
    cfg = _dino_cfg(tmp_path, "train.device=cpu", f"method.out_dim={2**20}", f"method.bottleneck_dim={bottleneck}",
                    "method.hidden_dim=8")
    built = []
    with pytest.raises(ConfigError, match=r"method\.out_dim=1048576 \(with method\.bottleneck_dim=65536\).*GiB of "
                       r"this machine's RAM\. Lower method\.out_dim .*method\.bottleneck_dim or train\.batch_size"):
        DINO.from_config(cfg, lambda *a, **k: built.append(a))
    assert built == []  # refused before any network was built


@pytest.mark.parametrize("method", ["dino", "esvit"])
@pytest.mark.parametrize("world, accum", [(1, 1), (2, 1), (1, 4)])
def test_the_head_check_counts_the_images_per_device_and_the_heads_per_branch(tmp_path, monkeypatch, method, world,
                                                                               accum):
    small = ["method.out_dim=1000", "method.hidden_dim=8", "method.bottleneck_dim=20", "method.local_crops_number=2",
             "method.local_crop_size=16", "train.batch_size=64", f"train.accum_steps={accum}"]
    cfg = _dino_cfg(tmp_path, f"method.name={method}", *small)
    cls = get_method(method)
    heads = {"dino": 1, "esvit": 2}[method]
    need = dino_mod.head_memory_bytes(1000, 20, heads, 64 // (world * accum), 4)
    monkeypatch.setattr(dino_mod.D, "world_size", lambda: world)
    monkeypatch.setattr(dino_mod, "device_memory_bytes", lambda device: need)
    cls.from_config(cfg, _backbone_fn())  # exactly fits
    monkeypatch.setattr(dino_mod, "device_memory_bytes", lambda device: need - 1)
    with pytest.raises(ConfigError, match=r"method\.out_dim=1000"):
        cls.from_config(cfg, _backbone_fn())
    monkeypatch.setattr(dino_mod, "device_memory_bytes", lambda device: None)  # unknown: no check
    cls.from_config(cfg, _backbone_fn())


# ---------------------------------------------------------------------------------------------------------------
# Augmentations

_CROP_OVERRIDES = [f"data.image_size={GLOBAL}", "method.local_crops_number=3", f"method.local_crop_size={LOCAL}",
                   "method.global_crop_scale=[0.5, 0.9]", "method.local_crop_scale=[0.1, 0.3]",
                   "data.aug.blur_prob=[0.9, 0.3]", "data.aug.solarize_prob=[0.1, 0.4]", "method.local_blur_prob=0.6"]


def test_crops_take_the_global_blur_and_solarize_from_data_aug_and_the_local_blur_from_the_method(tmp_path):
    crops = DINO.crops(_dino_cfg(tmp_path, *_CROP_OVERRIDES))
    assert (crops.global_size, crops.n_local, crops.local_size) == (GLOBAL, 3, LOCAL)
    assert crops.global_scale == (0.5, 0.9) and crops.local_scale == (0.1, 0.3)
    assert crops.global_blur_prob == (0.9, 0.3) and crops.global_solarize_prob == (0.1, 0.4)
    assert crops.local_blur_prob == 0.6 and crops.local_solarize_prob == 0.0
    # DINO's own values under its ImageNet recipe.
    imagenet = DINO.crops(load_config("dino_vit_small_in1k"))
    assert imagenet.global_blur_prob == (1.0, 0.1) and imagenet.global_solarize_prob == (0.0, 0.2)
    assert imagenet.local_blur_prob == 0.5


def test_train_transform_gives_two_global_and_the_configured_local_crops(tmp_path):
    cfg = _dino_cfg(tmp_path, *_CROP_OVERRIDES, "data.normalization=cifar10")
    t = DINO.train_transform(cfg)
    crops = [next(op for op in view.transforms if isinstance(op, T.RandomResizedCrop)) for view in t.transforms]
    assert [tuple(c.size) for c in crops] == [(GLOBAL, GLOBAL)] * 2 + [(LOCAL, LOCAL)] * 3
    assert [tuple(c.scale) for c in crops] == [(0.5, 0.9)] * 2 + [(0.1, 0.3)] * 3
    norms = [op for view in t.transforms for op in view.transforms if isinstance(op, T.Normalize)]
    mean, std = NORMALIZATION["cifar10"]
    assert len(norms) == 5 and mean != NORMALIZATION["imagenet"][0]
    assert all(list(n.mean) == list(mean) and list(n.std) == list(std) for n in norms)
    views = t(Image.new("RGB", (48, 40), (120, 60, 30)))
    assert [tuple(v.shape) for v in views] == [(3, GLOBAL, GLOBAL)] * 2 + [(3, LOCAL, LOCAL)] * 3


def test_device_transform_gives_the_same_views_from_a_uint8_batch(tmp_path, monkeypatch):
    import mobyssl.data.gpu_augment as gpu_augment

    cfg = _dino_cfg(tmp_path, *_CROP_OVERRIDES, "data.normalization=cifar10")
    geometry, photometric = [], []
    real = gpu_augment.random_resized_crops

    def recording_crops(images, size, scale, *args, **kw):
        geometry.append((size, tuple(scale)))
        return real(images, size, scale, *args, **kw)

    def grey(x, aug, blur_prob, solarize_prob, generator=None, **_):  # every pixel 0.5 before normalisation
        assert aug == cfg.data.aug  # data.aug's colour jitter, grayscale and blur sigmas reach every view
        photometric.append((blur_prob, solarize_prob))
        return torch.full_like(x, 0.5)

    monkeypatch.setattr(gpu_augment, "random_resized_crops", recording_crops)
    monkeypatch.setattr(gpu_augment, "photometric", grey)
    t = DINO.device_transform(cfg)
    views = t(torch.randint(0, 256, (4, 3, 40, 48), dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(4, 3, GLOBAL, GLOBAL)] * 2 + [(4, 3, LOCAL, LOCAL)] * 3
    assert geometry == [(GLOBAL, (0.5, 0.9))] * 2 + [(LOCAL, (0.1, 0.3))] * 3
    # The configured blur / solarize probabilities per crop kind, and data.normalization's statistics.
    assert photometric == [(0.9, 0.1), (0.3, 0.4)] + [(0.6, 0.0)] * 3
    mean, std = (torch.tensor(x).view(1, 3, 1, 1) for x in NORMALIZATION["cifar10"])
    for v in views:
        assert torch.allclose(v, ((0.5 - mean) / std).expand_as(v), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Forward

def _record_inputs(module, calls):
    module.register_forward_hook(lambda mod, args, out: calls.append(args[0]))


def test_teacher_sees_the_global_crops_student_every_crop_batched_by_size():
    torch.manual_seed(0)
    m = _dino(n_crops=5)
    student, teacher, student_head, teacher_head = [], [], [], []
    _record_inputs(m.student, student)
    _record_inputs(m.teacher, teacher)
    _record_inputs(m.student_head, student_head)
    _record_inputs(m.teacher_head, teacher_head)
    views = _views(5, b=3)
    m(views)
    # One backbone pass per run of same-size crops, crop-major rows; each head once, on every row.
    assert [tuple(x.shape) for x in student] == [(6, 3, GLOBAL, GLOBAL), (9, 3, LOCAL, LOCAL)]
    assert torch.equal(student[0], torch.cat(views[:2])) and torch.equal(student[1], torch.cat(views[2:]))
    assert [tuple(x.shape) for x in teacher] == [(6, 3, GLOBAL, GLOBAL)]
    assert torch.equal(teacher[0], torch.cat(views[:2]))
    assert [x.shape[0] for x in student_head] == [15] and [x.shape[0] for x in teacher_head] == [6]


def test_forward_by_size_batches_only_consecutive_equal_sizes_and_keeps_the_order():
    calls = []
    backbone = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, C, H, W) -> (B, C), any size
    _record_inputs(backbone, calls)
    a, b, c, d = (torch.randn(2, 3, s, s) for s in (4, 4, 2, 4))
    out = forward_by_size(backbone, [a, b, c, d])
    assert [tuple(x.shape) for x in calls] == [(4, 3, 4, 4), (2, 3, 2, 2), (2, 3, 4, 4)]  # d not batched with a, b
    assert torch.equal(calls[0], torch.cat([a, b]))
    assert torch.equal(out, torch.cat([backbone(x) for x in (a, b, c, d)]))  # crop-major rows, in the views' order


def _hand_loss(center, teacher_temp, student, teacher, n_crops=5, student_temp=0.2, center_momentum=0.7):
    """A fresh ``DINOLoss`` (float64) with the given centre, applied by hand; returns its outputs and its new centre."""
    loss = DINOLoss(OUT, n_crops, student_temp=student_temp, center_momentum=center_momentum).double()
    loss.center.copy_(center)
    return loss(student, teacher, teacher_temp), loss.center


def test_loss_equals_dino_loss_on_the_crop_by_crop_head_outputs():
    """float64: the method's loss is DINOLoss (old centre, this step's teacher temperature, the configured student
    temperature and centre momentum) on the student's outputs for every crop and the teacher's for the 2 global
    crops, each computed crop by crop, so batching by size changes nothing; the centre then moves with the raw
    teacher outputs."""
    torch.manual_seed(0)
    m = _dino(n_crops=5, drop_path_rate=0.0, student_temp=0.2, center_momentum=0.7, teacher_temp=0.05).double()
    m.on_step_start(0, 10, 5)  # as the trainer does; sets 0.05 exactly in the float64 buffer
    perturb(m.teacher, m.teacher_head)  # the teacher differs from the student, as after some training
    with torch.no_grad():
        m.criterion.center.copy_(torch.randn(1, OUT, dtype=torch.float64))
    center = m.criterion.center.clone()
    views = _views(5, b=3, dtype=torch.float64)
    student, teacher = _crop_by_crop(m, views)
    out = m(views)
    expected, new_center = _hand_loss(center, 0.05, student, teacher)
    assert out.keys() == expected.keys()
    for k in expected:
        assert abs(out[k].item() - expected[k].item()) < 1e-10, k
    assert torch.allclose(m.criterion.center, new_center, rtol=0, atol=1e-12)
    assert not torch.allclose(new_center, center, rtol=0, atol=1e-3)
    # Each alternative wiring gives a loss different by far more than the 1e-10 above (the swap of the two global
    # targets changes only 2 of the 8 pairs, by ~1e-5), so the match above pins this one.
    alternatives = {
        "teacher outputs from the student": (center, 0.05, student, student[:6]),
        "global crops swapped in the teacher": (center, 0.05, student, torch.cat([teacher[3:], teacher[:3]])),
        "teacher temperature 0.04 (the default)": (center, 0.04, student, teacher),
        "new centre": (new_center, 0.05, student, teacher),
        "no centre": (torch.zeros_like(center), 0.05, student, teacher),
    }
    for what, args in alternatives.items():
        assert abs(_hand_loss(*args)[0]["loss"].item() - out["loss"].item()) > 1e-6, what


def test_only_the_student_gets_gradients():
    torch.manual_seed(0)
    m = _dino(norm_last_layer=False)
    teacher_out = []
    m.teacher_head.register_forward_hook(lambda mod, args, out: teacher_out.append(out))
    m(_views())["loss"].backward()
    assert len(teacher_out) == 1 and not teacher_out[0].requires_grad
    for mod in (m.teacher, m.teacher_head):
        assert all(p.grad is None for p in mod.parameters())
    for mod in (m.student, m.student_head):
        for name, p in mod.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("n_views", [3, 5, 10])
def test_wrong_number_of_views_is_an_error(n_views):
    m = _dino(n_crops=4)
    with pytest.raises(ValueError, match=f"built for 4 crops.*got {n_views} views"):
        m(_views(n_views, b=2))


# ---------------------------------------------------------------------------------------------------------------
# Teacher temperature

@pytest.mark.parametrize("warmup_epochs", [0, 1, 3, 10])
def test_teacher_temperature_per_step_follows_the_per_epoch_schedule(warmup_epochs):
    """10 epochs of 5 steps: warm-up 0.04 -> 0.07 over ``warmup_epochs`` (both ends included), then 0.07. Each
    value depends on the step only (a resumed run sets the same), whatever the order of the calls."""
    m = _dino(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=warmup_epochs).double()
    # Before any step: the first step's value (the buffer was made in float32 before .double()).
    assert m.teacher_temp.item() == pytest.approx(0.04 if warmup_epochs else 0.07, rel=1e-7)
    steps = list(range(50))
    for step in steps[::-1] + steps[:17] + steps[30:] + steps[17:30]:
        m.on_step_start(step, 50, 5)
        expected = _hand_teacher_temp(step, 5, 0.04, 0.07, warmup_epochs)
        assert m.teacher_temp.item() == pytest.approx(expected, abs=1e-12), step


@pytest.mark.parametrize("warmup, epochs", [(0, 5), (2, 5), (5, 5), (3, 1)])
def test_teacher_temperatures_has_one_value_per_epoch(warmup, epochs):
    temps = teacher_temperatures(0.04, 0.07, warmup, epochs)
    assert len(temps) == max(epochs, warmup)  # a warm-up longer than training keeps its whole ramp
    assert temps[-1] == pytest.approx(0.07)
    if warmup:
        assert temps[0] == pytest.approx(0.04) and temps[warmup - 1] == pytest.approx(0.07)


def _temperatures_seen(m, total_steps: int, steps_per_epoch: int) -> list[float]:
    """The teacher temperature ``on_step_start`` sets for each step of a run, in order."""
    seen = []
    for step in range(total_steps):
        m.on_step_start(step, total_steps, steps_per_epoch)
        seen.append(m.teacher_temp.item())
    return seen


def test_teacher_temperature_with_one_step_per_epoch():
    """One step per epoch: the epoch is the step."""
    m = _dino(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3).double()
    assert _temperatures_seen(m, 5, 1) == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07], abs=1e-12)


def test_warmup_starts_at_dinos_default_temperature():
    m = _dino(teacher_temp=0.07, warmup_teacher_temp_epochs=2)  # warmup_teacher_temp left at its default
    assert m.teacher_temp.item() == pytest.approx(0.04, rel=1e-7)
    m.on_step_start(0, 40, 10)
    assert m.teacher_temp.item() == pytest.approx(0.04, rel=1e-7)


def test_teacher_temperature_warmup_over_three_epochs_by_the_numbers():
    m = _dino(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3).double()
    expected = [0.04] * 5 + [0.055] * 5 + [0.07] * 40
    assert _temperatures_seen(m, 50, 5) == pytest.approx(expected, abs=1e-12)


def test_teacher_temperature_reaches_the_loss():
    torch.manual_seed(0)
    m = _dino(n_crops=3, drop_path_rate=0.0, warmup_teacher_temp=0.04, teacher_temp=0.07,
              warmup_teacher_temp_epochs=3).double()
    perturb(m.teacher, m.teacher_head, scale=0.3)
    m.eval()  # the centre stays where it is between the two forwards
    views = _views(3, b=4, dtype=torch.float64)
    student, teacher = _crop_by_crop(m, views)
    losses = {}
    for step, temp in ((2, 0.04), (7, 0.055), (12, 0.07)):
        m.on_step_start(step, 50, 5)
        losses[temp] = m(views)["loss"].item()
        expected = _hand_loss(m.criterion.center, temp, student, teacher, n_crops=3, student_temp=0.1,
                              center_momentum=0.9)[0]["loss"].item()
        assert abs(losses[temp] - expected) < 1e-10, temp
    assert abs(losses[0.04] - losses[0.055]) > 1e-3 and abs(losses[0.055] - losses[0.07]) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Momentum

def test_momentum_at_is_dinos_schedule_for_the_step_just_taken():
    m = _dino(momentum=0.99)
    assert m.momentum_at(1, 20) == 0.99  # the first step uses the base momentum exactly
    for step in range(1, 21):
        assert m.momentum_at(step, 20) == pytest.approx(_hand_momentum(step, 20, 0.99), abs=1e-15), step
    assert m.momentum_at(20, 20) < 1.0  # DINO's schedule never reaches 1 (its last value is cos(pi (N-1) / N))


def test_on_step_end_moves_teacher_backbone_and_head_by_the_momentum():
    torch.manual_seed(0)
    m = _dino(momentum=0.9, use_bn_in_head=True).double()
    perturb(m)  # student and teacher differ everywhere, the frozen magnitudes g included
    with torch.no_grad():  # and so do the heads' BatchNorm statistics
        for b in m.student_head.buffers():
            b.add_(1)
    teacher_buffers = [b.clone() for b in m.teacher_head.buffers()]
    assert len(teacher_buffers) == 6  # 2 BatchNorms: running mean, variance, count
    pairs = {"backbone": (m.student, m.teacher), "head": (m.student_head, m.teacher_head)}
    online = {k: {n: p.clone() for n, p in o.named_parameters()} for k, (o, _) in pairs.items()}
    target = {k: {n: p.clone() for n, p in t.named_parameters()} for k, (_, t) in pairs.items()}

    # A skipped step (apply False, decided on the device) leaves the teacher alone.
    m.on_step_end(3, 10, apply=torch.tensor(False))
    for k, (_, t) in pairs.items():
        assert all(torch.equal(target[k][n], p) for n, p in t.named_parameters()), k

    for step, apply in ((3, torch.tensor(True)), (4, True)):
        logs = m.on_step_end(step, 10, apply=apply)
        mom = _hand_momentum(step, 10, 0.9)  # 0.9095... at step 3
        assert logs["momentum"] == pytest.approx(mom, abs=1e-15)
        for k, (o, t) in pairs.items():
            new = dict(t.named_parameters())
            assert new.keys() == target[k].keys()
            for n, p in new.items():
                assert torch.allclose(p, mom * target[k][n] + (1 - mom) * online[k][n], rtol=0, atol=1e-12), (k, n)
                assert (p - target[k][n]).abs().max() > 1e-4, (k, n)  # it did move
            target[k] = {n: p.clone() for n, p in new.items()}
            assert all(torch.equal(online[k][n], p) for n, p in o.named_parameters()), k  # the student is untouched

    # By hand on one parameter of each, the frozen magnitude included (step 5 of 10, base 0.9).
    mom = 1 - 0.1 * (1 + math.cos(math.pi * 4 / 10)) / 2
    named = [(m.student.blocks[0].attn.qkv.weight, m.teacher.blocks[0].attn.qkv.weight),
             (m.student_head.mlp[0].weight, m.teacher_head.mlp[0].weight),
             (_magnitude(m.student_head), _magnitude(m.teacher_head))]
    before = [t.clone() for _, t in named]
    m.on_step_end(5, 10)
    for (s, t), old in zip(named, before):
        assert torch.allclose(t, mom * old + (1 - mom) * s, rtol=0, atol=1e-12)
        assert not torch.allclose(t, old, rtol=0, atol=1e-4)
    # Parameters only: BatchNorm statistics are not averaged (DINO's EMA zips the parameters).
    assert all(torch.equal(a, b) for a, b in zip(teacher_buffers, m.teacher_head.buffers()))


# ---------------------------------------------------------------------------------------------------------------
# Freezing the last layer

_LAST = {"last_layer.parametrizations.weight.original0", "last_layer.parametrizations.weight.original1"}


@pytest.mark.parametrize("freeze, epoch, dropped", [(1, 0, True), (1, 1, False), (0, 0, False), (2, 1, True),
                                                    (2, 2, False), (2, 5, False)])
def test_on_after_backward_drops_the_last_layer_gradients_while_frozen(freeze, epoch, dropped):
    torch.manual_seed(0)
    m = _dino(freeze_last_layer=freeze, norm_last_layer=False)  # g is trainable too: both last_layer parameters
    grads = {}
    for prefix, mod in (("student", m.student), ("head", m.student_head)):
        for n, p in mod.named_parameters():
            p.grad = torch.randn_like(p)
            grads[prefix, n] = (p.grad, p.grad.clone())
    assert _LAST <= {n for _, n in grads}
    m.on_after_backward(epoch)
    for prefix, mod in (("student", m.student), ("head", m.student_head)):
        for n, p in mod.named_parameters():
            if dropped and prefix == "head" and "last_layer" in n:
                assert p.grad is None, n
            else:  # kept as it was: the same tensor, unchanged
                assert p.grad is grads[prefix, n][0] and torch.equal(p.grad, grads[prefix, n][1]), (prefix, n)


def test_train_step_leaves_the_last_layer_alone_during_the_first_epoch():
    """Through the trainer's step with AdamW and weight decay: a dropped gradient means no update and no decay."""
    torch.manual_seed(0)
    m = _dino(norm_last_layer=False)
    opt = torch.optim.AdamW(param_groups(m.trainable_modules(), 0.1), lr=1e-2)
    scaler = make_scaler(torch.device("cpu"), None)
    views = _views(4, b=4)
    for epoch, moves in ((0, False), (1, True)):
        before = {n: p.clone() for n, p in m.student_head.named_parameters()}
        train_step(m, views, opt, scaler, 1e-2, 3.0, epoch=epoch)
        for n, p in m.student_head.named_parameters():
            changed = not torch.equal(p, before[n])
            assert changed == (moves or "last_layer" not in n), (epoch, n)


# ---------------------------------------------------------------------------------------------------------------
# Collapse

@pytest.mark.parametrize("kl, entropy, kind", [
    (0.5, 8.0, None),                                     # a healthy step: the student does not copy the teacher
    (0.01, 10.3, None),                                   # the threshold itself is not collapse
    (0.0099, 10.3, "uniform targets"),                    # entropy > 0.9 log K
    (0.001, 0.05, "one dimension dominates"),
    (0.001, 1.5, "the student copies the teacher"),
])
def test_collapse_signs_are_dinos_two_modes(kl, entropy, kind):
    m = _dino()  # out_dim 32: log K = 3.466
    entropy = min(entropy, math.log(OUT))  # the uniform case at its maximum, log K
    signs = m.collapse_signs({"loss": 1.0, "kl_teacher_student": kl, "teacher_entropy": entropy})
    if kind is None:
        assert signs is None
    else:
        assert f"): {kind};" in signs and f"kl_teacher_student {kl:.4f} < 0.01" in signs and "log K = 3.47" in signs
    assert m.collapse_signs({"loss": 1.0}) is None  # statistics not logged: nothing to say
    assert m.collapse_signs({"loss": 1.0, "kl_teacher_student": 0.001}) is None  # nor with one of the two


def test_collapse_kinds_at_their_thresholds():
    m = _dino()
    log_k = math.log(OUT)
    for entropy, kind in ((0.9 * log_k, "the student copies the teacher"), (0.1 * log_k, "the student copies the teacher"),
                          (0.9 * log_k + 1e-9, "uniform targets"), (0.1 * log_k - 1e-9, "one dimension dominates")):
        signs = m.collapse_signs({"kl_teacher_student": 0.0, "teacher_entropy": entropy})
        assert f"): {kind};" in signs, (entropy, signs)
