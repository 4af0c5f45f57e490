"""CPU augmentations: MoBY's asymmetric two-view pipeline (BYOL's), DINO/EsViT's multi-crop views and
the evaluation transforms."""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps, ImageStat
from torchvision import transforms as T
from torchvision.transforms import functional as TF

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
_PIL_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _jitter_range(value: float, center: float = 1.0) -> tuple[float, float] | None:
    """ColorJitter's range for a strength (torchvision's rule; factors around 1 are clipped at 0): None when the
    op can only be the identity."""
    lo, hi = center - value, center + value
    if center == 1.0:
        lo = max(lo, 0.0)
    return None if lo == hi == center else (lo, hi)


@dataclass(frozen=True)
class ViewDraw:
    """The random choices of one view: the crop ``(top, left, height, width)``, the flip, the colour-jitter ops
    in order as ``(op index, factor)`` (0 brightness, 1 contrast, 2 saturation, 3 hue; empty: no jitter), the
    grayscale, the blur radius (None: no blur) and the solarize."""

    crop: tuple[int, int, int, int]
    flip: bool
    jitter: tuple[tuple[int, float], ...]
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


class AugmentedView:
    """One BYOL-style view of a PIL image: RandomResizedCrop(``size``, ``scale``, ``interpolation``), flip, colour
    jitter and grayscale from ``aug`` (the ``data.aug`` config section), Gaussian blur with probability
    ``blur_prob`` and solarize with probability ``solarize_prob`` (an op with probability 0 is left out), then a
    normalised float tensor.

    The same distribution and the same pixel operations as torchvision's v1 transforms composed the way the
    research code composes them (``reference()`` builds that pipeline; tests hold the two together), without
    their per-op overhead: every random choice is drawn from one Python generator (``rng``; default: the
    ``random`` module), and the tensor conversion and normalisation are one step.
    """

    takes_rng = True  # TrainingDataset passes its per-sample generator

    def __init__(self, size: int, scale: Sequence[float], aug, blur_prob: float, solarize_prob: float, norm: str,
                 interpolation: str = "bilinear", ratio: Sequence[float] = (3 / 4, 4 / 3)):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        self.size, self.scale, self.ratio, self.interpolation = int(size), tuple(scale), tuple(ratio), interpolation
        self.flip_prob = aug.flip_prob
        self.jitter_strengths = tuple(float(x) for x in aug.color_jitter)
        b, c, sat, hue = self.jitter_strengths
        self.jitter_ranges = (_jitter_range(b), _jitter_range(c), _jitter_range(sat), _jitter_range(hue, 0.0))
        self.jitter_prob = aug.color_jitter_prob
        self.grayscale_prob = aug.grayscale_prob
        self.blur_prob, self.blur_sigma = float(blur_prob), tuple(aug.blur_sigma)
        self.solarize_prob = float(solarize_prob)
        self.norm = norm
        mean, std = NORMALIZATION[norm]
        self._mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))

    def draw(self, width: int, height: int, rng=random) -> ViewDraw:
        """The random choices for a ``width`` x ``height`` image, in the order the reference pipeline makes them."""
        return ViewDraw(self._crop(width, height, rng), rng.random() < self.flip_prob, self._jitter(rng),
                        rng.random() < self.grayscale_prob,
                        rng.uniform(*self.blur_sigma) if self.blur_prob > 0 and rng.random() <= self.blur_prob
                        else None,
                        self.solarize_prob > 0 and rng.random() <= self.solarize_prob)

    def _crop(self, width: int, height: int, rng) -> tuple[int, int, int, int]:
        # torchvision's RandomResizedCrop.get_params, drawn from rng.
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self._log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def _jitter(self, rng) -> tuple[tuple[int, float], ...]:
        # RandomApply(ColorJitter): applied when a uniform draw is at most p; then the ops' order and factors.
        if self.jitter_prob <= 0 or rng.random() > self.jitter_prob:
            return ()
        order = list(range(4))
        rng.shuffle(order)
        factors = [rng.uniform(*r) if r is not None else None for r in self.jitter_ranges]
        return tuple((k, factors[k]) for k in order if factors[k] is not None)

    def apply(self, img: Image.Image, d: ViewDraw, normalize: bool = True) -> torch.Tensor:
        """The view for the choices ``d``: a normalised float tensor, or with ``normalize=False`` the uint8 (3, H, W)
        tensor that ``normalize_batch`` turns into the same floats for a whole batch at once."""
        top, left, h, w = d.crop
        img = img.crop((left, top, left + w, top + h)).resize((self.size, self.size), _PIL_RESAMPLE[self.interpolation])
        if d.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        for k, factor in d.jitter:
            img = _JITTER_OPS[k](img, factor)
        if d.grayscale:
            img = img.convert("L").convert("RGB")
        if d.blur_sigma is not None:
            img = img.filter(ImageFilter.GaussianBlur(radius=d.blur_sigma))
        if d.solarize:
            img = ImageOps.solarize(img, threshold=128)
        return to_normalized_tensor(img, self._mean, self._std) if normalize else to_uint8_tensor(img)

    def __call__(self, img: Image.Image, rng=random, normalize: bool = True) -> torch.Tensor:
        return self.apply(img, self.draw(*img.size, rng), normalize)

    def normalize_batch(self, batch: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) uint8 views from ``apply(..., normalize=False)`` -> the floats ``apply`` gives, bit for bit."""
        return normalize_uint8(batch, self._mean, self._std, out)

    def prepare(self) -> None:
        """Build what the view's ops need once (the hue tables), before DataLoader workers fork and share it."""
        if self.jitter_prob > 0 and self.jitter_ranges[3] is not None:
            _HueTables.get()

    def reference(self) -> T.Compose:
        """The torchvision v1 pipeline this view reproduces (the research code's way of writing it)."""
        ops = [
            T.RandomResizedCrop(self.size, scale=self.scale, ratio=self.ratio,
                                interpolation=T.InterpolationMode(self.interpolation)),
            T.RandomHorizontalFlip(self.flip_prob),
            T.RandomApply([T.ColorJitter(*self.jitter_strengths)], p=self.jitter_prob),
            T.RandomGrayscale(p=self.grayscale_prob),
        ]
        if self.blur_prob > 0:
            ops.append(T.RandomApply([RandomGaussianBlur(self.blur_sigma)], p=self.blur_prob))
        if self.solarize_prob > 0:
            ops.append(T.RandomApply([Solarize()], p=self.solarize_prob))
        return T.Compose(ops + [T.ToTensor(), normalize(self.norm)])

    @property
    def transforms(self) -> list:
        """The reference pipeline's ops (for inspection: the parameters this view uses)."""
        return self.reference().transforms

    def __repr__(self) -> str:
        return f"AugmentedView(reference={self.reference()})"


class _HueTables:
    """PIL's 8-bit RGB -> HSV and HSV -> RGB conversions as two lookup tables over every colour (2^24 entries,
    64 MiB each, built from PIL's own conversions on first use, about a second), so a hue shift is two gathers
    instead of PIL's two per-pixel conversions: the same pixels, bit for bit, about 6x faster at 224 px.

    Both tables are indexed by a pixel's little-endian RGBX word masked to 24 bits (``r | g << 8 | b << 16``);
    ``to_hsv`` holds ``h | s << 8 | v << 16`` and ``to_rgb`` (indexed by that) holds the RGBX word of the colour.
    A process builds them once; DataLoader workers forked after the main process built them share its pages.
    """

    _lock = threading.Lock()
    _tables: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def get(cls) -> tuple[np.ndarray, np.ndarray]:
        if cls._tables is not None:  # every hue shift asks: no lock once built
            return cls._tables
        with cls._lock:
            if cls._tables is None:
                # Every 24-bit word once, read as three channels: a 4096 x 4096 image of all colours.
                grid = np.ascontiguousarray(
                    np.arange(1 << 24, dtype=_WORD).view(np.uint8).reshape(4096, 4096, 4)[..., :3])
                to_rgb = np.frombuffer(Image.frombytes("HSV", (4096, 4096), grid).convert("RGB").tobytes("raw", "RGBX"),
                                       _WORD)
                h, s, v = Image.fromarray(grid).convert("HSV").split()
                to_hsv = np.frombuffer(Image.merge("RGBA", (h, s, v, Image.new("L", h.size, 0))).tobytes(), _WORD)
                cls._tables = (to_hsv, to_rgb)
            return cls._tables


_WORD = np.dtype("<u4")


def _hue_shift(factor: float) -> np.uint8:
    # torchvision's PIL hue: H (0-255) shifted, wrapping, by factor * 255 truncated towards zero.
    return np.int32(factor * 255).astype(np.uint8)


def _adjust_hue(img: Image.Image, factor: float) -> Image.Image:
    """torchvision's ``adjust_hue`` on a PIL RGB image (PIL's HSV round trip with the H channel shifted), the same
    pixels through ``_HueTables``."""
    if img.mode != "RGB":
        return TF.adjust_hue(img, factor)
    to_hsv, to_rgb = _HueTables.get()
    hsv = to_hsv[np.frombuffer(img.tobytes("raw", "RGBX"), _WORD) & 0xFFFFFF]
    hsv.view(np.uint8)[0::4] += _hue_shift(factor)  # the H byte, wrapping as uint8
    return Image.frombytes("RGB", img.size, to_rgb[hsv], "raw", "RGBX")


_RAMP = Image.frombytes("L", (256, 1), bytes(range(256)))


def _adjust_contrast(img: Image.Image, factor: float) -> Image.Image:
    """PIL's ``ImageEnhance.Contrast`` (torchvision's PIL contrast): every channel blended with the image's mean
    grey. The blend depends on a channel value alone, so it is a 256-entry table made by PIL's own blend, applied
    with ``point``: the same pixels in about three quarters of the time."""
    if img.mode != "RGB":
        return ImageEnhance.Contrast(img).enhance(factor)
    mean = int(ImageStat.Stat(img.convert("L")).mean[0] + 0.5)
    return img.point(list(Image.blend(Image.new("L", _RAMP.size, mean), _RAMP, factor).tobytes()) * 3)


_JITTER_OPS = (
    lambda img, f: ImageEnhance.Brightness(img).enhance(f),
    _adjust_contrast,
    lambda img, f: ImageEnhance.Color(img).enhance(f),
    _adjust_hue,
)


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as a (3, H, W) uint8 tensor (the permute done in uint8: a quarter of the bytes of float)."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def normalize_uint8(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, out: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """``Normalize(mean, std)(ToTensor()(img))``, bit for bit, for uint8 (3, H, W) or (B, 3, H, W) ``x``: the same
    elementwise operations in the same order, so a batch at once gives each image's floats. ``out`` (float32, the
    shape of ``x``) receives the result, e.g. a tensor in shared memory."""
    out = x.to(torch.float32) if out is None else out.copy_(x)
    return out.div_(255).sub_(mean).div_(std)


def to_normalized_tensor(img: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``Normalize(mean, std)(ToTensor()(img))`` for an RGB image, bit for bit, in one pass."""
    return normalize_uint8(to_uint8_tensor(img), mean, std)


def augmented_view(size: int, scale: Sequence[float], aug, blur_prob: float, solarize_prob: float, norm: str,
                   interpolation: str = "bilinear") -> AugmentedView:
    """One BYOL-style view (see ``AugmentedView``)."""
    return AugmentedView(size, scale, aug, blur_prob, solarize_prob, norm, interpolation)


def moby_view(image_size: int, aug, view: int, norm: str) -> T.Compose:
    """One branch of the BYOL/MoBY pair: ``view`` 0 has blur p=1.0, view 1 blur p=0.1 and solarize p=0.2.

    Crops are resized bilinearly (torchvision's default, as in MoBY's code)."""
    return augmented_view(image_size, aug.crop_scale, aug, aug.blur_prob[view], aug.solarize_prob[view], norm)


class MultiView:
    """Apply one transform per view: ``img -> [view_0, view_1, ...]``."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    @property
    def takes_rng(self) -> bool:
        return all(getattr(t, "takes_rng", False) for t in self.transforms)

    def __call__(self, img, rng=None, normalize: bool = True):
        if not normalize:
            return [t(img, random if rng is None else rng, normalize=False) for t in self.transforms]
        if rng is None:
            return [t(img) for t in self.transforms]
        return [t(img, rng) for t in self.transforms]

    @property
    def normalizes_in_batch(self) -> bool:
        """Whether ``__call__(..., normalize=False)`` gives uint8 views that ``normalize_batch`` completes (every
        view is an ``AugmentedView``): normalising a whole batch at once is cheaper than image by image."""
        return all(isinstance(t, AugmentedView) for t in self.transforms)

    def normalize_batch(self, views: Sequence[torch.Tensor], outs: Sequence[torch.Tensor | None] | None = None
                        ) -> list[torch.Tensor]:
        outs = outs or [None] * len(views)
        return [t.normalize_batch(v, o) for t, v, o in zip(self.transforms, views, outs)]

    def prepare(self) -> None:
        for t in self.transforms:
            if hasattr(t, "prepare"):
                t.prepare()

    def jpeg_reduction(self, width: int, height: int) -> int:
        """The largest JPEG draft factor (1, 2, 4 or 8) at which a ``width`` x ``height`` image, decoded at
        1/factor of its size, still gives every view's random resized crop at least the view's output size in
        pixels (the crops are then still downscaled, never upscaled). 1 when a view has no such crop."""
        factor = 8
        for t in self.transforms:
            if not isinstance(t, AugmentedView):
                return 1
            # The smallest crop side: the smallest area at the most elongated aspect ratio (minus rounding).
            smallest = math.sqrt(t.scale[0] * width * height * min(t.ratio[0], 1 / t.ratio[1])) - 1
            while factor > 1 and smallest / factor < t.size + 1:
                factor //= 2
        return factor

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
