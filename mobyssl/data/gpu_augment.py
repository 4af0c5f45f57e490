"""MoBY's and DINO/EsViT's augmentations as batched tensor ops with per-sample random parameters (any device).

Same operations, order and parameter distributions as the CPU pipeline in ``transforms.py``
(torchvision's RandomResizedCrop and ColorJitter sampling, PIL-style Gaussian blur with std
sigma, solarize at 128), applied to a whole uint8 batch at once, so a GPU can augment thousands
of images per second. Differences from the PIL pipeline: bilinear crops (MoBY's) are resized with
``roi_align`` (averaging several samples per output pixel when shrinking, like an antialiased resize),
bicubic ones (DINO's) with PIL's antialiased bicubic filter as two per-sample weight matrices, and
intermediate results stay in float instead of being rounded to uint8 after each op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from ..runtime import device_constant
from .transforms import INTERPOLATIONS, NORMALIZATION, MultiCrop

GRAY = (0.299, 0.587, 0.114)


def _uniform(shape, lo, hi, g, device):
    return torch.rand(shape, generator=g, device=device) * (hi - lo) + lo


def sample_crop_boxes(heights: torch.Tensor, widths: torch.Tensor, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                      generator=None, attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes ``(B, 4)`` as ``(x1, y1, x2, y2)``, torchvision's sampling, vectorised.

    Up to ``attempts`` (area, aspect) candidates per image; the first that fits is used, else the
    centre crop clamped to ``ratio`` (torchvision's fallback).
    """
    device = heights.device
    b = heights.shape[0]
    H, W = heights.float()[:, None], widths.float()[:, None]
    area = H * W * _uniform((b, attempts), scale[0], scale[1], generator, device)
    log_r = _uniform((b, attempts), math.log(ratio[0]), math.log(ratio[1]), generator, device)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    first = torch.argmax(fits.int(), dim=1)  # first fitting attempt (0 if none fits)
    any_fit = fits.any(dim=1)
    w = w.gather(1, first[:, None])[:, 0]
    h = h.gather(1, first[:, None])[:, 0]
    H, W = H[:, 0], W[:, 0]
    u = torch.rand((b, 2), generator=generator, device=device)
    y = torch.floor(u[:, 0] * (H - h + 1))
    x = torch.floor(u[:, 1] * (W - w + 1))
    # Fallback: the whole image, narrowed to the allowed aspect ratios, centred.
    in_ratio = W / H
    fw = torch.where(in_ratio < ratio[0], W, torch.where(in_ratio > ratio[1], torch.round(H * ratio[1]), W))
    fh = torch.where(in_ratio < ratio[0], torch.round(W / ratio[0]), H)
    fy, fx = torch.floor((H - fh) / 2), torch.floor((W - fw) / 2)
    w, h = torch.where(any_fit, w, fw), torch.where(any_fit, h, fh)
    x, y = torch.where(any_fit, x, fx), torch.where(any_fit, y, fy)
    return torch.stack([x, y, x + w, y + h], dim=1)


def _cubic(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel with PIL's ``a = -0.5`` (support 2)."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def bicubic_weights(lo: torch.Tensor, hi: torch.Tensor, size: int, length: int, dtype=torch.float32) -> torch.Tensor:
    """``(B, size, length)`` weights resizing the span ``[lo, hi)`` of a ``length``-pixel axis to ``size`` pixels.

    PIL's (and ``interpolate(..., antialias=True)``'s) bicubic resampling of the cropped span: output pixel i
    is centred at ``lo + (i + 0.5) * scale``, ``scale = (hi - lo) / size``; the kernel is stretched by
    ``max(scale, 1)`` (antialiasing when shrinking), pixels outside the span get no weight and each row sums to 1.
    """
    lo, hi = lo.to(dtype)[:, None, None], hi.to(dtype)[:, None, None]
    scale = (hi - lo) / size
    centre = lo + (torch.arange(size, device=lo.device, dtype=dtype)[None, :, None] + 0.5) * scale
    pos = torch.arange(length, device=lo.device, dtype=dtype)[None, None, :] + 0.5
    w = _cubic((pos - centre) / scale.clamp(min=1)) * ((pos > lo) & (pos < hi))
    return w / w.sum(dim=2, keepdim=True)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Crop ``boxes`` out of float ``images`` ``(B, C, H, W)`` and resize each to ``size x size``.

    ``bilinear``: ``roi_align`` (MoBY's pipeline); ``bicubic``: PIL's antialiased bicubic filter (DINO's).
    """
    if interpolation == "bicubic":
        h, w = images.shape[-2:]
        wy = bicubic_weights(boxes[:, 1], boxes[:, 3], size, h, images.dtype)[:, None]  # (B, 1, size, H)
        wx = bicubic_weights(boxes[:, 0], boxes[:, 2], size, w, images.dtype)[:, None]  # (B, 1, size, W)
        return wy @ images @ wx.transpose(-1, -2)
    if interpolation != "bilinear":
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    idx = torch.arange(images.shape[0], device=images.device, dtype=images.dtype)[:, None]
    return roi_align(images, torch.cat([idx, boxes.to(images.dtype)], dim=1), (size, size),
                     spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def random_resized_crops(images, size: int, scale, generator=None, interpolation: str = "bilinear") -> torch.Tensor:
    """RandomResizedCrop(``size``, ``scale``) of each image of a uint8 ``(B, 3, H, W)`` batch or a list of uint8
    ``(3, H_i, W_i)`` images: ``(B, 3, size, size)`` floats in [0, 1]."""
    if isinstance(images, torch.Tensor):
        b, dev = images.shape[0], images.device
        h, w = (torch.full((b,), n, dtype=torch.long, device=dev) for n in images.shape[-2:])
        boxes = sample_crop_boxes(h, w, tuple(scale), generator=generator)
        return resized_crops(images.float() / 255.0, boxes, size, interpolation).clamp(0, 1)
    # Images of different sizes (decoded JPEGs): one crop-and-resize per image.
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    dev = images[0].device
    hs = torch.tensor([im.shape[-2] for im in images], device=dev)
    ws = torch.tensor([im.shape[-1] for im in images], device=dev)
    boxes = sample_crop_boxes(hs, ws, tuple(scale), generator=generator).long().tolist()
    out = [F.interpolate(im[None, :, y1:y2, x1:x2].float(), size=(size, size), mode=interpolation,
                         antialias=True, align_corners=False)
           for im, (x1, y1, x2, y2) in zip(images, boxes)]
    return (torch.cat(out) / 255.0).clamp(0, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    # Python-number weights: no constant tensor to copy to the device (or to bake into a compiled graph).
    return x[:, 0:1] * GRAY[0] + x[:, 1:2] * GRAY[1] + x[:, 2:3] * GRAY[2]


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f.view(-1, 1, 1, 1) * a + (1 - f.view(-1, 1, 1, 1)) * b).clamp(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    c = maxc - minc
    safe_c = torch.where(c > 0, c, torch.ones_like(c))
    s = torch.where(maxc > 0, c / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(c))
    h = torch.where(maxc == r, ((g - b) / safe_c) % 6,
                    torch.where(maxc == g, (b - r) / safe_c + 2, (r - g) / safe_c + 4))
    h = torch.where(c > 0, h / 6, torch.zeros_like(h))
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    h6 = h * 6
    i = torch.floor(h6) % 6
    f = h6 - torch.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros_like(x)
    for k, (rr, gg, bb) in enumerate(choices):
        m = (i == k).unsqueeze(1)
        out = torch.where(m, torch.stack([rr, gg, bb], dim=1), out)
    return out


def _adjust(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
    if op == 0:  # brightness
        return (x * f.view(-1, 1, 1, 1)).clamp(0, 1)
    if op == 1:  # contrast: blend with the mean grey level
        return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)
    if op == 2:  # saturation: blend with the greyscale image
        return _blend(x, _gray(x), f)
    hsv = rgb_to_hsv(x)  # hue: rotate H
    hsv = torch.stack([(hsv[:, 0] + f.view(-1, 1, 1)) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
    return hsv_to_rgb(hsv)


def jitter_factors(b: int, strengths, generator=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """ColorJitter's per-sample draws, as torchvision makes them: factors ``(B, 4)`` (brightness, contrast,
    saturation, hue) and each sample's order of the four ops ``(B, 4)``."""
    bri, con, sat, hue = strengths
    factors = torch.stack([
        _uniform(b, max(0.0, 1 - bri), 1 + bri, generator, device),
        _uniform(b, max(0.0, 1 - con), 1 + con, generator, device),
        _uniform(b, max(0.0, 1 - sat), 1 + sat, generator, device),
        _uniform(b, -hue, hue, generator, device),
    ], dim=1)
    order = torch.argsort(torch.rand((b, 4), generator=generator, device=device), dim=1)
    return factors, order


def apply_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """The four colour ops of each sample with ``apply`` set, in its ``order``, with its ``factors``.

    Every op runs on the whole batch and ``where`` keeps the selected samples' results: no data-dependent
    indexing, so the host never waits for the device (on a GPU, a wait per op would stop the host from
    queueing work ahead). Brightness, contrast and saturation are one blend ``f * x + (1 - f) * base``
    (base 0, the mean grey level, the grey image), bit for bit the separate ops.
    """
    for pos in range(4):
        op = order[:, pos]
        f = factors.gather(1, op[:, None]).view(-1, 1, 1, 1)
        gray = _gray(x)
        base = torch.where((op == 1).view(-1, 1, 1, 1), gray.mean(dim=(1, 2, 3), keepdim=True),
                           torch.where((op == 2).view(-1, 1, 1, 1), gray, torch.zeros_like(gray)))
        blended = (f * x + (1 - f) * base).clamp(0, 1)
        hued = _adjust(x, 3, factors[:, 3])
        x = torch.where((apply & (op == 3)).view(-1, 1, 1, 1), hued,
                        torch.where((apply & (op != 3)).view(-1, 1, 1, 1), blended, x))
    return x


def color_jitter(x: torch.Tensor, strengths, apply: torch.Tensor, generator=None) -> torch.Tensor:
    """torchvision ColorJitter per sample: factors drawn as it does, the 4 ops in a random order each, on the
    samples where ``apply`` (``(B,)`` bool) is set."""
    factors, order = jitter_factors(x.shape[0], strengths, generator, x.device)
    return apply_jitter(x, factors, order, apply)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample std ``sigma`` ``(B,)`` (reflect padding)."""
    b, c, h, w = x.shape
    radius = int(math.ceil(3 * max_sigma))
    radius = min(radius, h - 1, w - 1)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None].to(x.dtype)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, K)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def photometric_params(b: int, aug, blur_prob: float, solarize_prob: float, generator=None, device=None) -> dict:
    """Every random choice of the ops after the crop, for ``b`` samples (the order of the draws is fixed)."""
    p = torch.rand((b, 5), generator=generator, device=device)
    factors, order = jitter_factors(b, aug.color_jitter, generator, device)
    params = {"flip": p[:, 0] < aug.flip_prob, "jitter": p[:, 1] < aug.color_jitter_prob, "factors": factors,
              "order": order, "gray": p[:, 2] < aug.grayscale_prob}
    if blur_prob > 0:
        params["sigma"] = _uniform(b, aug.blur_sigma[0], aug.blur_sigma[1], generator, device)
        params["blur"] = p[:, 3] < blur_prob
    if solarize_prob > 0:
        params["solarize"] = p[:, 4] < solarize_prob
    return params


def apply_photometric(x: torch.Tensor, params: dict, max_sigma: float) -> torch.Tensor:
    """The ops after the crop with the choices ``params`` (``photometric_params``), on floats in [0, 1]: a pure
    function of its inputs, so ``torch.compile`` can fuse it."""
    def per_sample(mask):
        return mask.view(-1, 1, 1, 1)

    x = torch.where(per_sample(params["flip"]), x.flip(-1), x)
    x = apply_jitter(x, params["factors"], params["order"], params["jitter"])
    x = torch.where(per_sample(params["gray"]), _gray(x).expand_as(x), x)
    if "blur" in params:
        x = torch.where(per_sample(params["blur"]), gaussian_blur(x, params["sigma"], max_sigma), x)
    if "solarize" in params:
        x = torch.where(per_sample(params["solarize"]), torch.where(x >= 128 / 255, 1 - x, x), x)
    return x


def photometric(x: torch.Tensor, aug, blur_prob: float, solarize_prob: float, generator=None,
                apply=apply_photometric) -> torch.Tensor:
    """The ops after the crop, per sample, on floats in [0, 1]: flip, colour jitter and grayscale as ``aug``
    (the ``data.aug`` section) says, Gaussian blur with probability ``blur_prob`` (sigma in
    ``aug.blur_sigma``), solarize with probability ``solarize_prob``. ``apply``: ``apply_photometric`` or a
    compiled copy of it."""
    params = photometric_params(x.shape[0], aug, blur_prob, solarize_prob, generator, x.device)
    return apply(x, params, float(aug.blur_sigma[1]))


class _BatchViews:
    """Views of a batch made one after the other from the same ``generator``; subclasses define ``view``."""

    n_views: int

    def __init__(self, aug, norm: str):
        self.aug = aug
        self.mean, self.std = NORMALIZATION[norm]
        self._apply = apply_photometric

    def compile(self) -> None:
        """Fuse the per-pixel ops after the crop into a few kernels (``torch.compile``; one graph per view
        size). On a GPU the eager ops are hundreds of small kernels whose launches, not their arithmetic,
        bound small images' throughput. The random draws stay eager, so the views are the same."""
        self._apply = torch.compile(apply_photometric, dynamic=False)

    def _finish(self, crops: torch.Tensor, blur_prob: float, solarize_prob: float, generator) -> torch.Tensor:
        x = photometric(crops, self.aug, blur_prob, solarize_prob, generator, apply=self._apply)
        mean = device_constant(tuple(self.mean), x.device).view(1, 3, 1, 1)
        std = device_constant(tuple(self.std), x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def view(self, images, v: int, generator=None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images, generator=None) -> list[torch.Tensor]:
        return [self.view(images, v, generator) for v in range(self.n_views)]


class BatchMoBYAugment(_BatchViews):
    """Two MoBY views of a uint8 batch ``(B, 3, H, W)`` (or a list of images of any sizes) on any device,
    with per-sample parameters.

    ``aug`` is the ``data.aug`` config section; ``generator`` (on the batch's device) makes a step's
    augmentations reproducible.
    """

    n_views = 2

    def __init__(self, image_size: int, aug, norm: str = "imagenet"):
        super().__init__(aug, norm)
        self.size = image_size

    def crops(self, images, generator=None) -> torch.Tensor:
        """Random resized crops ``(B, 3, size, size)`` in [0, 1] of a uint8 batch or a list of uint8 images."""
        return random_resized_crops(images, self.size, self.aug.crop_scale, generator)

    def view(self, images, v: int, generator=None) -> torch.Tensor:
        """View ``v`` (0 or 1) of ``images``: a uint8 ``(B, 3, H, W)`` batch or a list of uint8 ``(3, H_i, W_i)``."""
        a = self.aug
        return self._finish(self.crops(images, generator), a.blur_prob[v], a.solarize_prob[v], generator)


class BatchMultiCropAugment(_BatchViews):
    """DINO/EsViT's multi-crop views of a uint8 batch ``(B, 3, H, W)`` (or a list of images of any sizes) on
    any device, with per-sample parameters: ``[global 1, global 2, local 1, ..., local N]`` as ``spec`` (a
    ``MultiCrop``) describes them, the other ops from ``aug`` (the ``data.aug`` section), as
    ``multicrop_transform`` does on the CPU.
    """

    def __init__(self, spec: MultiCrop, aug, norm: str = "imagenet"):
        super().__init__(aug, norm)
        self.spec = spec
        self.n_views = spec.n_crops

    def crops(self, images, i: int, generator=None) -> torch.Tensor:
        """Crop ``i`` (0, 1 global; 2.. local) of each image, resized, in [0, 1], before the photometric ops."""
        size, scale, _, _ = self.spec.crop(i)
        return random_resized_crops(images, size, scale, generator, self.spec.interpolation)

    def view(self, images, i: int, generator=None) -> torch.Tensor:
        """View ``i`` of ``images``: a uint8 ``(B, 3, H, W)`` batch or a list of uint8 ``(3, H_i, W_i)``."""
        _, _, blur_prob, solarize_prob = self.spec.crop(i)
        return self._finish(self.crops(images, i, generator), blur_prob, solarize_prob, generator)
