"""MoBY's symmetric contrastive loss with one negative queue per view."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .queue import FeatureQueue


def info_nce(query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with one positive per query and shared negatives.

    Args:
        query: ``(B, D)`` unit vectors (online predictions).
        key: ``(B, D)`` unit vectors (target projections), the positive of each query.
        negatives: ``(K, D)`` unit vectors.
    Returns:
        Mean over the batch of ``-log softmax([q.k, q.n_1, ..., q.n_K] / T)[0]``.
    """
    return _info_nce(query, key, query @ negatives.t(), temperature)


def _info_nce(query: torch.Tensor, key: torch.Tensor, neg_sim: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE given the ``(B, K)`` similarities to the negatives."""
    pos = (query * key).sum(dim=1, keepdim=True)
    logits = torch.cat([pos, neg_sim], dim=1) / temperature
    labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, labels)


class MoBYLoss(nn.Module):
    """``InfoNCE(pred_1, target_2, queue_2) + InfoNCE(pred_2, target_1, queue_1)``.

    Owns the two queues (``queue_1`` holds view-1 target projections, ``queue_2`` view-2's); in
    training mode both are updated after the loss is computed. Inputs are normalised here and the
    loss is computed in float32 whatever the autocast dtype. Also returns, for monitoring, ``pos_sim``
    (prediction-target cosine), ``neg_sim`` (mean cosine to the queue) and ``feature_std``.
    """

    def __init__(self, dim: int = 256, queue_size: int = 4096, temperature: float = 0.2):
        super().__init__()
        self.temperature = temperature
        self.queue_1 = FeatureQueue(dim, queue_size)
        self.queue_2 = FeatureQueue(dim, queue_size)
        # Gradient accumulation: keys of each micro-batch wait here until the optimizer step.
        self.defer_updates = False
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def flush(self) -> None:
        """Enqueue the keys collected while ``defer_updates`` was set (one optimizer step's worth)."""
        if self._pending:
            k1, k2 = (torch.cat(ks) for ks in zip(*self._pending))
            self._pending = []
            self.queue_1.enqueue(k1)
            self.queue_2.enqueue(k2)

    def check_batch(self, global_batch: int) -> None:
        self.queue_1.check_batch(global_batch)

    def forward(self, pred_1: torch.Tensor, pred_2: torch.Tensor,
                target_1: torch.Tensor, target_2: torch.Tensor) -> dict[str, torch.Tensor]:
        """All inputs ``(B, D)``; targets carry no gradient. Returns ``loss`` and similarity logs."""
        # float32 whatever the autocast dtype: the similarities to 4096 queue entries at T = 0.2 lose too much
        # in bf16/fp16 (autocast would otherwise run the matmuls below in reduced precision).
        with torch.autocast(device_type=pred_1.device.type, enabled=False):
            return self._loss(pred_1, pred_2, target_1, target_2)

    def _loss(self, pred_1, pred_2, target_1, target_2) -> dict[str, torch.Tensor]:
        dtype = self.queue_1.queue.dtype  # float32 (float64 in the golden tests)
        q1, q2 = (F.normalize(p.to(dtype), dim=1) for p in (pred_1, pred_2))
        k1, k2 = (F.normalize(t.detach().to(dtype), dim=1) for t in (target_1, target_2))
        # Clones: the queues are overwritten below, before the backward pass needs them.
        neg_1 = q1 @ self.queue_2.queue.clone().t()
        neg_2 = q2 @ self.queue_1.queue.clone().t()
        loss = _info_nce(q1, k2, neg_1, self.temperature) + _info_nce(q2, k1, neg_2, self.temperature)
        with torch.no_grad():
            pos_sim = 0.5 * ((q1 * k2).sum(1).mean() + (q2 * k1).sum(1).mean())
            neg_sim = 0.5 * (neg_1.mean() + neg_2.mean())
            # std over the batch of unit vectors, x sqrt(dim): ~1 when spread out, 0 when collapsed
            feature_std = q1.std(0).mean() * q1.shape[1] ** 0.5
        if self.training:
            if self.defer_updates:
                self._pending.append((k1, k2))
            else:
                self.queue_1.enqueue(k1)
                self.queue_2.enqueue(k2)
        return {"loss": loss, "pos_sim": pos_sim, "neg_sim": neg_sim, "feature_std": feature_std}
