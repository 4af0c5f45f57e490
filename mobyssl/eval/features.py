"""Frozen-backbone feature extraction, with unreadable images left out of the evaluation."""

from __future__ import annotations

import random
import sys

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import distributed as D
from ..errors import DataError
from ..runtime import autocast

IGNORE_LABEL = -100  # the label of an unreadable image's placeholder; cross_entropy's default ignore_index


class SkipUnreadable(Dataset):
    """``ds[i] -> (image, label, "")``, or ``(placeholder, IGNORE_LABEL, key)`` when image ``i`` cannot be read.

    Evaluation must not replace an unreadable image by another (that would bias it): the placeholder
    (a black image through the dataset's transform, of the right shape) keeps the batch's shape, and
    ``extract_features`` / ``linear_probe_full`` leave it out by its non-empty third element. The
    ``DataError`` is printed on stderr, once per file: keys in ``dataset.unreadable`` (filled by the
    evaluation runner) are not printed again.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self.reported = set(getattr(dataset, "unreadable", ()))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            image, label = self.dataset[index]
            return image, label, ""
        except DataError as e:
            key = self.dataset.keys[index]
            if key not in self.reported:
                self.reported.add(key)
                print(f"mobyssl: skipping unreadable image: {e}", file=sys.stderr, flush=True)
            return self._placeholder(), IGNORE_LABEL, key

    def _placeholder(self):
        img = Image.new("RGB", (32, 32))
        transform = getattr(self.dataset, "transform", None)
        if transform is None:
            return img
        with torch.random.fork_rng(devices=[]):  # the other images' augmentations stay as they were
            state = random.getstate()
            try:
                return transform(img)
            finally:
                random.setstate(state)


def extract_features(backbone: nn.Module, loader: DataLoader, device: torch.device,
                     amp_dtype: torch.dtype | None = None,
                     failed: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features ``(N, D)`` float32 and labels ``(N,)`` int64, on the CPU, in loader order.

    ``loader`` yields ``(images, labels)`` or, over a ``SkipUnreadable`` dataset, ``(images, labels, keys)``:
    images with a non-empty key could not be read; they are left out of the output (not passed through the
    backbone) and their keys appended to ``failed`` when given. The backbone runs in eval mode (no drop
    path, BN running stats) and its mode is restored.
    """
    with torch.no_grad():  # in the body: mutation testing skips decorated functions
        was_training = backbone.training
        backbone.eval()
        feats, labels = [], []
        bar = tqdm(loader, desc="features", unit="batch", leave=False,
                   disable=not (sys.stderr.isatty() and D.is_main_process()))
        try:
            for batch in bar:
                images, y = batch[0], torch.as_tensor(batch[1])
                bad = [k for k in batch[2] if k] if len(batch) > 2 else []
                if bad:
                    if failed is not None:
                        failed.extend(bad)
                    keep = torch.tensor([not k for k in batch[2]])
                    if not keep.any():
                        continue
                    images, y = images[keep], y[keep]
                with autocast(device, amp_dtype):
                    f = backbone(images.to(device, non_blocking=True))
                feats.append(f.float().cpu())
                labels.append(y)
        finally:
            backbone.train(was_training)
        if not feats:
            return torch.empty(0, getattr(backbone, "num_features", 0)), torch.empty(0, dtype=torch.long)
        return torch.cat(feats), torch.cat(labels).long()
