"""DINO/EsViT's multi-crop augmentation: the CPU (PIL) views and the batched device views."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import apply_with_torchvision
from PIL import Image
from torchvision import transforms as T
from torchvision.ops import roi_align

from mobyssl.config import AugConfig
from mobyssl.data.gpu_augment import (
    BatchMoBYAugment,
    BatchMultiCropAugment,
    resized_crops,
    sample_crop_boxes,
)
from mobyssl.data.transforms import (
    NORMALIZATION,
    MultiCrop,
    MultiView,
    RandomGaussianBlur,
    Solarize,
    moby_transform,
    moby_view,
    multicrop_transform,
)

# Small crops keep the PIL tests fast; the probabilities are DINO's defaults.
SMALL = MultiCrop(global_size=16, local_size=8, n_local=3)
# Only the probabilistic ops that the statistics tests look for: no jitter, no grayscale, a strong blur.
PLAIN = AugConfig(color_jitter_prob=0.0, grayscale_prob=0.0, blur_sigma=[1.0, 2.0])


def _seed(s: int) -> None:
    torch.manual_seed(s)
    random.seed(s)


def _noise(h: int, w: int, lo: int = 0, hi: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, (h, w, 3), dtype=np.uint8)


def _ramp(n: int, step: int = 1) -> np.ndarray:
    """R = step * x, G = step * y, B = 0 over an n x n image: a crop's corners give its box."""
    ramp = (np.arange(n) * step).astype(np.uint8)
    arr = np.zeros((n, n, 3), dtype=np.uint8)
    arr[:, :, 0] = ramp[None, :]
    arr[:, :, 1] = ramp[:, None]
    return arr


def _ops(compose: T.Compose, op_type) -> list:
    return [t for t in compose.transforms if isinstance(t, op_type)]


def _applies(compose: T.Compose, op_type) -> list[T.RandomApply]:
    return [t for t in compose.transforms
            if isinstance(t, T.RandomApply) and any(isinstance(x, op_type) for x in t.transforms)]


def _tv(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels of each image of ``(N, C, H, W)``."""
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(-3, -2, -1))
            + (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(-3, -2, -1)))


def _area_fractions(views: torch.Tensor, image_size: int, step: int) -> torch.Tensor:
    """The area fraction of the box each crop of a ``_ramp`` image came from, from its pixels ``(N, 3, s, s)``
    in [0, 1]: pixels 2 and s - 3 are centred at box_start + 2.5 * (box / s) and box_start + (s - 2.5) *
    (box / s), and far enough from the box's edges that the (antialiased) resampling is exact on a ramp."""
    s = views.shape[-1]
    x = views[:, 0].mean(dim=1) * 255 / step  # mean over rows: R depends on x only (flips reverse it)
    y = views[:, 1].mean(dim=2) * 255 / step
    w = (x[:, s - 3] - x[:, 2]).abs() * s / (s - 5)
    h = (y[:, s - 3] - y[:, 2]).abs() * s / (s - 5)
    return (w * h / image_size**2).double()


def _reference_areas(scale, n: int, size: int) -> torch.Tensor:
    torch.manual_seed(123)
    img = torch.empty(3, size, size)
    return torch.tensor([h * w / size**2 for _, _, h, w in
                         (T.RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3)) for _ in range(n))],
                        dtype=torch.float64)


def _assert_areas_follow(areas: torch.Tensor, scale, image_size: int):
    """Within ``scale`` (up to the rounding of the box to whole pixels) and spread over it as torchvision's."""
    lo, hi = scale
    assert areas.min() > lo - 0.015 and areas.max() < hi + 0.015, (areas.min(), areas.max())
    ref = _reference_areas(scale, 4000, image_size)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert abs(areas.quantile(q) - ref.quantile(q)) < 0.04, (q, areas.quantile(q), ref.quantile(q))


# --------------------------------------------------------------------------- the crop spec


def test_default_spec_is_dinos():
    s = MultiCrop()
    assert (s.global_size, s.global_scale, s.n_local, s.local_size, s.local_scale) == (224, (0.4, 1.0), 8, 96,
                                                                                       (0.05, 0.4))
    assert s.global_blur_prob == (1.0, 0.1) and s.global_solarize_prob == (0.0, 0.2)
    assert s.local_blur_prob == 0.5 and s.local_solarize_prob == 0.0
    assert s.interpolation == "bicubic" and s.n_crops == 10
    assert s.crop(0) == (224, (0.4, 1.0), 1.0, 0.0)
    assert s.crop(1) == (224, (0.4, 1.0), 0.1, 0.2)
    assert s.crop(2) == s.crop(9) == (96, (0.05, 0.4), 0.5, 0.0)
    for i in (-1, 10):
        with pytest.raises(IndexError):
            s.crop(i)


def test_spec_is_frozen_and_takes_lists():
    s = MultiCrop(global_scale=[0.5, 1], local_scale=[0.1, 0.3], global_blur_prob=[0.2, 0.3],
                  global_solarize_prob=[0, 1], global_size=32.0, n_local=2.0)
    assert s.global_scale == (0.5, 1.0) and s.local_scale == (0.1, 0.3)
    assert type(s.global_size) is int and type(s.n_local) is int and s.n_crops == 4
    assert s.global_blur_prob == (0.2, 0.3) and s.global_solarize_prob == (0.0, 1.0)
    assert hash(s) == hash(dataclasses.replace(s))  # tuples: hashable, equal by value
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.n_local = 2


@pytest.mark.parametrize("bad", [
    dict(global_size=0), dict(local_size=-1), dict(local_size=8.5), dict(global_size=True), dict(n_local=-1),
    dict(n_local=1.5),
    dict(global_scale=(0.8, 0.4)), dict(global_scale=(0.0, 1.0)), dict(local_scale=(0.05, 1.2)),
    dict(global_scale=(0.4, 0.6, 1.0)), dict(global_blur_prob=(1.0, 1.1)), dict(global_solarize_prob=(-0.1, 0.2)),
    dict(local_blur_prob=2.0), dict(local_solarize_prob=-0.5), dict(interpolation="nearest"),
])
def test_spec_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        MultiCrop(**bad)


def test_spec_edge_values_are_valid():
    s = MultiCrop(global_size=1, n_local=0, global_scale=(1.0, 1.0), local_scale=(0.3, 0.3),
                  global_blur_prob=(0.0, 1.0), local_blur_prob=1.0, local_solarize_prob=0.0,
                  interpolation="bilinear")
    assert s.n_crops == 2


# --------------------------------------------------------------------------- CPU views


@pytest.mark.parametrize("n_local", [0, 1, 3])
def test_views_number_order_and_sizes(n_local):
    spec = dataclasses.replace(SMALL, n_local=n_local)
    tf = multicrop_transform(spec, AugConfig(), norm="imagenet")
    assert isinstance(tf, MultiView) and len(tf.transforms) == 2 + n_local
    _seed(0)
    views = tf(Image.fromarray(_noise(40, 50)))
    assert isinstance(views, list)
    assert [tuple(v.shape) for v in views] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * n_local
    assert all(v.dtype == torch.float32 for v in views)
    # Each crop is augmented on its own.
    assert not torch.equal(views[0], views[1])
    assert len({v.numpy().tobytes() for v in views[2:]}) == n_local


def _expected_ops(solarize: bool) -> list:
    ops = [T.RandomResizedCrop, T.RandomHorizontalFlip, T.RandomApply, T.RandomGrayscale, T.RandomApply]
    return ops + [T.RandomApply] * solarize + [T.ToTensor, T.Normalize]


def test_each_views_ops_and_parameters_are_dinos():
    views = multicrop_transform(MultiCrop(), AugConfig()).transforms
    assert len(views) == 10
    blur = [1.0, 0.1] + [0.5] * 8
    solarize = [None, 0.2] + [None] * 8
    for i, v in enumerate(views):
        assert [type(t) for t in v.transforms] == _expected_ops(solarize[i] is not None), i
        (rrc,) = _ops(v, T.RandomResizedCrop)
        assert rrc.size == ((224, 224) if i < 2 else (96, 96)), i
        assert rrc.scale == ((0.4, 1.0) if i < 2 else (0.05, 0.4)), i
        assert rrc.ratio == pytest.approx((3 / 4, 4 / 3))
        assert rrc.interpolation == T.InterpolationMode.BICUBIC
        # The shared ops: data.aug's defaults, i.e. DINO's flip_and_color_jitter.
        (flip,) = _ops(v, T.RandomHorizontalFlip)
        assert flip.p == 0.5
        (cj,) = _applies(v, T.ColorJitter)
        assert cj.p == pytest.approx(0.8)
        jitter = cj.transforms[0]
        assert jitter.brightness == pytest.approx((0.6, 1.4)) and jitter.contrast == pytest.approx((0.6, 1.4))
        assert jitter.saturation == pytest.approx((0.8, 1.2)) and jitter.hue == pytest.approx((-0.1, 0.1))
        (gray,) = _ops(v, T.RandomGrayscale)
        assert gray.p == pytest.approx(0.2)
        # Blur, then solarize (global 2 only), then normalise.
        (b,) = _applies(v, RandomGaussianBlur)
        assert b.p == pytest.approx(blur[i]) and b.transforms[0].sigma == (0.1, 2.0)
        assert [a.p for a in _applies(v, Solarize)] == ([] if solarize[i] is None else [pytest.approx(0.2)])
        (norm,) = _ops(v, T.Normalize)
        assert (tuple(norm.mean), tuple(norm.std)) == NORMALIZATION["imagenet"]


def test_spec_and_data_aug_reach_every_view():
    """Crop geometry and per-kind probabilities from the spec; flip, jitter, grayscale and sigma from data.aug,
    whose MoBY-only keys (crop_scale, blur_prob, solarize_prob) are not used."""
    spec = MultiCrop(global_size=20, global_scale=(0.5, 0.9), n_local=2, local_size=10, local_scale=(0.1, 0.3),
                     global_blur_prob=(0.3, 0.6), global_solarize_prob=(0.7, 0.4), local_blur_prob=0.2,
                     local_solarize_prob=0.9, interpolation="bilinear")
    aug = AugConfig(flip_prob=0.3, color_jitter=[0.1, 0.2, 0.3, 0.05], color_jitter_prob=0.5, grayscale_prob=0.4,
                    blur_sigma=[0.5, 1.5], crop_scale=[0.08, 0.09], blur_prob=[0.0, 0.0], solarize_prob=[0.0, 0.0])
    views = multicrop_transform(spec, aug, norm="cifar10").transforms
    for i, v in enumerate(views):
        (rrc,) = _ops(v, T.RandomResizedCrop)
        assert rrc.size == ((20, 20) if i < 2 else (10, 10))
        assert rrc.scale == ((0.5, 0.9) if i < 2 else (0.1, 0.3))
        assert rrc.interpolation == T.InterpolationMode.BILINEAR
        assert _ops(v, T.RandomHorizontalFlip)[0].p == pytest.approx(0.3)
        (cj,) = _applies(v, T.ColorJitter)
        assert cj.p == pytest.approx(0.5)
        jitter = cj.transforms[0]
        assert jitter.brightness == pytest.approx((0.9, 1.1)) and jitter.contrast == pytest.approx((0.8, 1.2))
        assert jitter.saturation == pytest.approx((0.7, 1.3)) and jitter.hue == pytest.approx((-0.05, 0.05))
        assert _ops(v, T.RandomGrayscale)[0].p == pytest.approx(0.4)
        (b,) = _applies(v, RandomGaussianBlur)
        assert b.p == pytest.approx([0.3, 0.6, 0.2, 0.2][i]) and b.transforms[0].sigma == (0.5, 1.5)
        (s,) = _applies(v, Solarize)
        assert s.p == pytest.approx([0.7, 0.4, 0.9, 0.9][i])
        assert tuple(_ops(v, T.Normalize)[0].mean) == NORMALIZATION["cifar10"][0]
    # Probability 0 leaves the op out.
    off = MultiCrop(n_local=1, global_blur_prob=(0.0, 0.0), global_solarize_prob=(0.0, 0.0), local_blur_prob=0.0)
    for v in multicrop_transform(off, aug).transforms:
        assert _applies(v, RandomGaussianBlur) == [] and _applies(v, Solarize) == []


def _blur_and_solarize_rates(views: list, base_tv: torch.Tensor) -> tuple[dict, dict]:
    """Per crop kind (global 1, global 2, local), the fraction of views of bright noise that were blurred (total
    variation under 60% of the image's) and solarized (mean under 0.5)."""
    kinds = {"global 1": views[0], "global 2": views[1], "local": torch.cat(views[2:])}
    blurred = {k: (_tv(v) < 0.6 * base_tv).double().mean().item() for k, v in kinds.items()}
    solarized = {k: (v.mean(dim=(1, 2, 3)) < 0.5).double().mean().item() for k, v in kinds.items()}
    return blurred, solarized


def test_blur_and_solarize_rates_per_kind():
    """Noise in [150, 250]: solarize turns it dark (mean < 128), blur smooths it (solarize keeps the texture)."""
    spec = MultiCrop(global_size=16, local_size=16, n_local=2, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0))
    tf = multicrop_transform(spec, PLAIN, norm="none")
    img = _noise(16, 16, 150, 251)
    base_tv = _tv(torch.from_numpy(img).permute(2, 0, 1).float() / 255)
    n = 600
    _seed(0)
    views = [torch.stack(v) for v in zip(*(tf(Image.fromarray(img)) for _ in range(n)))]
    blurred, solarized = _blur_and_solarize_rates(views, base_tv)
    assert blurred["global 1"] == 1.0 and solarized["global 1"] == 0.0
    assert blurred["global 2"] == pytest.approx(0.1, abs=0.04) and solarized["global 2"] == pytest.approx(0.2, abs=0.05)
    assert blurred["local"] == pytest.approx(0.5, abs=0.05) and solarized["local"] == 0.0


def test_crop_area_fractions_follow_each_kinds_scale():
    spec = MultiCrop(global_size=24, local_size=12, n_local=2, global_blur_prob=(0.0, 0.0),
                     global_solarize_prob=(0.0, 0.0), local_blur_prob=0.0)
    tf = multicrop_transform(spec, PLAIN, norm="none")
    img = Image.fromarray(_ramp(256))
    _seed(0)
    views = [torch.stack(v) for v in zip(*(tf(img) for _ in range(300)))]
    _assert_areas_follow(_area_fractions(torch.cat(views[:2]), 256, 1), (0.4, 1.0), 256)
    _assert_areas_follow(_area_fractions(torch.cat(views[2:]), 256, 1), (0.05, 0.4), 256)


def test_moby_views_are_unchanged():
    """MoBY's two views: the pipeline they had before multi-crop, bilinear crops (MoBY's code), bit for bit."""
    aug = AugConfig()

    def before(view: int) -> T.Compose:
        return T.Compose([
            T.RandomResizedCrop(32, scale=(0.08, 1.0)),
            T.RandomHorizontalFlip(0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([RandomGaussianBlur((0.1, 2.0))], p=[1.0, 0.1][view]),
            *([T.RandomApply([Solarize()], p=0.2)] if view else []),
            T.ToTensor(),
            T.Normalize(*NORMALIZATION["imagenet"]),
        ])

    for view in (0, 1):
        (rrc,) = _ops(moby_view(32, aug, view, "imagenet"), T.RandomResizedCrop)
        assert rrc.interpolation == T.InterpolationMode.BILINEAR
        ours, theirs = moby_view(32, aug, view, "imagenet").reference().transforms, before(view).transforms
        assert [type(t) for t in ours] == [type(t) for t in theirs]
        for a, b in zip(ours, theirs):
            if isinstance(a, T.RandomApply):
                assert a.p == b.p and type(a.transforms[0]) is type(b.transforms[0])
                a, b = a.transforms[0], b.transforms[0]
            assert {k: v for k, v in vars(a).items() if not k.startswith("_")} == \
                {k: v for k, v in vars(b).items() if not k.startswith("_")}, (view, a)
    # And the views compute what that pipeline computes from the same draws (tests/data/test_fast_view.py).
    tf = moby_transform(32, aug)
    img = Image.fromarray(_noise(40, 50))
    rng = random.Random(0)
    for _ in range(6):
        for view in tf.transforms:
            d = view.draw(*img.size, rng)
            assert torch.equal(view.apply(img, d), apply_with_torchvision(view, img, d))


# --------------------------------------------------------------------------- device views


def test_bicubic_resized_crops_match_torchs_antialiased_bicubic():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 40, 50)
    boxes = torch.tensor([[0.0, 0, 50, 40], [5, 3, 25, 33], [10, 10, 13, 12], [0, 0, 50, 10]])
    for size in (8, 24, 96):  # shrinking (antialiased), mixed, enlarging
        ours = resized_crops(x, boxes, size, "bicubic")
        for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            ref = F.interpolate(x[i:i + 1, :, y1:y2, x1:x2], size=(size, size), mode="bicubic", antialias=True,
                                align_corners=False)
            assert torch.allclose(ours[i], ref[0], atol=1e-5), (size, i)
    # Bilinear is still roi_align.
    idx = torch.arange(4.0)[:, None]
    ref = roi_align(x, torch.cat([idx, boxes], 1), (8, 8), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    assert torch.equal(resized_crops(x, boxes, 8), ref) and torch.equal(resized_crops(x, boxes, 8, "bilinear"), ref)
    with pytest.raises(ValueError):
        resized_crops(x, boxes, 8, "nearest")


def test_bicubic_resize_is_close_to_pils():
    """A whole-image crop with every random op off: the device view is the CPU view, up to PIL's uint8 rounding."""
    spec = MultiCrop(global_size=12, local_size=12, n_local=1, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0),
                     global_blur_prob=(0.0, 0.0), global_solarize_prob=(0.0, 0.0), local_blur_prob=0.0)
    aug = AugConfig(flip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0)
    img = _noise(30, 30)
    cpu = multicrop_transform(spec, aug, "none")(Image.fromarray(img))
    dev = BatchMultiCropAugment(spec, aug, "none")(torch.from_numpy(img).permute(2, 0, 1)[None])
    for c, d in zip(cpu, dev):
        assert (c - d[0]).abs().mean() < 0.5 / 255
    bilinear = BatchMultiCropAugment(dataclasses.replace(spec, interpolation="bilinear"), aug, "none")
    assert (cpu[0] - bilinear(torch.from_numpy(img).permute(2, 0, 1)[None])[0][0]).abs().mean() > 5 / 255


@pytest.mark.parametrize("n_local", [0, 3])
def test_device_views_shapes_order_and_reproducibility(n_local):
    spec = dataclasses.replace(SMALL, n_local=n_local)
    imgs = torch.randint(0, 256, (6, 3, 40, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    t = BatchMultiCropAugment(spec, AugConfig(), norm="imagenet")
    assert t.n_views == 2 + n_local
    a = t(imgs, torch.Generator().manual_seed(3))
    b = t(imgs, torch.Generator().manual_seed(3))
    c = t(imgs, torch.Generator().manual_seed(4))
    assert [tuple(v.shape) for v in a] == [(6, 3, 16, 16)] * 2 + [(6, 3, 8, 8)] * n_local
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(not torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], a[1]) and len({v.numpy().tobytes() for v in a[2:]}) == n_local
    # View i is what view(images, i) makes from the generator's state when its turn comes.
    g = torch.Generator().manual_seed(3)
    assert all(torch.equal(t.view(imgs, i, g), a[i]) for i in range(2 + n_local))


def test_device_crops_use_the_kinds_geometry_and_interpolation():
    """Global crops enlarged to 48 px, local ones shrunk to 8 px, each kind's scale, the spec's interpolation,
    clamped to [0, 1] (bicubic overshoots on noise)."""
    imgs = torch.randint(0, 256, (5, 3, 30, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    spec = MultiCrop(global_size=48, global_scale=(0.5, 0.9), local_size=8, local_scale=(0.1, 0.3), n_local=2)
    hs, ws = torch.full((5,), 30), torch.full((5,), 40)
    for interpolation in ("bicubic", "bilinear"):
        t = BatchMultiCropAugment(dataclasses.replace(spec, interpolation=interpolation), AugConfig(), "none")
        for i, (size, scale) in enumerate([(48, (0.5, 0.9))] * 2 + [(8, (0.1, 0.3))] * 2):
            boxes = sample_crop_boxes(hs, ws, scale, generator=torch.Generator().manual_seed(i))
            ref = resized_crops(imgs.float() / 255, boxes, size, interpolation)
            if interpolation == "bicubic" and i == 0:
                assert ref.min() < 0 and ref.max() > 1
            assert torch.equal(t.crops(imgs, i, torch.Generator().manual_seed(i)), ref.clamp(0, 1)), (interpolation, i)


def test_device_solarize_matches_pils():
    """Global 2 solarized with p=1: pixels at or above 128 inverted, as PIL's; global 1 (p=0) left as it is."""
    values = torch.tensor([0, 64, 127, 128, 129, 200, 255], dtype=torch.uint8)
    img = values.view(1, 1, 7).expand(3, 7, 7).contiguous()
    spec = MultiCrop(global_size=7, local_size=7, n_local=0, global_scale=(1.0, 1.0),
                     global_blur_prob=(0.0, 0.0), global_solarize_prob=(0.0, 1.0))
    aug = AugConfig(flip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0)
    g1, g2 = BatchMultiCropAugment(spec, aug, "none")(img[None], torch.Generator().manual_seed(0))
    pil = np.asarray(Solarize()(Image.fromarray(img.permute(1, 2, 0).numpy())))
    assert torch.allclose(g2[0] * 255, torch.from_numpy(pil.copy()).permute(2, 0, 1).float(), atol=1e-3)
    assert torch.allclose(g1[0] * 255, img.float(), atol=1e-3)


def test_moby_device_crops_are_still_bilinear_roi_align():
    imgs = torch.randint(0, 256, (5, 3, 30, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    boxes = sample_crop_boxes(torch.full((5,), 30), torch.full((5,), 40), (0.08, 1.0),
                              generator=torch.Generator().manual_seed(1))
    idx = torch.arange(5.0)[:, None]
    ref = roi_align(imgs.float() / 255, torch.cat([idx, boxes], 1), (16, 16), spatial_scale=1.0, sampling_ratio=-1,
                    aligned=True).clamp(0, 1)
    assert torch.equal(BatchMoBYAugment(16, AugConfig(), "none").crops(imgs, torch.Generator().manual_seed(1)), ref)


def test_device_crop_area_fractions_follow_each_kinds_scale():
    n, size = 600, 64
    imgs = torch.from_numpy(_ramp(size, step=4)).permute(2, 0, 1)[None].expand(n, 3, size, size)
    t = BatchMultiCropAugment(MultiCrop(global_size=24, local_size=12, n_local=1), PLAIN, "none")
    g = torch.Generator().manual_seed(0)
    glob = torch.cat([t.crops(imgs, 0, g), t.crops(imgs, 1, g)])
    local = t.crops(imgs, 2, g)
    _assert_areas_follow(_area_fractions(glob, size, 4), (0.4, 1.0), size)
    _assert_areas_follow(_area_fractions(local, size, 4), (0.05, 0.4), size)


def test_device_blur_and_solarize_rates_per_kind():
    n = 2000
    spec = MultiCrop(global_size=16, local_size=16, n_local=2, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0))
    img = torch.from_numpy(_noise(16, 16, 150, 251)).permute(2, 0, 1)
    base_tv = _tv(img.float() / 255)
    views = BatchMultiCropAugment(spec, PLAIN, "none")(img[None].expand(n, 3, 16, 16),
                                                       torch.Generator().manual_seed(0))
    blurred, solarized = _blur_and_solarize_rates(views, base_tv)
    assert blurred["global 1"] == 1.0 and solarized["global 1"] == 0.0
    assert blurred["global 2"] == pytest.approx(0.1, abs=0.025) and solarized["global 2"] == pytest.approx(0.2, abs=0.025)
    assert blurred["local"] == pytest.approx(0.5, abs=0.025) and solarized["local"] == 0.0


def test_device_parameters_differ_per_sample():
    """One image repeated over the batch: each sample gets its own crop box, and (with whole-image crops) its
    own flip, jitter, grayscale, blur and solarize draws."""
    n = 64
    img = torch.from_numpy(_noise(24, 24)).permute(2, 0, 1)[None].expand(n, 3, 24, 24)
    t = BatchMultiCropAugment(SMALL, AugConfig(), "imagenet")
    for i in range(SMALL.n_crops):
        crops = t.crops(img, i, torch.Generator().manual_seed(i))
        assert torch.unique(crops.flatten(1), dim=0).shape[0] > 0.9 * n, i  # two boxes may coincide
    whole = dataclasses.replace(SMALL, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0))
    views = BatchMultiCropAugment(whole, AugConfig(), "imagenet")(img, torch.Generator().manual_seed(0))
    for v in views:  # a few samples draw no op at all (no jitter, no blur...) and come out alike
        assert torch.unique(v.flatten(1), dim=0).shape[0] > n // 2
    # Blurred (p=1) with nothing else: a blur sigma per sample.
    blur_only = AugConfig(flip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0)
    g1 = BatchMultiCropAugment(whole, blur_only, "imagenet").view(img, 0, torch.Generator().manual_seed(0))
    assert torch.unique(g1.flatten(1), dim=0).shape[0] == n


def test_device_views_of_images_of_different_sizes():
    spec = MultiCrop(global_size=16, local_size=8, n_local=2, global_scale=(1.0, 1.0))
    t = BatchMultiCropAugment(spec, AugConfig(), norm="none")
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((16, 16), (30, 40), (64, 20))]
    views = t(images, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(3, 3, 16, 16)] * 2 + [(3, 3, 8, 8)] * 2
    # A 16x16 image cropped whole at scale 1 and resized to 16 is itself; the list path resizes bicubically.
    crops = t.crops(images, 0, torch.Generator().manual_seed(0))
    assert torch.allclose(crops[0], images[0].float() / 255, atol=1e-5)
    boxes = sample_crop_boxes(torch.tensor([16, 30, 64]), torch.tensor([16, 40, 20]), (1.0, 1.0),
                              generator=torch.Generator().manual_seed(0)).long().tolist()
    x1, y1, x2, y2 = boxes[2]
    ref = F.interpolate(images[2][None, :, y1:y2, x1:x2].float(), size=(16, 16), mode="bicubic", antialias=True,
                        align_corners=False) / 255
    assert torch.allclose(crops[2], ref[0].clamp(0, 1), atol=1e-5)


@pytest.mark.gpu
def test_multicrop_runs_on_cuda():
    imgs = torch.randint(0, 256, (64, 3, 64, 64), dtype=torch.uint8, device="cuda")
    views = BatchMultiCropAugment(MultiCrop(global_size=32, local_size=16, n_local=4), AugConfig(), "imagenet")(
        imgs, torch.Generator(device="cuda").manual_seed(0))
    assert len(views) == 6 and all(v.device.type == "cuda" and torch.isfinite(v).all() for v in views)
    assert views[0].shape == (64, 3, 32, 32) and views[-1].shape == (64, 3, 16, 16)
