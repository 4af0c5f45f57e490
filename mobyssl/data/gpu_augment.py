"""MoBY's augmentations as batched tensor ops with per-sample random parameters (any device).

Same operations, order and parameter distributions as the CPU pipeline in ``transforms.py``
(torchvision's RandomResizedCrop and ColorJitter sampling, PIL-style Gaussian blur with std
sigma, solarize at 128), applied to a whole uint8 batch at once, so a GPU can augment thousands
of images per second. Differences from the PIL pipeline: crops are resized with ``roi_align``
(bilinear, averaging several samples per output pixel when shrinking, like an antialiased
resize), and intermediate results stay in float instead of being rounded to uint8 after each op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from .transforms import NORMALIZATION

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


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``boxes`` out of float ``images`` ``(B, C, H, W)`` and resize each to ``size x size``."""
    idx = torch.arange(images.shape[0], device=images.device, dtype=images.dtype)[:, None]
    return roi_align(images, torch.cat([idx, boxes.to(images.dtype)], dim=1), (size, size),
                     spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


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


def color_jitter(x: torch.Tensor, strengths, apply: torch.Tensor, generator=None) -> torch.Tensor:
    """torchvision ColorJitter per sample: factors drawn as it does, the 4 ops in a random order each."""
    b, dev = x.shape[0], x.device
    bri, con, sat, hue = strengths
    factors = torch.stack([
        _uniform(b, max(0.0, 1 - bri), 1 + bri, generator, dev),
        _uniform(b, max(0.0, 1 - con), 1 + con, generator, dev),
        _uniform(b, max(0.0, 1 - sat), 1 + sat, generator, dev),
        _uniform(b, -hue, hue, generator, dev),
    ], dim=1)
    order = torch.argsort(torch.rand((b, 4), generator=generator, device=dev), dim=1)
    sel = torch.nonzero(apply).flatten()
    if sel.numel() == 0:
        return x
    y = x[sel]
    for pos in range(4):
        ops = order[sel, pos]
        for op in range(4):
            m = torch.nonzero(ops == op).flatten()
            if m.numel():
                y[m] = _adjust(y[m], op, factors[sel[m], op])
    out = x.clone()
    out[sel] = y
    return out


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


class BatchMoBYAugment:
    """Two MoBY views of a uint8 batch ``(B, 3, H, W)`` (or a list of images of any sizes) on any device,
    with per-sample parameters.

    ``aug`` is the ``data.aug`` config section; ``generator`` (on the batch's device) makes a step's
    augmentations reproducible.
    """

    def __init__(self, image_size: int, aug, norm: str = "imagenet"):
        self.size = image_size
        self.aug = aug
        self.mean, self.std = NORMALIZATION[norm]

    def crops(self, images, generator=None) -> torch.Tensor:
        """Random resized crops ``(B, 3, size, size)`` in [0, 1] of a uint8 batch or a list of uint8 images."""
        a = self.aug
        if isinstance(images, torch.Tensor):
            b, dev = images.shape[0], images.device
            hw = torch.tensor(images.shape[-2:], device=dev)
            boxes = sample_crop_boxes(hw[0].expand(b), hw[1].expand(b), tuple(a.crop_scale), generator=generator)
            return resized_crops(images.float() / 255.0, boxes, self.size).clamp(0, 1)
        # Images of different sizes (decoded JPEGs): one crop-and-resize per image.
        dev = images[0].device
        hs = torch.tensor([im.shape[-2] for im in images], device=dev)
        ws = torch.tensor([im.shape[-1] for im in images], device=dev)
        boxes = sample_crop_boxes(hs, ws, tuple(a.crop_scale), generator=generator).long().tolist()
        out = [F.interpolate(im[None, :, y1:y2, x1:x2].float(), size=(self.size, self.size), mode="bilinear",
                             antialias=True, align_corners=False)
               for im, (x1, y1, x2, y2) in zip(images, boxes)]
        return (torch.cat(out) / 255.0).clamp(0, 1)

    def view(self, images, v: int, generator=None) -> torch.Tensor:
        """View ``v`` (0 or 1) of ``images``: a uint8 ``(B, 3, H, W)`` batch or a list of uint8 ``(3, H_i, W_i)``."""
        a = self.aug
        x = self.crops(images, generator)
        b, dev = x.shape[0], x.device
        p = torch.rand((b, 5), generator=generator, device=dev)
        x = torch.where((p[:, 0] < a.flip_prob).view(-1, 1, 1, 1), x.flip(-1), x)
        x = color_jitter(x, a.color_jitter, p[:, 1] < a.color_jitter_prob, generator)
        x = torch.where((p[:, 2] < a.grayscale_prob).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
        if a.blur_prob[v] > 0:
            sigma = _uniform(b, a.blur_sigma[0], a.blur_sigma[1], generator, dev)
            x = torch.where((p[:, 3] < a.blur_prob[v]).view(-1, 1, 1, 1), gaussian_blur(x, sigma, a.blur_sigma[1]), x)
        if a.solarize_prob[v] > 0:
            solar = torch.where(x >= 128 / 255, 1 - x, x)
            x = torch.where((p[:, 4] < a.solarize_prob[v]).view(-1, 1, 1, 1), solar, x)
        mean = torch.tensor(self.mean, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=dev).view(1, 3, 1, 1)
        return (x - mean) / std

    def __call__(self, images: torch.Tensor, generator=None) -> list[torch.Tensor]:
        return [self.view(images, 0, generator), self.view(images, 1, generator)]
