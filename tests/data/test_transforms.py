"""MoBY's asymmetric two-view augmentation and the evaluation transform."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mobyssl.config import AugConfig
from mobyssl.data.transforms import (
    NORMALIZATION,
    MultiView,
    RandomGaussianBlur,
    Solarize,
    eval_transform,
    linear_train_transform,
    moby_transform,
    moby_view,
    normalize,
)


def _noise_image(size=(64, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _random_applies(compose: T.Compose, op_type) -> list[T.RandomApply]:
    return [t for t in compose.transforms
            if isinstance(t, T.RandomApply) and any(isinstance(x, op_type) for x in t.transforms)]


def _seed(s: int) -> None:
    torch.manual_seed(s)
    random.seed(s)


def _total_variation(x: torch.Tensor) -> float:
    return float((x[:, 1:, :] - x[:, :-1, :]).abs().mean() + (x[:, :, 1:] - x[:, :, :-1]).abs().mean())


# --------------------------------------------------------------------------- two views


@pytest.mark.parametrize("size", [32, 48])
def test_moby_transform_returns_two_tensors(size):
    tf = moby_transform(size, AugConfig())
    assert isinstance(tf, MultiView) and len(tf.transforms) == 2
    views = tf(_noise_image((50, 40)))
    assert isinstance(views, list) and len(views) == 2
    for v in views:
        assert isinstance(v, torch.Tensor)
        assert v.shape == (3, size, size)
        assert v.dtype == torch.float32
    assert not torch.equal(views[0], views[1])  # two independent augmentations


def test_view_pipelines_match_the_paper_asymmetry():
    aug = AugConfig()
    v1, v2 = moby_transform(32, aug).transforms
    # Blur: p=1.0 in view 1, p=0.1 in view 2.
    (b1,) = _random_applies(v1, RandomGaussianBlur)
    (b2,) = _random_applies(v2, RandomGaussianBlur)
    assert b1.p == 1.0 and b2.p == pytest.approx(0.1)
    assert b1.transforms[0].sigma == (0.1, 2.0)
    # Solarize: only in view 2, p=0.2.
    assert _random_applies(v1, Solarize) == []
    (s2,) = _random_applies(v2, Solarize)
    assert s2.p == pytest.approx(0.2)
    # Shared ops with BYOL strengths.
    for v in (v1, v2):
        (rrc,) = [t for t in v.transforms if isinstance(t, T.RandomResizedCrop)]
        assert rrc.scale == (0.08, 1.0) and rrc.size == (32, 32)
        (cj,) = _random_applies(v, T.ColorJitter)
        assert cj.p == pytest.approx(0.8)
        jitter = cj.transforms[0]
        assert jitter.brightness == pytest.approx((0.6, 1.4))
        assert jitter.contrast == pytest.approx((0.6, 1.4))
        assert jitter.saturation == pytest.approx((0.8, 1.2))
        assert jitter.hue == pytest.approx((-0.1, 0.1))
        (gray,) = [t for t in v.transforms if isinstance(t, T.RandomGrayscale)]
        assert gray.p == pytest.approx(0.2)
        (flip,) = [t for t in v.transforms if isinstance(t, T.RandomHorizontalFlip)]
        assert flip.p == pytest.approx(0.5)
        assert isinstance(v.transforms[-1], T.Normalize)
        assert isinstance(v.transforms[-2], T.ToTensor)


def test_zero_probabilities_drop_the_ops():
    aug = AugConfig(blur_prob=[0.0, 0.0], solarize_prob=[0.0, 0.0])
    for v in moby_transform(32, aug).transforms:
        assert _random_applies(v, RandomGaussianBlur) == []
        assert _random_applies(v, Solarize) == []


def test_view_1_always_blurs():
    """Same seeds, same crop/flip/jitter: view 1 with blur p=1 is always smoother than without blur."""
    aug = AugConfig(blur_prob=[1.0, 0.0], blur_sigma=[1.0, 2.0])
    no_blur = aug.model_copy(update=dict(blur_prob=[0.0, 0.0]))
    blurred_view = moby_view(32, aug, 0, "none")
    plain_view = moby_view(32, no_blur, 0, "none")
    img = _noise_image()
    for s in range(8):
        _seed(s)
        a = blurred_view(img)
        _seed(s)
        b = plain_view(img)
        assert not torch.allclose(a, b, atol=1e-3), f"seed {s}: view 1 was not blurred"
        assert _total_variation(a) < 0.9 * _total_variation(b), f"seed {s}"


def test_view_2_without_blur_equals_plain_pipeline():
    """The control for the test above: with blur p=0 view 2 is the plain pipeline, bit for bit."""
    aug = AugConfig(blur_prob=[1.0, 0.0], solarize_prob=[0.0, 0.0])
    plain = aug.model_copy(update=dict(blur_prob=[0.0, 0.0]))
    img = _noise_image()
    _seed(3)
    a = moby_view(32, aug, 1, "none")(img)
    _seed(3)
    b = moby_view(32, plain, 1, "none")(img)
    assert torch.equal(a, b)


def test_view_1_never_solarizes():
    """Solarize p=1 requested for view 2 only: view 1 of a dark image stays dark, view 2 turns bright."""
    aug = AugConfig(solarize_prob=[0.0, 1.0], blur_prob=[0.0, 0.0], color_jitter_prob=0.0,
                    grayscale_prob=0.0, crop_scale=[1.0, 1.0])
    dark = Image.new("RGB", (32, 32), (200, 200, 200))  # >= 128: solarize maps 200 -> 55
    tf = moby_transform(32, aug, norm="none")
    for s in range(5):
        _seed(s)
        v1, v2 = tf(dark)
        assert torch.allclose(v1, torch.full_like(v1, 200 / 255), atol=1e-6)
        assert torch.allclose(v2, torch.full_like(v2, 55 / 255), atol=1e-6)


def test_random_gaussian_blur_smooths_a_textured_image():
    img = _noise_image()
    random.seed(0)
    out = RandomGaussianBlur((1.0, 2.0))(img)
    assert out.size == img.size
    a, b = np.asarray(img, dtype=np.float32), np.asarray(out, dtype=np.float32)
    assert np.abs(np.diff(b, axis=1)).mean() < 0.5 * np.abs(np.diff(a, axis=1)).mean()
    assert abs(a.mean() - b.mean()) < 2.0  # blurring keeps the mean brightness


def test_random_gaussian_blur_draws_sigma_from_range():
    img = _noise_image()
    random.seed(1)
    outs = {RandomGaussianBlur((0.1, 2.0))(img).tobytes() for _ in range(4)}
    assert len(outs) > 1  # a fresh sigma each call


def test_solarize_inverts_pixels_at_or_above_128():
    img = Image.fromarray(np.array([[[0, 127, 128], [200, 255, 64]]], dtype=np.uint8))
    out = np.asarray(Solarize()(img))
    assert out.tolist() == [[[0, 127, 127], [55, 0, 64]]]


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("preset", ["imagenet", "cifar10", "none"])
def test_normalization_presets_on_a_constant_image(preset):
    value = 150
    img = Image.new("RGB", (40, 40), (value, value, value))
    out = eval_transform(32, 1.0, preset)(img)
    mean, std = NORMALIZATION[preset]
    expected = torch.tensor([(value / 255 - m) / s for m, s in zip(mean, std)])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-4)


def test_normalization_preset_values():
    assert NORMALIZATION["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    mean, std = NORMALIZATION["cifar10"]
    assert mean == pytest.approx((0.4913, 0.4821, 0.4465), abs=1e-3)
    assert std == pytest.approx((0.2452, 0.2428, 0.2606), abs=1e-3)
    x = torch.full((3, 2, 2), 0.485)
    assert normalize("imagenet")(x)[0].abs().max() < 1e-6


def test_moby_view_normalizes():
    img = Image.new("RGB", (32, 32), (255, 255, 255))
    aug = AugConfig(blur_prob=[0.0, 0.0], solarize_prob=[0.0, 0.0], color_jitter_prob=0.0, grayscale_prob=0.0)
    v1, _ = moby_transform(32, aug, norm="imagenet")(img)
    mean, std = NORMALIZATION["imagenet"]
    expected = torch.tensor([(1 - m) / s for m, s in zip(mean, std)])
    assert torch.allclose(v1.mean(dim=(1, 2)), expected, atol=1e-4)


# --------------------------------------------------------------------------- evaluation


def _gradient_image(n: int = 256) -> Image.Image:
    """R = x, G = y, B = 0 over an n x n image (0..255)."""
    ramp = np.linspace(0, 255, n).round().astype(np.uint8)
    arr = np.zeros((n, n, 3), dtype=np.uint8)
    arr[:, :, 0] = ramp[None, :]
    arr[:, :, 1] = ramp[:, None]
    return Image.fromarray(arr)


@pytest.mark.parametrize("ratio, size", [(0.875, 224), (1.0, 32), (0.875, 32)])
def test_eval_transform_output_size(ratio, size):
    tf = eval_transform(size, ratio, "none")
    for shape in ((300, 200), (200, 300), (size, size)):
        assert tf(_noise_image(shape)).shape == (3, size, size)


def test_eval_transform_resizes_short_side_to_size_over_ratio():
    tf = eval_transform(224, 0.875, "imagenet")
    (resize,) = [t for t in tf.transforms if isinstance(t, T.Resize)]
    assert resize.size == 256  # the ImageNet protocol: 256 -> centre 224
    (crop,) = [t for t in tf.transforms if isinstance(t, T.CenterCrop)]
    assert crop.size == (224, 224)
    (resize32,) = [t for t in eval_transform(32, 1.0).transforms if isinstance(t, T.Resize)]
    assert resize32.size == 32


def test_eval_transform_crop_ratio_one_keeps_the_whole_image():
    out = eval_transform(32, 1.0, "none")(_gradient_image())
    r, g = out[0], out[1]
    # The full ramp is visible: the edges reach (almost) 0 and 1.
    assert r[:, 0].mean() < 0.03 and r[:, -1].mean() > 0.97
    assert g[0, :].mean() < 0.03 and g[-1, :].mean() > 0.97


def test_eval_transform_crop_ratio_0875_takes_the_centre():
    out = eval_transform(32, 0.875, "none")(_gradient_image())
    r, g = out[0], out[1]
    # Resize 256 -> 37, centre crop 32: pixels 2..33 of 37, i.e. about 5.4%..94.6% of the ramp.
    assert r[:, 0].mean() == pytest.approx(2.5 / 37, abs=0.02)
    assert r[:, -1].mean() == pytest.approx(33.5 / 37, abs=0.02)
    assert g[0, :].mean() == pytest.approx(2.5 / 37, abs=0.02)
    # Centred (up to the one-pixel rounding of an odd margin): about the middle of the image.
    assert r.mean() == pytest.approx(0.5, abs=0.02) and g.mean() == pytest.approx(0.5, abs=0.02)


def test_eval_transform_is_deterministic():
    img = _noise_image((80, 60))
    tf = eval_transform(32, 0.875)
    _seed(0)
    a = tf(img)
    _seed(1)
    assert torch.equal(a, tf(img))


def test_linear_train_transform_shape():
    out = linear_train_transform(32, "cifar10")(_noise_image((48, 40)))
    assert out.shape == (3, 32, 32)
