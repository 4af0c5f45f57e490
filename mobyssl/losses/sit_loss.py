"""SiT's loss: MoCo v3's contrastive term between the student's corrupted and the teacher's clean views, plus the
L1 reconstruction error of the corrupted pixels."""

from __future__ import annotations

import torch
from torch import nn

from .mocov3_loss import batch_contrastive, contrastive_stats


def masked_l1(reconstruction: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SiT's reconstruction loss: the mean of ``|reconstruction - clean|`` over every masked element of the batch
    (all channels, all views together: bigger masks weigh more, as in SiT). ``reconstruction``, ``clean``:
    ``(N, C, H, W)``; ``mask``: ``(N, H, W)`` bool, shared by the channels. 0 (with a gradient path) when nothing
    is masked."""
    weights = mask.unsqueeze(1).expand_as(clean).to(reconstruction.dtype)
    total = ((reconstruction - clean).abs() * weights).sum()
    return total / weights.sum().clamp_min(1.0)


class SiTLoss(nn.Module):
    """``ctr(s_1, t_2) + ctr(s_2, t_1) + lmbda * masked_l1``, ``ctr`` being MoCo v3's 2T-scaled InfoNCE.

    Computed in float32 whatever the autocast dtype (the inputs' dtype if higher). Returns ``loss`` and, to log,
    ``contrastive``, ``reconstruction``, ``pos_sim``, ``neg_sim`` and ``feature_std`` (spread of the student's
    normalised projections: about 1 when healthy, 0 when collapsed).
    """

    def __init__(self, temperature: float = 0.2, lmbda: float = 1.0):
        super().__init__()
        self.temperature, self.lmbda = temperature, lmbda

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor], reconstruction: torch.Tensor,
                clean: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``student``, ``teacher``: the projections of the 2 views, each ``(B, D)`` (the teacher's without
        gradient); ``reconstruction`` and ``clean`` ``(2B, C, H, W)`` and ``mask`` ``(2B, H, W)``, views stacked
        in the same order."""
        with torch.autocast(device_type=clean.device.type, enabled=False):
            dtype = torch.promote_types(student[0].dtype, torch.float32)
            s1, s2, t1, t2 = (x.to(dtype) for x in (*student, *teacher))
            loss_1, sim_1 = batch_contrastive(s1, t2, self.temperature)
            loss_2, sim_2 = batch_contrastive(s2, t1, self.temperature)
            contrastive = loss_1 + loss_2
            reconstruction_loss = masked_l1(reconstruction.to(dtype), clean.to(dtype), mask)
            return {"loss": contrastive + self.lmbda * reconstruction_loss, "contrastive": contrastive.detach(),
                    "reconstruction": reconstruction_loss.detach(), **contrastive_stats(sim_1, sim_2, s1)}
