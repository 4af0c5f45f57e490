"""CPU augmentations: MoBY's asymmetric two-view pipeline (BYOL's), DINO/EsViT's multi-crop views and
the evaluation transforms."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # CIFAR-10 train split, JPEG-decoded pixels (see shared data README).
    "cifar10": ((0.491250, 0.482090, 0.446521), (0.245232, 0.242782, 0.260629)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def normalize(preset: str) -> T.Normalize:
    mean, std = NORMALIZATION[preset]
    return T.Normalize(mean, std)


class RandomGaussianBlur:
    """PIL Gaussian blur with sigma ~ U(sigma_min, sigma_max), as in BYOL/MoBY (no kernel-size cap)."""

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)):
        self.sigma = tuple(sigma)

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class Solarize:
    """Invert pixels at or above 128 (PIL's solarize)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, threshold=128)


INTERPOLATIONS = ("bilinear", "bicubic")


def augmented_view(size: int, scale: Sequence[float], aug, blur_prob: float, solarize_prob: float, norm: str,
                   interpolation: str = "bilinear") -> T.Compose:
    """One BYOL-style view: RandomResizedCrop(``size``, ``scale``, ``interpolation``), flip, colour jitter and
    grayscale from ``aug`` (the ``data.aug`` config section), then Gaussian blur with probability ``blur_prob``
    and solarize with probability ``solarize_prob`` (an op with probability 0 is left out), then normalise."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    ops = [
        T.RandomResizedCrop(size, scale=tuple(scale), interpolation=T.InterpolationMode(interpolation)),
        T.RandomHorizontalFlip(aug.flip_prob),
        T.RandomApply([T.ColorJitter(*aug.color_jitter)], p=aug.color_jitter_prob),
        T.RandomGrayscale(p=aug.grayscale_prob),
    ]
    if blur_prob > 0:
        ops.append(T.RandomApply([RandomGaussianBlur(aug.blur_sigma)], p=blur_prob))
    if solarize_prob > 0:
        ops.append(T.RandomApply([Solarize()], p=solarize_prob))
    ops += [T.ToTensor(), normalize(norm)]
    return T.Compose(ops)


def moby_view(image_size: int, aug, view: int, norm: str) -> T.Compose:
    """One branch of the BYOL/MoBY pair: ``view`` 0 has blur p=1.0, view 1 blur p=0.1 and solarize p=0.2.

    Crops are resized bilinearly (torchvision's default, as in MoBY's code)."""
    return augmented_view(image_size, aug.crop_scale, aug, aug.blur_prob[view], aug.solarize_prob[view], norm)


class MultiView:
    """Apply one transform per view: ``img -> [view_0, view_1, ...]``."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, img):
        return [t(img) for t in self.transforms]

    def __repr__(self) -> str:
        inner = "\n".join(f"  view {i}: {t}" for i, t in enumerate(self.transforms))
        return f"MultiView(\n{inner}\n)"


def moby_transform(image_size: int, aug, norm: str = "imagenet") -> MultiView:
    return MultiView([moby_view(image_size, aug, 0, norm), moby_view(image_size, aug, 1, norm)])


def _pair(name: str, v) -> tuple[float, float]:
    v = tuple(float(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"MultiCrop.{name} must have 2 values, got {v}")
    return v


@dataclass(frozen=True)
class MultiCrop:
    """The crops of DINO/EsViT's multi-crop augmentation (defaults: DINO's).

    Two global crops of ``global_size`` px covering ``global_scale`` of the image area and ``n_local`` local
    crops of ``local_size`` px covering ``local_scale``. Global crop 1 and 2 are blurred with probabilities
    ``global_blur_prob`` and solarized with ``global_solarize_prob``; every local crop with ``local_blur_prob``
    and ``local_solarize_prob``. ``interpolation`` ("bicubic" or "bilinear") resizes the crops. The other ops
    (flip, colour jitter, grayscale, blur sigma) come from the ``data.aug`` section.
    """

    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    n_local: int = 8
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    global_blur_prob: tuple[float, float] = (1.0, 0.1)
    global_solarize_prob: tuple[float, float] = (0.0, 0.2)
    local_blur_prob: float = 0.5
    local_solarize_prob: float = 0.0
    interpolation: str = "bicubic"

    def __post_init__(self):
        for name, least in (("global_size", 1), ("local_size", 1), ("n_local", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < least:
                raise ValueError(f"MultiCrop.{name} must be an integer >= {least}, got {v!r}")
            object.__setattr__(self, name, int(v))
        for name in ("global_scale", "local_scale", "global_blur_prob", "global_solarize_prob"):
            object.__setattr__(self, name, _pair(name, getattr(self, name)))
        for name in ("local_blur_prob", "local_solarize_prob"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"MultiCrop.{name} must satisfy 0 < low <= high <= 1, got {(lo, hi)}")
        for name in ("global_blur_prob", "global_solarize_prob", "local_blur_prob", "local_solarize_prob"):
            v = getattr(self, name)
            if not all(0 <= p <= 1 for p in (v if isinstance(v, tuple) else (v,))):
                raise ValueError(f"MultiCrop.{name} must be probabilities in [0, 1], got {v}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"MultiCrop.interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")

    @property
    def n_crops(self) -> int:
        return 2 + self.n_local

    def crop(self, i: int) -> tuple[int, tuple[float, float], float, float]:
        """``(size, scale, blur_prob, solarize_prob)`` of crop ``i``: 0 and 1 global, 2.. local."""
        if not 0 <= i < self.n_crops:
            raise IndexError(f"crop {i} of {self.n_crops}")
        if i < 2:
            return self.global_size, self.global_scale, self.global_blur_prob[i], self.global_solarize_prob[i]
        return self.local_size, self.local_scale, self.local_blur_prob, self.local_solarize_prob


def multicrop_transform(spec: MultiCrop, aug, norm: str = "imagenet") -> MultiView:
    """DINO/EsViT views of an image: ``[global 1, global 2, local 1, ..., local N]``.

    ``aug`` is the ``data.aug`` section (its flip, colour jitter, grayscale and blur sigma are used; its
    ``crop_scale``, ``blur_prob`` and ``solarize_prob`` are MoBY's and replaced by ``spec``'s)."""
    views = []
    for i in range(spec.n_crops):
        size, scale, blur_prob, solarize_prob = spec.crop(i)
        views.append(augmented_view(size, scale, aug, blur_prob, solarize_prob, norm, spec.interpolation))
    return MultiView(views)


def eval_transform(image_size: int, crop_ratio: float = 0.875, norm: str = "imagenet") -> T.Compose:
    """Resize the short side to ``image_size / crop_ratio`` and centre-crop (256 -> 224 on ImageNet)."""
    resize = int(round(image_size / crop_ratio))
    return T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        normalize(norm),
    ])


def linear_train_transform(image_size: int, norm: str = "imagenet") -> T.Compose:
    """Linear-probe training augmentation (MoBY protocol): RandomResizedCrop + flip."""
    return T.Compose([
        T.RandomResizedCrop(image_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        normalize(norm),
    ])
