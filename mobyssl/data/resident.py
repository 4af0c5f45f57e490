"""The GPU data path for datasets that fit in device memory: decode once, augment batches on the device.

``ResidentImages`` decodes every image once into one uint8 tensor ``(N, 3, S, S)`` on the training
device; ``ResidentLoader`` then yields the same ``(views, labels, failed)`` batches as the CPU
DataLoader, with MoBY's augmentations applied to the whole batch on the device. Batches follow the
same ``GlobalBatchSampler``; each batch's augmentation generator is seeded from (seed, epoch, step,
rank), so runs are reproducible and resume exactly.

Unreadable images follow the same rule as in the other pipelines: each is reported, counted and named,
and more than ``data.max_bad_fraction`` of them stops the run, here once, after decoding and before the
first step. The first batch the loader yields carries the unreadable files (``UnreadableAtStart``), so
the trainer's ``BadDataMonitor`` counts them like the CPU DataLoader's.
"""

from __future__ import annotations

import sys

import torch
from torchvision.transforms import functional as TF

from .datasets import DataError
from .training import batch_generator


class UnreadableAtStart(list):
    """The ``failed`` element of a batch for files found unreadable in one pass over the whole dataset.

    A list holding one newline-joined entry, like the CPU DataLoader's, plus ``dataset_total``: the number
    of images in that pass, so that ``BadDataMonitor`` judges the rate over the dataset, not over one batch.
    """

    def __init__(self, names: list[str], dataset_total: int):
        super().__init__(["\n".join(names)] if names else [""])
        self.dataset_total = dataset_total


class ResidentImages:
    """All images of ``dataset`` as uint8 ``(N, 3, size, size)`` plus labels, on ``device``.

    Images of another size are resized (shorter side) and centre-cropped to ``size``. An unreadable
    image is reported and its slot filled with a readable one, so indices keep their meaning; its key is
    listed in ``skipped_files``. With ``max_bad_fraction`` set, more unreadable images than that fraction
    of the dataset is a ``DataError`` listing them (raised here, before any training).
    """

    def __init__(self, dataset, size: int, device: torch.device, max_bytes: int | None = None,
                 max_bad_fraction: float | None = None):
        n = len(dataset)
        need = n * 3 * size * size
        if max_bytes is not None and need > max_bytes:
            raise DataError(f"data.pipeline=gpu_resident would keep {need / 2**30:.1f} GiB of images on {device} "
                            f"(more than {max_bytes / 2**30:.1f} GiB); use data.pipeline=gpu_decode or cpu for this dataset.")
        images = torch.empty((n, 3, size, size), dtype=torch.uint8)
        labels = list(dataset.labels)
        bad = []
        for i in range(n):
            try:
                img = dataset.load(i)
            except DataError as e:
                print(f"mobyssl: skipping unreadable image: {e}", file=sys.stderr, flush=True)
                bad.append(i)
                continue
            t = TF.pil_to_tensor(img)
            if t.shape[-2:] != (size, size):
                t = TF.center_crop(TF.resize(t, size, antialias=True), size)
            images[i] = t
        self.skipped_files = [dataset.keys[i] for i in bad]
        key = getattr(dataset, "key", None) or "data.train"
        listed = ", ".join(self.skipped_files[:10]) + (" ..." if len(bad) > 10 else "")
        if len(bad) == n:
            raise DataError(f"{key}={dataset.source}: none of its {n} images could be read ({listed}); check the "
                            "data source.")
        if max_bad_fraction is not None and len(bad) / n > max_bad_fraction:
            raise DataError(f"{key}={dataset.source}: {len(bad)} of {n} images could not be read "
                            f"({100 * len(bad) / n:.1f}% > data.max_bad_fraction={max_bad_fraction}): {listed}. "
                            "Fix or remove these files, or raise data.max_bad_fraction.")
        good = sorted(set(range(n)) - set(bad))
        for k, i in enumerate(bad):
            j = good[k % len(good)]
            images[i], labels[i] = images[j], labels[j]
        self.skipped = len(bad)
        self.images = images.to(device)
        self.labels = torch.tensor(labels, device=device)

    def __len__(self) -> int:
        return self.images.shape[0]


class ResidentLoader:
    """Iterates a ``GlobalBatchSampler(yield_epoch=True)`` over resident images; augments on the device.

    The first batch it yields carries ``UnreadableAtStart(resident.skipped_files, len(resident))`` as its
    ``failed`` element; every other batch ``[""]``.
    """

    def __init__(self, resident: ResidentImages, sampler, batch_size: int, augment, seed: int = 0, rank: int = 0):
        self.resident, self.sampler, self.batch_size = resident, sampler, batch_size
        self.augment, self.seed, self.rank = augment, seed, rank
        self._reported = False  # the unreadable files go with the first batch yielded

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        keys = list(self.sampler)
        device = self.resident.images.device
        for b in range(len(keys) // self.batch_size):
            chunk = keys[b * self.batch_size:(b + 1) * self.batch_size]
            epoch = chunk[0][0]
            step = self.sampler.start_step + b
            idx = torch.tensor([i for _, i in chunk])
            if device.type == "cuda":  # pinned and asynchronous: a pageable copy would make the host wait
                idx = idx.pin_memory().to(device, non_blocking=True)
            idx = idx.to(device)
            views = self.augment(self.resident.images[idx], batch_generator(device, self.seed, epoch, step, self.rank))
            failed = [""]
            if not self._reported:
                self._reported = True
                failed = UnreadableAtStart(getattr(self.resident, "skipped_files", []), len(self.resident))
            yield views, self.resident.labels[idx], failed
