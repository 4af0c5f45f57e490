"""A FIFO queue of L2-normalised embeddings that checkpoints with ``state_dict``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import gather_no_grad
from ..errors import ConfigError


class FeatureQueue(nn.Module):
    """``size`` rows of ``dim``-d unit vectors, oldest overwritten first.

    Buffers: ``queue`` ``(size, dim)`` float32, ``ptr`` ``()`` int64 (next row to write).
    Initialised with random unit vectors, as in MoCo and MoBY.
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.size = size
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def check_batch(self, global_batch: int) -> None:
        """Raise early if enqueuing batches of ``global_batch`` would not tile the queue."""
        if self.size % global_batch != 0:
            raise ConfigError(
                f"method.queue_size={self.size} is not a multiple of the global batch size "
                f"{global_batch} (train.batch_size): choose a queue size such as "
                f"{max(global_batch, (self.size // global_batch) * global_batch)} or a batch size "
                "that divides the queue size."
            )

    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` ``(B, dim)`` (gathered from all ranks) over the oldest rows."""
        with torch.no_grad():  # in the body: mutation testing skips decorated functions
            keys = gather_no_grad(keys.detach()).to(self.queue.dtype)
            n = keys.shape[0]
            if self.size % n != 0:
                self.check_batch(n)
            # Rows ptr .. ptr+n-1, computed on the device: no host synchronisation.
            rows = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
            # Non-finite keys (a diverging step, skipped by the trainer) must not poison the negatives.
            keys = torch.where(torch.isfinite(keys).all(), keys, self.queue[rows])
            self.queue.index_copy_(0, rows, keys)
            self.ptr.add_(n).remainder_(self.size)
