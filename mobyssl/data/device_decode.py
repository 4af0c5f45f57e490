"""The GPU data path for datasets of any size: workers read file bytes, the device decodes and augments.

DataLoader workers only read encoded bytes (no decoding, no augmentation), so a few CPU cores feed a
fast GPU. Every image's header is checked first (PIL reads only the header: cheap), so a decompression
bomb is refused before anything is decoded. Each batch's JPEGs are decoded together with
``torchvision.io.decode_jpeg`` on the training device; other formats and JPEGs the device decoder rejects
(CMYK, corrupt) fall back to torchvision's CPU decoder one by one (16-bit PNGs are scaled to 8 bits as
``round(v / 257)``), and formats torchvision cannot decode (TIFF, BMP, PPM, ...) to PIL and ``to_rgb8``,
as in the CPU pipeline. An image that cannot be used at all is reported and replaced by another of the
batch; its name goes with the batch, so the trainer counts it and stops past ``data.max_bad_fraction``.
Augmentation then runs batched (``BatchMoBYAugment``) with a generator seeded from (seed, epoch, step,
rank), so runs are reproducible and resume exactly.
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from .datasets import DataError, decode_image_bytes, open_image, uint16_to_uint8
from .training import batch_generator


class EncodedDataset(Dataset):
    """``ds[(epoch, i)] -> (bytes as a uint8 tensor, label, key, error)`` of an image list dataset.

    ``error`` is ``""``, or the message of a file that could not be read (too large, missing, ...): its
    bytes are then empty and the batch decoder reports it.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        _, index = key
        name = self.dataset.keys[index]
        try:
            data, error = self.dataset.read_bytes(index), ""
        except DataError as e:
            data, error = b"", str(e)
        except OSError as e:
            data, error = b"", f"cannot read image '{name}' in {self.dataset.source}: {e}. Remove or replace the file."
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return tensor, self.dataset.labels[index], name, error


def collate_encoded(batch):
    """``(all bytes in one uint8 tensor, their lengths, labels, keys, errors)``: one tensor for the batch's bytes,
    not one per image, so a worker hands the batch over through one shared-memory block (64 blocks per batch made
    the workers, not the reading, the limit). ``split_encoded`` gives the images back."""
    data, labels, keys, *errors = zip(*batch)
    lengths = torch.tensor([len(t) for t in data], dtype=torch.long)
    return (torch.cat(data), lengths, torch.tensor(labels), list(keys),
            list(errors[0]) if errors else [""] * len(keys))


def split_encoded(flat: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """The per-image byte tensors of a ``collate_encoded`` batch (views of ``flat``, no copy)."""
    return list(torch.split(flat, lengths.tolist()))


def _is_jpeg(t: torch.Tensor) -> bool:
    return t.numel() > 3 and int(t[0]) == 0xFF and int(t[1]) == 0xD8


def decode_batch(data: list[torch.Tensor], keys: list[str], device: torch.device, source: str,
                 errors: list[str] | None = None):
    """Decode encoded images to uint8 RGB ``(3, H, W)`` tensors on ``device``; returns (images, failed keys).

    ``errors[i]``, when not empty, says why image ``i`` could not be read; it is then reported as failed.
    A failed image's slot holds another image of the batch.
    """
    n = len(data)
    images: list = [None] * n
    reasons: dict[int, str] = {}
    encoded: dict[int, bytes] = {}
    for i, t in enumerate(data):
        if errors and errors[i]:
            reasons[i] = errors[i]
            continue
        encoded[i] = t.numpy().tobytes()
        try:
            open_image(encoded[i], f"'{keys[i]}' in {source}")  # header only: refuses decompression bombs
        except DataError as e:
            reasons[i] = str(e)
    jpeg = [i for i in range(n) if i not in reasons and _is_jpeg(data[i])]
    if jpeg:
        try:
            for i, img in zip(jpeg, decode_jpeg([data[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)):
                images[i] = img
        except RuntimeError:
            pass  # one bad or unsupported JPEG fails the batch call: fall back image by image below
    for i in range(n):
        if images[i] is not None or i in reasons:
            continue
        try:
            img = decode_image(data[i], mode=ImageReadMode.RGB)
            images[i] = (uint16_to_uint8(img) if img.dtype == torch.uint16 else img).to(device, non_blocking=True)
            continue
        except RuntimeError:
            pass  # a format torchvision cannot decode (TIFF, BMP, PPM, ...) or a damaged file: PIL decides
        try:
            img = decode_image_bytes(encoded[i], f"'{keys[i]}' in {source}")
            images[i] = pil_to_tensor(img).to(device, non_blocking=True)
        except DataError as e:
            reasons[i] = str(e)
    failed = sorted(reasons)
    for i in failed:
        print(f"mobyssl: skipping unreadable image: {reasons[i]}", file=sys.stderr, flush=True)
    good = [i for i in range(n) if i not in reasons]
    if not good:
        raise DataError(f"no image of a batch from {source} could be decoded ({', '.join(keys[:5])} ...)")
    for k, i in enumerate(failed):
        images[i] = images[good[k % len(good)]]
    return images, [keys[i] for i in failed]


class DeviceDecodeLoader:
    """Batches ``(views, labels, failed)`` like the CPU DataLoader, decoded and augmented on ``device``."""

    def __init__(self, loader, sampler, augment, device: torch.device, source: str, seed: int = 0, rank: int = 0):
        self.loader, self.sampler, self.augment = loader, sampler, augment
        self.device, self.source, self.seed, self.rank = device, source, seed, rank

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        epoch, start = self.sampler.epoch, self.sampler.start_step
        for b, (flat, lengths, labels, keys, errors) in enumerate(self.loader):
            images, failed = decode_batch(split_encoded(flat, lengths), keys, self.device, self.source, errors)
            views = self.augment(images, batch_generator(self.device, self.seed, epoch, start + b, self.rank))
            yield views, labels.to(self.device, non_blocking=True), ["\n".join(failed)]
