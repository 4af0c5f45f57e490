"""The pre-training view of a dataset: reproducible per-sample augmentation, bad images skipped.

``TrainingDataset`` is indexed by ``(epoch, index)`` keys (from ``GlobalBatchSampler(yield_epoch=True)``).
Each sample's augmentation RNG is seeded from ``(seed, epoch, index)``, so the views of a sample do
not depend on the worker that loads it, the number of workers or processes, or a resume. An image that
cannot be read is reported, counted and replaced by another one; the trainer stops if too many fail.
"""

from __future__ import annotations

import random
import sys

import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from .datasets import DataError

MAX_CONSECUTIVE_FAILURES = 10
_CPU_GENERATOR = torch.default_generator


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63 - 1)


def batch_generator(device: torch.device, seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    """The augmentation RNG of one batch on the device pipelines: a function of (seed, epoch, step, rank)."""
    g = torch.Generator(device=device)
    g.manual_seed(sample_seed(seed, epoch, step * 1024 + rank))
    return g


class TrainingDataset(Dataset):
    """Wraps an image dataset; ``ds[(epoch, i)] -> (views, label, failed)``.

    ``failed`` lists (newline-separated) the files that could not be read and were replaced.
    """

    def __init__(self, dataset, transform, seed: int = 0, jpeg_draft: bool = False):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        # data.jpeg_draft: decode JPEGs at the smallest size that still covers every crop the transform can cut.
        self.reduce = getattr(transform, "jpeg_reduction", None) if jpeg_draft else None

    def __len__(self) -> int:
        return len(self.dataset)

    def prepare(self) -> None:
        """Build what the transform needs once (``make_loader`` calls it in the main process, so DataLoader
        workers forked after it share what it built)."""
        if hasattr(self.transform, "prepare"):
            self.transform.prepare()

    def __getitem__(self, key):
        return self._sample(key, normalize=True)

    def __getitems__(self, keys) -> list | _Collated:
        """A batch (the DataLoader calls this when it exists). Views of mobyssl's CPU transforms come back as uint8
        and are normalised here for the whole batch, into shared memory in a worker: the same floats as
        ``__getitem__`` gives, without a float copy per image and a second one to stack them (``collate``)."""
        if not getattr(self.transform, "normalizes_in_batch", False):
            return [self[key] for key in keys]
        samples = [self._sample(key, normalize=False) for key in keys]
        views = [torch.stack(position) for position in zip(*(views for views, _, _ in samples))]
        outs = [_float_like(v) for v in views]
        rest = default_collate([(label, failed) for _, label, failed in samples])
        return _Collated([self.transform.normalize_batch(views, outs), *rest])

    @staticmethod
    def collate(data):
        """The DataLoader's ``collate_fn`` (``make_loader`` takes it from the dataset): a batch that
        ``__getitems__`` already collated is passed through, a list of samples collated as by default."""
        return data.batch if isinstance(data, _Collated) else default_collate(data)

    def _sample(self, key, normalize: bool):
        epoch, index = key
        failed = []
        for attempt in range(MAX_CONSECUTIVE_FAILURES):
            i = (index + attempt * 7919) % len(self.dataset)
            try:
                img = self.dataset.load(i, self.reduce)
                break
            except DataError as e:
                failed.append(self.dataset.keys[i])
                print(f"mobyssl: skipping unreadable image: {e}", file=sys.stderr, flush=True)
        else:
            raise DataError(f"{MAX_CONSECUTIVE_FAILURES} images in a row could not be read from "
                            f"{self.dataset.source} (last: {failed[-1]}); check the data source.")
        s = sample_seed(self.seed, epoch, index)
        if not normalize:
            views = self.transform(img, random.Random(s), normalize=False)
        elif getattr(self.transform, "takes_rng", False):  # mobyssl's views: every choice from one generator
            views = self.transform(img, random.Random(s))
        else:
            # Other transforms draw from torch's CPU generator and Python's random module: both seeded per sample
            # and restored after (in the main process, drop path draws from the same generator). Seeding the CPU
            # generator alone is what torch.manual_seed does for CPU draws, at a hundredth of its cost.
            torch_state, py_state = _CPU_GENERATOR.get_state(), random.getstate()
            _CPU_GENERATOR.manual_seed(s)
            random.seed(s)
            try:
                views = self.transform(img)
            finally:
                _CPU_GENERATOR.set_state(torch_state)
                random.setstate(py_state)
        return views, self.dataset.labels[i], "\n".join(failed)


class _Collated:
    """A batch ``TrainingDataset.__getitems__`` has already collated (``TrainingDataset.collate`` unwraps it)."""

    def __init__(self, batch: list):
        self.batch = batch


def _float_like(x: torch.Tensor) -> torch.Tensor:
    # In a DataLoader worker, in shared memory as default_collate allocates it: the batch then reaches the main
    # process without another copy.
    if get_worker_info() is None:
        return torch.empty(x.shape, dtype=torch.float32)
    template = torch.empty(0, dtype=torch.float32)
    storage = template._typed_storage()._new_shared(x.numel(), device=template.device)
    return template.new(storage).resize_(x.shape)
