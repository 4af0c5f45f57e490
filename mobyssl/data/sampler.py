"""A resumable, rank-aware sampler whose global batches do not depend on the number of processes."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[int]):
    """Yields this rank's share of each global batch of a seeded per-epoch permutation.

    Epoch ``e`` shuffles all indices with seed ``(seed, e)`` and cuts them into global batches of
    ``batch_size * world_size`` (the remainder is dropped); rank ``r`` takes slice ``r`` of each. So the
    global batch at every step is the same with 1 process of batch B or N processes of batch B / N, and
    ``set_epoch(e, start_step)`` resumes mid-epoch exactly where a run stopped. With ``yield_epoch`` it
    yields ``(epoch, index)`` keys, for datasets that seed each sample's augmentation.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 yield_epoch: bool = False):
        self.num_samples, self.batch_size, self.yield_epoch = num_samples, batch_size, yield_epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = num_samples // self.global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)[: self.steps_per_epoch * self.global_batch]
        batches = order.view(self.steps_per_epoch, self.world_size, self.batch_size)[self.start_step:, self.rank]
        indices = batches.reshape(-1).tolist()
        return iter([(self.epoch, i) for i in indices] if self.yield_epoch else indices)
