"""The GPU data path for datasets of any size: workers read file bytes, the device decodes and augments.

DataLoader workers only read encoded bytes (no decoding, no augmentation), so a few CPU cores feed a
fast GPU. Each batch's JPEGs are decoded together with ``torchvision.io.decode_jpeg`` on the training
device; other formats (PNG, ...) and JPEGs the device decoder rejects (CMYK, corrupt) fall back to the
CPU decoder one by one. An image that cannot be decoded at all is reported and replaced by another of
the batch. Augmentation then runs batched (``BatchMoBYAugment``) with a generator seeded from
(seed, epoch, step, rank), so runs are reproducible and resume exactly.
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from .datasets import DataError
from .training import batch_generator


class EncodedDataset(Dataset):
    """``ds[(epoch, i)] -> (bytes as a uint8 tensor, label, key)`` of an image list dataset."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        _, index = key
        try:
            data = self.dataset.read_bytes(index)
        except OSError:
            data = b""  # reported as unreadable when the batch is decoded
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), self.dataset.labels[index], self.dataset.keys[index]


def collate_encoded(batch):
    data, labels, keys = zip(*batch)
    return list(data), torch.tensor(labels), list(keys)


def _is_jpeg(t: torch.Tensor) -> bool:
    return t.numel() > 3 and int(t[0]) == 0xFF and int(t[1]) == 0xD8


def decode_batch(data: list[torch.Tensor], keys: list[str], device: torch.device, source: str):
    """Decode encoded images to uint8 RGB ``(3, H, W)`` tensors on ``device``; returns (images, failed keys)."""
    images: list = [None] * len(data)
    jpeg = [i for i, t in enumerate(data) if _is_jpeg(t)]
    if jpeg:
        try:
            for i, img in zip(jpeg, decode_jpeg([data[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)):
                images[i] = img
        except RuntimeError:
            pass  # one bad or unsupported JPEG fails the batch call: fall back image by image below
    failed = []
    for i, img in enumerate(images):
        if img is not None:
            continue
        try:
            images[i] = decode_image(data[i], mode=ImageReadMode.RGB).to(device, non_blocking=True)
        except RuntimeError as e:
            failed.append(i)
            print(f"mobyssl: skipping unreadable image: cannot read image '{keys[i]}' in {source}: "
                  f"{str(e).splitlines()[0][:200]}. Remove or replace the file.", file=sys.stderr, flush=True)
    good = [i for i in range(len(data)) if i not in failed]
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
        for b, (data, labels, keys) in enumerate(self.loader):
            images, failed = decode_batch(data, keys, self.device, self.source)
            views = self.augment(images, batch_generator(self.device, self.seed, epoch, start + b, self.rank))
            yield views, labels.to(self.device, non_blocking=True), ["\n".join(failed)]
