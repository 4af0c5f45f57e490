"""SiT's GMML corruption (group masked model learning) as one batched torch operation on any device.

SiT (Atito et al.) corrupts groups of connected pixels of each normalised image and trains a ViT to reconstruct
them. The official code corrupts one image at a time with numpy; this module draws the same distribution for a
whole batch at once, with torch's global RNG on the input's device (so runs are reproducible from the seed and
resume exactly).

The law for one image ``X`` (C, H, W) with target fraction ``f`` and alignment ``a`` (numpy's ``randint(lo, hi)``
excludes ``hi``; ``round`` is round-half-to-even)::

    target = uniform(min(0.5, f), f) * H * W
    mxh, mxw = int(0.3 * H), int(0.3 * W)
    while mask.sum() < target:
        r = (randint(0, H - a) // a) * a;  c = (randint(0, W - a) // a) * a
        h = round(min(randint(a, mxh), H - r) / a) * a;  w = round(min(randint(a, mxw), W - c) / a) * a
        X[:, r:r + h, c:c + w] = content;  mask[r:r + h, c:c + w] = 1

The content is zeros, N(0, 1) noise, a copy of another block of the same (partly corrupted) image, or, in the
second pass, the same pixels of a clean image of the batch. Batched, every image draws a round of blocks at once
and keeps the first ones it needs: an image stops at the first block that reaches its target, as in the loop above.
Only copies depend on earlier blocks' output; zeros, noise (a fresh N(0, 1) per pixel, the same law as one draw per
block) and pass-2 pixels are written once, over the final mask. The host reads one flag back per round (whether any
image is still below its target), so on a GPU the corruption does not stall the host block by block.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..runtime import device_constant

KINDS = ("zeros", "noise", "copy")
MAX_BLOCK = 0.3  # largest block side as a fraction of the image side (exclusive bound of the size draw)
MAX_ROUNDS = 100_000  # guard against a target that cannot be reached; check() makes it unreachable in practice
# Blocks drawn per image at once: as many as fit CHUNK_ELEMENTS (B x chunk x H x W bytes), at most MAX_CHUNK. The
# recipes need 20-40 blocks per image, so at 32 px one round of blocks is enough and at 224 px (batch 64) two or three.
CHUNK_ELEMENTS = 2**26
MAX_CHUNK = 64  # at most 255: a block's index within its round is held in uint8

_ZEROS, _NOISE, _COPY = range(3)


def _randint_below(upper: torch.Tensor) -> torch.Tensor:
    """Uniform integers in ``[0, upper)`` with a per-element bound (``torch.randint`` only takes scalar bounds).

    The modulo of a 62-bit draw is uniform up to a bias of ``upper / 2**62``, and stays in integers on every device.
    """
    return torch.randint(0, 2**62, upper.shape, device=upper.device) % upper


def _div_round_half_even(n, align: int):
    """``round(n / align)`` with Python's round-half-to-even, in integers (``n`` an int or an int tensor)."""
    quotient, remainder = n // align, n % align
    up = (2 * remainder > align) | ((2 * remainder == align) & (quotient % 2 == 1))
    return quotient + up


def _draw_blocks(shape: tuple[int, ...], height: int, width: int, align: int, device) -> tuple[torch.Tensor, ...]:
    """Independent blocks of the official law: top row ``r``, left column ``c``, height ``h``, width ``w``.

    Returns four int64 tensors of ``shape``. ``r`` and ``c`` are multiples of ``align`` drawn from
    ``[0, side - align)``; sizes are drawn from ``[align, int(0.3 * side))``, clipped to the image and rounded to a
    whole number of ``align`` cells (so ``h >= align``).
    """
    max_h, max_w = int(MAX_BLOCK * height), int(MAX_BLOCK * width)
    top = torch.randint(0, height - align, shape, device=device) // align * align
    left = torch.randint(0, width - align, shape, device=device) // align * align
    h = torch.randint(align, max_h, shape, device=device)
    w = torch.randint(align, max_w, shape, device=device)
    h = _div_round_half_even(torch.minimum(h, height - top), align) * align
    w = _div_round_half_even(torch.minimum(w, width - left), align) * align
    return top, left, h, w


@functools.lru_cache(maxsize=64)
def _coverable_lines(size: int, align: int) -> int:
    """How many rows (of ``size``) some block of the law can cover, found by enumerating every start and size."""
    covered = [False] * size
    for top in {start // align * align for start in range(size - align)}:
        # The size is non-decreasing in the drawn number, so the largest draw covers every smaller block's rows.
        h = _div_round_half_even(min(int(MAX_BLOCK * size) - 1, size - top), align) * align
        for row in range(top, min(top + h, size)):
            covered[row] = True
    return sum(covered)


def coverable_fraction(image_size: int, align: int) -> float:
    """The largest fraction of a square ``image_size`` image that blocks of the law can ever cover.

    Rows and columns are drawn independently, so the coverable pixels are the coverable rows times the coverable
    columns. In aligned mode the start cell is uniform in ``{0 .. g - 2}`` (``g = image_size // align``), so the last
    cell row is only reachable by a block of two or more cells started at cell ``g - 2``: at 32 px with align 8 the
    only size is one cell and 9/16 of the image is coverable. Remainder rows (``image_size % align``) are covered only
    by a block that runs past the edge, and the enumeration counts exactly those that can.
    """
    return (_coverable_lines(image_size, align) / image_size) ** 2


@dataclass(frozen=True)
class GMMLCorruption:
    """SiT's corruption of a batch of clean normalised images: blocks of zeros, noise or copies (pass 1), or blocks
    replaced by the same pixels of another clean image of the batch (pass 2, probability 1/2 when enabled)."""

    drop_perc: float = 0.5  # pass-1 target fraction, in [0, 1)
    drop_replace: float = 0.3  # pass-2 target fraction, in [0, 1); 0 turns pass 2 off
    drop_align: int = 1  # 1: pixel blocks; p: blocks of whole p x p cells
    drop_types: tuple[str, ...] = ("zeros",)

    def check(self, image_size: int, key_prefix: str = "method.") -> None:
        """Raise ``ConfigError`` naming the key and the fix when this corruption cannot run on square
        ``image_size`` images (or could never reach its target)."""
        for name in ("drop_perc", "drop_replace"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
                raise ConfigError(f"{key_prefix}{name}={value!r} must be a fraction in [0, 1); e.g. "
                                  f"{key_prefix}drop_perc=0.5 {key_prefix}drop_replace=0.3")
        if self.drop_perc == 0 and self.drop_replace == 0:
            raise ConfigError(f"{key_prefix}drop_perc and {key_prefix}drop_replace are both 0, so nothing would be "
                              f"corrupted and there is nothing to reconstruct; set {key_prefix}drop_perc=0.5 "
                              f"and/or {key_prefix}drop_replace=0.3")
        kinds = tuple(self.drop_types) if isinstance(self.drop_types, (tuple, list)) else None
        if not kinds:
            raise ConfigError(f"{key_prefix}drop_type={self.drop_types!r} must be a non-empty list of kinds from "
                              f"{', '.join(KINDS)}; e.g. {key_prefix}drop_type=[zeros]")
        unknown = [kind for kind in kinds if kind not in KINDS]
        if unknown:
            raise ConfigError(f"{key_prefix}drop_type has unknown kind(s) {', '.join(map(repr, unknown))}; "
                              f"valid kinds are {', '.join(KINDS)}")
        align = self.drop_align
        if not isinstance(align, int) or isinstance(align, bool) or align < 1:
            raise ConfigError(f"{key_prefix}drop_align={align!r} must be a whole number >= 1 "
                              "(1 for pixel blocks, p for blocks of p x p cells, e.g. the patch size)")
        largest_align = int(MAX_BLOCK * image_size) - 1
        if align >= image_size:
            raise ConfigError(f"{key_prefix}drop_align={align} must be smaller than the image size {image_size}; "
                              f"use at most {max(largest_align, 1)}")
        if int(MAX_BLOCK * image_size) <= align:
            smallest_size = align + 1
            while int(MAX_BLOCK * smallest_size) <= align:
                smallest_size += 1
            fix = f"use {key_prefix}drop_align <= {largest_align} or " if largest_align >= 1 else "use "
            raise ConfigError(f"{key_prefix}drop_align={align} leaves no block size to draw at image size "
                              f"{image_size} (sizes are drawn from [align, int(0.3 * {image_size}) = "
                              f"{int(MAX_BLOCK * image_size)})); {fix}images of at least {smallest_size} px")
        reachable = coverable_fraction(image_size, align)
        shown = math.floor(reachable * 10_000) / 10_000  # rounded down, so the value quoted as the fix is accepted
        coverable_pixels = _coverable_lines(image_size, align) ** 2
        for name in ("drop_perc", "drop_replace"):
            value = getattr(self, name)
            if value * image_size * image_size > coverable_pixels:
                raise ConfigError(f"{key_prefix}{name}={value} is above {reachable:.6g}, the largest fraction that "
                                  f"blocks can cover at image size {image_size} with {key_prefix}drop_align={align}, "
                                  f"so the corruption would never end; lower {key_prefix}{name} to at most "
                                  f"{shown:g} or use a smaller {key_prefix}drop_align")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrupt a batch. ``images``: (B, C, H, W) clean, normalised, floating point, H == W, on any device.

        Returns ``(corrupted (B, C, H, W), mask (B, H, W) bool)``; the mask is True on every pixel of every block
        (also where the value happens not to change). ``images`` is not modified.

        Blocks are drawn in rounds of ``chunk`` per image at once, and the host reads from the device once per round
        (whether any image is still below its target): nothing else waits for the device.
        """
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"GMML corruption expects a float (B, C, H, W) batch, got {images.dtype} "
                             f"{tuple(images.shape)}")
        batch, _, height, width = images.shape
        if height != width:
            raise ValueError(f"GMML corruption expects square images, got {height}x{width}")
        self.check(height)
        device = images.device
        replaced, source, kind, target = self._draw_images(batch, height * width, device)
        is_copy = ~replaced & (kind == _COPY)

        corrupted = images.clone()  # only copy blocks are written in the loop: they read earlier blocks' output
        mask = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
        covered = torch.zeros(batch, dtype=torch.float64, device=device)
        chunk = max(1, min(MAX_CHUNK, CHUNK_ELEMENTS // (batch * height * width)))
        rounds = 0
        while True:
            if rounds >= MAX_ROUNDS:
                raise RuntimeError(f"GMML corruption did not reach its target coverage within {MAX_ROUNDS} blocks "
                                   f"per image ({self}, {height}x{width} images); check() should have refused it")
            size = min(chunk, MAX_ROUNDS - rounds)
            rounds += size
            covered = self._add_blocks(corrupted, mask, covered, target, is_copy, size)
            if not bool((covered < target).any()):  # the one read back per round of blocks
                break
        content = torch.zeros_like(images)  # "zeros"
        if "noise" in self.drop_types:
            # Each pixel shows the noise of the last block over it, a fresh N(0, 1) draw: one draw per pixel is the
            # same law as one per block.
            is_noise = ~replaced & (kind == _NOISE)
            content = torch.where(is_noise[:, None, None, None], torch.randn_like(images), content)
        if self.drop_replace > 0:
            content = torch.where(replaced[:, None, None, None], images[source], content)
        written = mask[:, None] & ~is_copy[:, None, None, None]
        return torch.where(written, content, corrupted), mask

    def _draw_images(self, batch: int, pixels: int, device) -> tuple[torch.Tensor, ...]:
        """Per-image choices, (B,) each: ``replaced`` (pass 2's coin), ``source`` (pass 2's clean image), ``kind``
        (an index into ``KINDS``) and ``target`` (pixels to cover, float64). All are drawn for every image, so the
        RNG use does not depend on the coin's outcome."""
        replaced = torch.zeros(batch, dtype=torch.bool, device=device)
        if self.drop_replace > 0:
            replaced = torch.randint(0, 2, (batch,), device=device).bool()
        source = torch.randint(0, batch, (batch,), device=device)
        kind_index = torch.randint(0, len(self.drop_types), (batch,), device=device)
        kind = device_constant(tuple(KINDS.index(k) for k in self.drop_types), device, torch.int64)[kind_index]
        fraction = torch.full((batch,), float(self.drop_perc), dtype=torch.float64, device=device)
        fraction = fraction.masked_fill(replaced, float(self.drop_replace))
        lowest = fraction.clamp(max=0.5)
        uniform = torch.rand(batch, dtype=torch.float64, device=device)
        return replaced, source, kind, (lowest + uniform * (fraction - lowest)) * pixels

    def _add_blocks(self, corrupted, mask, covered, target, is_copy, count: int) -> torch.Tensor:
        """Draw ``count`` blocks per image and add to ``mask`` (in place) the first ones of each image that are
        needed: block k counts while the coverage before it is below the image's target. Copy blocks are also
        written into ``corrupted`` (in place), in order. Returns the new coverage (B,) in pixels."""
        batch, _, height, width = corrupted.shape
        device = corrupted.device
        top, left, h, w = _draw_blocks((batch, count), height, width, self.drop_align, device)
        rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
        in_rows = (rows >= top[..., None]) & (rows < (top + h)[..., None])  # (B, count, H)
        in_cols = (cols >= left[..., None]) & (cols < (left + w)[..., None])  # (B, count, W)
        # The first block of this round over each pixel (count where none is, or where an earlier round was).
        order = torch.arange(count, dtype=torch.uint8, device=device)[None, :, None]
        row_key = torch.where(in_rows, order, count)
        col_key = torch.where(in_cols, order, count)
        first = torch.maximum(row_key[..., None], col_key[:, :, None, :]).amin(dim=1)  # (B, H, W)
        first = torch.where(mask, count, first)
        index = first.flatten(1).long()
        new_pixels = torch.zeros(batch, count + 1, dtype=torch.float64, device=device)
        new_pixels.scatter_add_(1, index, new_pixels.new_ones(()).expand(index.shape))  # no (B, H * W) ones
        after = covered[:, None] + new_pixels[:, :count].cumsum(1)  # coverage after each block, (B, count)
        before = torch.cat([covered[:, None], after[:, :-1]], dim=1)
        used = before < target[:, None]  # the stopping rule: a block is added while the target is not reached
        n_used = used.sum(1)
        mask |= first < n_used[:, None, None]
        if "copy" in self.drop_types:
            self._write_copies(corrupted, rows, cols, top, left, h, w, in_rows, in_cols, used & is_copy[:, None])
        return torch.where(n_used > 0, after.gather(1, (n_used - 1).clamp(min=0)[:, None])[:, 0], covered)

    def _write_copies(self, corrupted, rows, cols, top, left, h, w, in_rows, in_cols, write) -> None:
        """Copy into each block ``k`` where ``write[:, k]`` a block of the same size from the same image as it is
        after the blocks before it (official: the source corner is drawn from [0, side - size), aligned)."""
        batch, channels, height, width = corrupted.shape
        align = self.drop_align
        top2 = _randint_below(height - h) // align * align
        left2 = _randint_below(width - w) // align * align
        for k in range(top.shape[1]):
            source_rows = torch.where(in_rows[:, k], rows - top[:, k, None] + top2[:, k, None], rows)  # (B, H)
            source_cols = torch.where(in_cols[:, k], cols - left[:, k, None] + left2[:, k, None], cols)  # (B, W)
            flat_index = (source_rows[:, :, None] * width + source_cols[:, None, :]).flatten(1)  # (B, H * W)
            copied = corrupted.flatten(2).gather(2, flat_index[:, None, :].expand(-1, channels, -1))
            block = in_rows[:, k, :, None] & in_cols[:, k, None, :] & write[:, k, None, None]  # (B, H, W)
            corrupted.copy_(torch.where(block[:, None], copied.view_as(corrupted), corrupted))


def corrupt_views(corruption: GMMLCorruption, views: list[torch.Tensor]) -> tuple[list[torch.Tensor],
                                                                                   list[torch.Tensor]]:
    """Corrupt each view (B, C, H, W) separately: pass-2 sources are drawn within the same view.

    Returns the corrupted views and their (B, H, W) bool masks, in the order of ``views``.
    """
    corrupted, masks = [], []
    for view in views:
        out, mask = corruption(view)
        corrupted.append(out)
        masks.append(mask)
    return corrupted, masks
