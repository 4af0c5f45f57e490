"""CPU augmentations: MoBY's asymmetric two-view pipeline (BYOL's) and the evaluation transforms."""

from __future__ import annotations

import random
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


def moby_view(image_size: int, aug, view: int, norm: str) -> T.Compose:
    """One branch of the BYOL/MoBY pair: ``view`` 0 has blur p=1.0, view 1 blur p=0.1 and solarize p=0.2."""
    ops = [
        T.RandomResizedCrop(image_size, scale=tuple(aug.crop_scale)),
        T.RandomHorizontalFlip(aug.flip_prob),
        T.RandomApply([T.ColorJitter(*aug.color_jitter)], p=aug.color_jitter_prob),
        T.RandomGrayscale(p=aug.grayscale_prob),
    ]
    if aug.blur_prob[view] > 0:
        ops.append(T.RandomApply([RandomGaussianBlur(aug.blur_sigma)], p=aug.blur_prob[view]))
    if aug.solarize_prob[view] > 0:
        ops.append(T.RandomApply([Solarize()], p=aug.solarize_prob[view]))
    ops += [T.ToTensor(), normalize(norm)]
    return T.Compose(ops)


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
