"""EsViT's dense correspondence accuracy of a frozen backbone (EsViT analyze_models.py, ``accuracy_correspondence``).

Each test image is view 1; view 2 is the same image horizontally flipped, colour-jittered and made grey, so the
true correspondence of every token is known: the mirrored token. Every view-1 token is matched to its most similar
view-2 token (cosine of the backbone's final, normed token features); the ``top_k`` most similar pairs (EsViT: 10)
are scored by the fraction that land exactly on the mirrored token and by the mean distance (in pixels) between the
matched and the mirrored token centres. With few tokens (a Swin's 2x2 or 7x7 final grid) ten pairs say little, so
the accuracy and distance over *all* tokens are reported too.

Differences from EsViT: the colour ops run on float pixels, batched (EsViT rounds to uint8 between PIL ops and
uses batch 1), so view 2's random draws depend on the batch they are made in; the token stride is the image side
over the grid side (EsViT hard-codes 32 for Swin, the patch size for DeiT); pairs with equal similarity keep token
order, as EsViT's stable sort does.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import distributed as D
from ..data.gpu_augment import _gray, apply_jitter, jitter_factors
from ..data.transforms import NORMALIZATION
from ..errors import BackboneError
from ..models.backbones import patch_sides, patch_tokens
from ..runtime import autocast, device_constant, eval_mode

_MAX_SIMILARITIES = 2**26  # entries of the (images, N, N) similarity block matched at once (256 MiB in float32)


@dataclass(frozen=True)
class View2:
    """The transform that makes view 2 from an image. Defaults are EsViT's: horizontal flip (p=1), ColorJitter
    (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) applied with p=0.8, grayscale (p=1)."""

    flip: bool = True
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_prob: float = 0.8
    grayscale: bool = True

    def __post_init__(self):
        jitter = tuple(float(s) for s in self.jitter)
        object.__setattr__(self, "jitter", jitter)  # a list from a config becomes a (hashable) tuple
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ValueError("correspondence.jitter must be 4 non-negative strengths (brightness, contrast, "
                             f"saturation, hue), the hue at most 0.5; got {list(self.jitter)}")
        if not 0.0 <= self.jitter_prob <= 1.0:
            raise ValueError(f"correspondence.jitter_prob must be in [0, 1], got {self.jitter_prob}")


def make_view2(images01: torch.Tensor, view2: View2 = View2(), generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """View 2 of float images ``(B, 3, H, W)`` in [0, 1]: ``(B, 3, H, W)`` in [0, 1], per-sample random jitter.

    The ops run in EsViT's order (flip, jitter, grayscale). ``generator`` (on the images' device) makes the draws
    reproducible; they are drawn whatever ``view2`` says, so the stream does not depend on the options.
    """
    b = images01.shape[0]
    apply = torch.rand(b, generator=generator, device=images01.device) < view2.jitter_prob
    factors, order = jitter_factors(b, view2.jitter, generator, images01.device)
    x = images01.flip(-1) if view2.flip else images01
    x = apply_jitter(x, factors.to(x.dtype), order, apply)
    if view2.grayscale:
        x = _gray(x).repeat(1, 3, 1, 1)
    return x


def _grid_sides(backbone: nn.Module, features: torch.Tensor, images: torch.Tensor, n: int) -> tuple[int, int]:
    """``(h, w)`` of the token grid behind ``n`` raster-order tokens of ``images`` ``(B, 3, H, W)``."""
    if features.dim() == 4:  # a Swin's NHWC map (or a CNN's NCHW one): the sides are in the shape
        nhwc = getattr(backbone, "output_fmt", "NCHW") == "NHWC"
        h, w = features.shape[1:3] if nhwc else features.shape[2:4]
        return int(h), int(w)
    height, width = images.shape[-2:]
    patch = patch_sides(backbone)
    if patch and (height // patch[0]) * (width // patch[1]) == n:
        return height // patch[0], width // patch[1]
    h = max(round(math.sqrt(n * height / width)), 1)  # no usable patch size: the grid with the image's aspect
    if h * (n // h) != n:
        raise BackboneError(f"cannot tell the token grid of {type(backbone).__name__}: {n} tokens for "
                         f"{height}x{width} images")
    return h, n // h


def token_grid(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The backbone's final token features of ``images`` ``(B, 3, H, W)`` as a grid ``(B, h, w, C)``.

    ``forward_features`` output (after the final norm), class and register tokens dropped, row ``i`` column
    ``j`` the token of the patch (or Swin map cell) at that place. A backbone without a token grid raises
    ``BackboneError`` (``patch_tokens``).
    """
    features = backbone.forward_features(images)
    tokens = patch_tokens(backbone, features)
    h, w = _grid_sides(backbone, features, images, tokens.shape[1])
    return tokens.reshape(tokens.shape[0], h, w, tokens.shape[2])


def match_scores(f1: torch.Tensor, f2: torch.Tensor, top_k: int = 10,
                 stride: float | tuple[float, float] = 1.0, flipped: bool = True) -> dict[str, torch.Tensor]:
    """Score the matches of view-1 tokens ``f1`` to view-2 tokens ``f2``, both ``(B, h, w, C)``.

    Each view-1 token is matched to the view-2 token of highest cosine similarity. The true match of token
    (row ``r``, column ``c``) is ``(r, w-1-c)`` when view 2 is the flipped image (``flipped``), ``(r, c)`` when not.
    Token centres lie at ``k * stride + stride / 2`` pixels (EsViT's; ``stride`` a number or ``(rows, columns)``),
    so the mirrored token centre is EsViT's ``width - x``, and distances are Euclidean, in pixels.

    Returns per-image float tensors ``(B,)``: ``top_k_accuracy`` (fraction of the ``top_k`` pairs of highest
    similarity that hit the true token; ties keep token order), ``top_k_distance`` (their mean distance),
    ``all_accuracy`` and ``all_distance`` (the same over all ``h*w`` tokens), and ``top_k_tokens`` ``(B, top_k)``,
    the raster indices of the view-1 tokens of those pairs, most similar first.
    """
    if f1.dim() != 4 or f1.shape != f2.shape:
        raise ValueError(f"token grids must both be (B, h, w, C), got {tuple(f1.shape)} and {tuple(f2.shape)}")
    b, h, w, c = f1.shape
    n = h * w
    if not 1 <= top_k <= n:
        raise ValueError(f"correspondence.top_k={top_k} must be between 1 and the number of tokens, {n} (a {h}x{w} "
                         f"grid at this image size); use correspondence.top_k<={n}")
    sy, sx = (float(stride), float(stride)) if isinstance(stride, (int, float)) else map(float, stride)
    q = F.normalize(f1.float().reshape(b, n, c), dim=-1)
    k = F.normalize(f2.float().reshape(b, n, c), dim=-1)
    best_similarity, predicted = (q @ k.transpose(1, 2)).max(dim=2)  # (B, N): per view-1 token, over view 2
    token = torch.arange(n, device=f1.device)
    rows, cols = token // w, token % w
    true_cols = w - 1 - cols if flipped else cols
    hit = predicted == rows * w + true_cols
    distance = torch.hypot((predicted // w - rows).float() * sy, (predicted % w - true_cols).float() * sx)
    top = torch.sort(best_similarity, dim=1, descending=True, stable=True).indices[:, :top_k]
    return {
        "top_k_accuracy": hit.gather(1, top).float().mean(1),
        "top_k_distance": distance.gather(1, top).mean(1),
        "all_accuracy": hit.float().mean(1),
        "all_distance": distance.mean(1),
        "top_k_tokens": top,
    }


def evaluate_correspondence(backbone: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None,
                            normalization: str, top_k: int = 10, view2: View2 = View2(), seed: int = 0,
                            failed: list[str] | None = None) -> dict[str, float]:
    """EsViT's correspondence accuracy of ``backbone`` on the images of ``loader``, averaged over images.

    ``loader`` yields ``(images, labels)`` (labels unused) with images ``(B, 3, H, W)`` normalised with
    ``NORMALIZATION[normalization]`` (``data.normalization``), or, over a ``SkipUnreadable`` dataset,
    ``(images, labels, keys)``: images with a non-empty key could not be read; they are left out and their keys
    appended to ``failed`` when given (another third element is ignored). View 2 is made from the un-normalised
    pixels with ``view2`` and a generator seeded with ``seed``, then normalised the same way. The backbone runs in
    eval mode (restored). Under torchrun give each rank its shard: the totals are summed over ranks (call it on
    every rank).

    Returns ``corr_top{k}_accuracy`` and ``corr_all_accuracy`` in %, ``corr_top{k}_distance_px`` and
    ``corr_all_distance_px`` in pixels of the input images (see ``match_scores``); NaN when no image was read.
    """
    with torch.no_grad():  # in the body: mutation testing skips decorated functions
        if normalization not in NORMALIZATION:
            raise ValueError(f"data.normalization must be one of {sorted(NORMALIZATION)}, got {normalization!r}")
        mean, std = (device_constant(tuple(v), device).view(1, 3, 1, 1) for v in NORMALIZATION[normalization])
        generator = torch.Generator(device=device).manual_seed(seed)
        keys = ("top_k_accuracy", "top_k_distance", "all_accuracy", "all_distance")
        # Sums, then the image count, on the device (no host wait per batch); MPS has no float64.
        totals = torch.zeros(len(keys) + 1, device=device,
                             dtype=torch.float32 if device.type == "mps" else torch.float64)
        bar = tqdm(loader, desc="correspondence", unit="batch", leave=False,
                   disable=not (sys.stderr.isatty() and D.is_main_process()))
        with eval_mode(backbone):
            for batch in bar:
                images = batch[0]
                image_keys = batch[2] if len(batch) > 2 and not torch.is_tensor(batch[2]) else ()
                if any(isinstance(k, str) and k for k in image_keys):  # SkipUnreadable's; anything else is ignored
                    if failed is not None:
                        failed.extend(k for k in image_keys if k)
                    images = images[torch.tensor([not k for k in image_keys])]
                    if images.shape[0] == 0:
                        continue
                view1 = images.to(device, non_blocking=True).float()
                pixels = (view1 * std + mean).clamp(0, 1)
                view2_images = (make_view2(pixels, view2, generator) - mean) / std
                with autocast(device, amp_dtype):
                    grids = token_grid(backbone, torch.cat([view1, view2_images]))  # one pass for both views
                f1, f2 = grids.float().chunk(2)
                _, h, w, _ = f1.shape
                stride = (images.shape[-2] / h, images.shape[-1] / w)
                chunk = max(1, _MAX_SIMILARITIES // (h * w) ** 2)
                for start in range(0, f1.shape[0], chunk):
                    scores = match_scores(f1[start:start + chunk], f2[start:start + chunk], top_k, stride,
                                          flipped=view2.flip)
                    totals[:-1] += torch.stack([scores[key].sum() for key in keys]).to(totals.dtype)
                totals[-1] += f1.shape[0]
        totals = D.gather_no_grad(totals[None]).sum(0).cpu()
        mean_of = dict(zip(keys, (totals[:-1] / totals[-1]).tolist()))  # NaN when no image was read
        return {
            f"corr_top{top_k}_accuracy": 100.0 * mean_of["top_k_accuracy"],
            f"corr_top{top_k}_distance_px": mean_of["top_k_distance"],
            "corr_all_accuracy": 100.0 * mean_of["all_accuracy"],
            "corr_all_distance_px": mean_of["all_distance"],
        }
