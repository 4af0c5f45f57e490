"""MoCo v3's symmetric contrastive loss: in-batch keys gathered from every rank, scaled by 2T."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as D


def batch_contrastive(query: torch.Tensor, key: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo v3's ``contrastive_loss``: ``2T * CE(q @ k_all^T / T, labels)``, and the logits' similarities.

    ``query`` ``(B, D)`` and ``key`` ``(B, D)`` (no gradient) are L2-normalised here; ``k_all`` ``(world * B, D)``
    is every rank's keys in rank order, so the positive of local query ``i`` is global key ``B * rank + i``. The
    gradient flows through this rank's queries only. Returns ``(loss, similarities (B, world * B))``.
    """
    q = F.normalize(query, dim=1)
    k = D.gather_no_grad(F.normalize(key.detach(), dim=1))
    sim = q @ k.t()
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * D.rank()
    return F.cross_entropy(sim / temperature, labels) * (2 * temperature), sim


def contrastive_stats(sim_1: torch.Tensor, sim_2: torch.Tensor, queries: torch.Tensor) -> dict[str, torch.Tensor]:
    """What to log of a symmetric in-batch contrastive loss: ``pos_sim`` (query to its own key), ``neg_sim`` (mean
    cosine to the other keys; 0 without any) and ``feature_std`` (spread of the normalised ``queries`` ``(B, D)``:
    about 1 when healthy, 0 when collapsed). ``sim_*``: ``(B, world * B)`` similarities of ``batch_contrastive``."""
    with torch.no_grad():  # in the body: mutation testing skips decorated functions
        n = sim_1.shape[0]
        own_key = (torch.arange(n, device=sim_1.device) + n * D.rank())[:, None]  # the positives' columns
        # Sums and gathers, not boolean-mask indexing, which reads the mask's size back from the device.
        positives = [sim.gather(1, own_key) for sim in (sim_1, sim_2)]
        pos_sim = 0.5 * (positives[0].mean() + positives[1].mean())
        negatives = sim_1.numel() - n
        neg_sim = (0.5 * sum((sim.sum() - pos.sum()) / negatives for sim, pos in zip((sim_1, sim_2), positives))
                   if negatives > 0 else torch.zeros((), dtype=sim_1.dtype, device=sim_1.device))
        unit = F.normalize(queries.detach(), dim=1)
        feature_std = unit.std(0).mean() * unit.shape[1] ** 0.5
        return {"pos_sim": pos_sim, "neg_sim": neg_sim, "feature_std": feature_std}


class MoCoV3Loss(nn.Module):
    """``ctr(q1, k2) + ctr(q2, k1)``: each view's predictions against the other view's momentum keys.

    Computed in float32 whatever the autocast dtype (the dtype of the inputs if higher, e.g. float64 in tests).
    Also returns, for monitoring, ``contrastive_stats``: ``pos_sim``, ``neg_sim`` and ``feature_std``.
    """

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        self.temperature = temperature

    def forward(self, q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor) -> dict[str, torch.Tensor]:
        """All ``(B, D)``: ``q`` the predictions of the two views, ``k`` the momentum keys (no gradient)."""
        with torch.autocast(device_type=q1.device.type, enabled=False):
            dtype = torch.promote_types(q1.dtype, torch.float32)
            q1, q2, k1, k2 = (x.to(dtype) for x in (q1, q2, k1, k2))
            loss_1, sim_1 = batch_contrastive(q1, k2, self.temperature)
            loss_2, sim_2 = batch_contrastive(q2, k1, self.temperature)
            return {"loss": loss_1 + loss_2, **contrastive_stats(sim_1, sim_2, q1)}
