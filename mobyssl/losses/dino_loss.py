"""DINO's self-distillation loss and EsViT's view + region version, with their centring buffers."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import mean_across_ranks


class DenseOutputs(NamedTuple):
    """What one branch (student or teacher) of EsViT hands to :class:`EsViTLoss`.

    Crops are concatenated crop-major everywhere; inside crop ``c`` the row of token ``t`` of image ``b`` is
    ``b * n_tokens[c] + t``.

    Fields:
        view: ``(crops * B, K)`` head outputs of each crop's pooled feature (row ``crop * B + b``).
        region: ``(B * sum(n_tokens), K)`` dense-head outputs of every token.
        tokens: ``(B * sum(n_tokens), C)`` backbone token features, used only to match student to teacher tokens.
        n_tokens: the token count of each crop (the teacher has the 2 global crops, the student all of them).
    """

    view: torch.Tensor
    region: torch.Tensor
    tokens: torch.Tensor
    n_tokens: Sequence[int]


def _pairs(n_crops: int) -> list[tuple[int, int]]:
    """(teacher crop, student crop) pairs: each global crop's target for every other crop, ``2 * n_crops - 2``."""
    return [(iq, v) for iq in range(2) for v in range(n_crops) if v != iq]


def _cross_entropy(target: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    """``sum_k -target * log_prob`` over the last dimension."""
    return -(target * log_prob).sum(dim=-1)


class _CentredDistillation(nn.Module):
    """The part DINO and EsViT share: the teacher centres and their momentum update.

    Each centre is a ``(1, K)`` buffer, zeros at init, moved after the loss (in training mode only) towards the
    mean of the raw teacher outputs over the global batch: ``c = m * c + (1 - m) * mean``. Under gradient
    accumulation (``defer_updates``), the row sums of each micro-batch are collected and ``flush()`` applies one
    update with the mean over all of them, as one batch of the same size would.
    """

    def __init__(self, out_dim: int, n_crops: int, student_temp: float, center_momentum: float,
                 centers: tuple[str, ...]):
        super().__init__()
        if n_crops < 2:
            raise ValueError(f"n_crops counts the 2 global crops and any local ones: expected >= 2, got {n_crops}")
        self.out_dim = out_dim
        self.n_crops = n_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self._center_names = centers
        for name in centers:
            self.register_buffer(name, torch.zeros(1, out_dim))
        self.defer_updates = False
        self._pending: list[dict[str, tuple[torch.Tensor, int]]] = []

    def _check_dim(self, what: str, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.out_dim:
            raise ValueError(f"{what}: expected shape (rows, out_dim={self.out_dim}), got {tuple(x.shape)}")

    def _batch_size(self, student_view: torch.Tensor, teacher_view: torch.Tensor) -> int:
        """B, after checking the view outputs: ``(n_crops * B, K)`` for the student, ``(2 * B, K)`` for the teacher."""
        self._check_dim("student view outputs", student_view)
        self._check_dim("teacher view outputs", teacher_view)
        rows = student_view.shape[0]
        if rows == 0 or rows % self.n_crops != 0:
            raise ValueError(f"student view outputs: expected n_crops * B rows with n_crops={self.n_crops}, "
                             f"got {rows} rows")
        batch = rows // self.n_crops
        if teacher_view.shape[0] != 2 * batch:
            raise ValueError(f"teacher view outputs: expected 2 * B = {2 * batch} rows (the 2 global crops of the "
                             f"B={batch} images of the student's {rows} rows), got {teacher_view.shape[0]}")
        return batch

    def _targets(self, teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Log of the centred, sharpened teacher distribution (log, so that entropies stay finite)."""
        return F.log_softmax((teacher.detach() - center) / teacher_temp, dim=-1)

    def _view_terms(self, student: torch.Tensor, log_t: torch.Tensor) -> dict[str, torch.Tensor]:
        """DINO's loss over the pairs and its monitoring values.

        Args:
            student: ``(n_crops * B, K)`` raw student outputs; log_t: ``(2 * B, K)`` log teacher targets.
        """
        log_s = F.log_softmax(student / self.student_temp, dim=-1).chunk(self.n_crops)
        t = log_t.exp()
        targets, log_targets = t.chunk(2), log_t.chunk(2)
        pairs = _pairs(self.n_crops)
        loss = sum(_cross_entropy(targets[iq], log_s[v]).mean() for iq, v in pairs) / len(pairs)
        with torch.no_grad():
            # Together they tell DINO's collapse modes apart: KL -> 0 in both, the entropy -> log K when the
            # targets go uniform and -> 0 when one dimension dominates.
            teacher_entropy = _cross_entropy(t, log_t).mean()
            kl = sum((targets[iq] * (log_targets[iq] - log_s[v])).sum(-1).mean() for iq, v in pairs) / len(pairs)
        return {"loss": loss, "teacher_entropy": teacher_entropy, "kl_teacher_student": kl}

    def _record(self, **teacher_rows: torch.Tensor) -> None:
        """After the loss: move each named centre towards the mean of its ``(rows, K)`` raw teacher outputs."""
        if not self.training:
            return
        with torch.no_grad():  # in the body: mutation testing skips decorated functions
            sums = {name: (rows.detach().sum(dim=0, keepdim=True), rows.shape[0]) for name, rows in teacher_rows.items()}
            self._pending.append(sums)
            if not self.defer_updates:
                self.flush()

    def flush(self) -> None:
        """Apply one centre update with the mean over every row collected since the last one."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        with torch.no_grad():  # in the body: mutation testing skips decorated functions
            for name in self._center_names:
                total = sum(p[name][0] for p in pending)
                count = sum(p[name][1] for p in pending)
                center = getattr(self, name)
                # Every rank has the same number of rows, so the mean of the rank means is the global mean.
                batch_mean = mean_across_ranks(total / count)
                moved = self.center_momentum * center + (1 - self.center_momentum) * batch_mean
                # A non-finite step (skipped by the trainer) must not poison the centre for the rest of the run.
                center.copy_(torch.where(torch.isfinite(batch_mean).all(), moved, center))


class DINOLoss(_CentredDistillation):
    """DINO: cross-entropy between the centred, sharpened teacher outputs and the student's, over crop pairs.

    Each of the 2 global crops' teacher targets ``softmax((teacher - center) / teacher_temp)`` is compared with
    the student's ``log_softmax(student / student_temp)`` of every other crop; the ``2 * n_crops - 2`` pairs
    are weighted equally. The ``center`` buffer ``(1, K)`` is updated after the loss (this step uses the old
    one) with the raw teacher outputs. Computed in float32 whatever the autocast dtype (float64 if the module
    is). Also returns, for monitoring, ``teacher_entropy`` (mean entropy of the teacher targets) and
    ``kl_teacher_student`` (mean over the pairs of ``KL(target || student distribution)``).
    """

    def __init__(self, out_dim: int, n_crops: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__(out_dim, n_crops, student_temp, center_momentum, centers=("center",))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                teacher_temp: float) -> dict[str, torch.Tensor]:
        """``student_out`` ``(n_crops * B, K)`` over all crops, ``teacher_out`` ``(2 * B, K)`` over the 2 global
        crops, both crop-major (row ``crop * B + b``) raw head outputs."""
        self._batch_size(student_out, teacher_out)
        # float32: a softmax over 65536 outputs sharpened by 0.04 loses too much in bf16/fp16.
        with torch.autocast(device_type=student_out.device.type, enabled=False):
            dtype = self.center.dtype  # float32 (float64 in the tests)
            teacher = teacher_out.detach().to(dtype)
            out = self._view_terms(student_out.to(dtype), self._targets(teacher, self.center, teacher_temp))
        self._record(center=teacher)
        return out


class EsViTLoss(_CentredDistillation):
    """EsViT: DINO's view term plus a region term between matched tokens, weighted 0.5 each.

    For each pair (teacher global crop ``iq``, student crop ``v != iq``), each student token of crop ``v`` is
    matched to the teacher token of crop ``iq`` whose backbone feature (``tokens``) is most cosine-similar (no
    gradient through the matching; several student tokens may share one teacher token). Its target is the
    teacher's dense-head distribution ``softmax((region - center_grid) / teacher_temp)`` at that token, and the
    region term is the mean over student tokens of the cross-entropy with ``log_softmax(region / student_temp)``.
    Two centres, ``center`` (view rows) and ``center_grid`` (every teacher token), updated after the loss.

    Returns ``loss`` = ``0.5 * view_loss + 0.5 * region_loss`` (each averaged over the ``2 * n_crops - 2``
    pairs), those two terms, and DINO's ``teacher_entropy`` and ``kl_teacher_student`` of the view term.
    """

    def __init__(self, out_dim: int, n_crops: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__(out_dim, n_crops, student_temp, center_momentum, centers=("center", "center_grid"))

    def _check_dense(self, what: str, x: DenseOutputs, crops: int, batch: int) -> None:
        if len(x.n_tokens) != crops:
            raise ValueError(f"{what}.n_tokens: expected one token count per crop ({crops}), got {list(x.n_tokens)}")
        rows = batch * sum(x.n_tokens)
        self._check_dim(f"{what}.region", x.region)
        for name, t in (("region", x.region), ("tokens", x.tokens)):
            if t.dim() != 2 or t.shape[0] != rows:
                raise ValueError(f"{what}.{name}: expected B * sum(n_tokens) = {batch} * {sum(x.n_tokens)} = {rows} "
                                 f"rows, got shape {tuple(t.shape)}")

    def forward(self, student: DenseOutputs, teacher: DenseOutputs, teacher_temp: float) -> dict[str, torch.Tensor]:
        """``student`` over all ``n_crops`` crops, ``teacher`` over the 2 global crops (see :class:`DenseOutputs`)."""
        batch = self._batch_size(student.view, teacher.view)
        self._check_dense("student", student, self.n_crops, batch)
        self._check_dense("teacher", teacher, 2, batch)
        if student.tokens.shape[1] != teacher.tokens.shape[1]:
            raise ValueError(f"tokens: student and teacher features differ in width ({student.tokens.shape[1]} vs "
                             f"{teacher.tokens.shape[1]})")
        with torch.autocast(device_type=student.view.device.type, enabled=False):
            dtype = self.center.dtype
            t_view, t_region = (x.detach().to(dtype) for x in (teacher.view, teacher.region))
            out = self._view_terms(student.view.to(dtype), self._targets(t_view, self.center, teacher_temp))
            region = self._region_loss(student, teacher, self._targets(t_region, self.center_grid, teacher_temp),
                                       batch)
        view = out.pop("loss")
        self._record(center=t_view, center_grid=t_region)
        return {"loss": 0.5 * view + 0.5 * region, "view_loss": view.detach(), "region_loss": region.detach(), **out}

    def _region_loss(self, student: DenseOutputs, teacher: DenseOutputs, log_t: torch.Tensor,
                     batch: int) -> torch.Tensor:
        """The region term averaged over the pairs; ``log_t`` ``(B * sum(teacher.n_tokens), K)`` log targets."""
        dtype = log_t.dtype
        log_s = F.log_softmax(student.region.to(dtype) / self.student_temp, dim=-1)
        s_split = [batch * n for n in student.n_tokens]
        t_split = [batch * n for n in teacher.n_tokens]
        log_s = log_s.split(s_split)
        targets = log_t.exp().split(t_split)
        with torch.no_grad():  # matching only picks an index: no gradient through it
            s_feat = F.normalize(student.tokens.detach().to(dtype), dim=-1).split(s_split)
            t_feat = F.normalize(teacher.tokens.detach().to(dtype), dim=-1).split(t_split)
        images = torch.arange(batch, device=log_t.device)[:, None]
        pairs = _pairs(self.n_crops)
        total = 0.0
        for iq, v in pairs:
            n_t, n_s = teacher.n_tokens[iq], student.n_tokens[v]
            with torch.no_grad():
                sim = s_feat[v].view(batch, n_s, -1) @ t_feat[iq].view(batch, n_t, -1).transpose(1, 2)  # (B, T_s, N)
                match = sim.argmax(dim=2)  # (B, T_s): the best teacher token of each student token
            target = targets[iq].view(batch, n_t, -1)[images, match]  # (B, T_s, K)
            total = total + _cross_entropy(target, log_s[v].view(batch, n_s, -1)).mean()
        return total / len(pairs)
