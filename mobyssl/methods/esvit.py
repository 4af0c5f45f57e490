"""EsViT (Li et al. 2021): DINO's view-level self-distillation plus a region-level term between matched tokens,
for multi-stage backbones (Swin) as well as ViTs."""

from __future__ import annotations

import torch
from torch import nn

from ..config import Text, method_name, register_method_options
from ..losses import DenseOutputs, EsViTLoss
from ..models import DINOHead, patch_tokens, tokens_and_pooled
from ..models.momentum import copy_weights
from .dino import DINO, DINOOptions, size_groups
from .registry import register_method


@register_method_options
class EsViTOptions(DINOOptions):
    """``method.*`` keys of EsViT: DINO's, with the official ``main_esvit.py`` defaults (which are DINO's). Its
    Swin-T recipe changes some (``esvit_swin_tiny_in1k``)."""

    name: Text = method_name("esvit")


def dense_forward_by_size(backbone: nn.Module, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Pooled features and patch tokens of every view, one backbone pass per run of same-size views.

    Returns ``pooled`` ``(crops * B, C)`` crop-major, ``tokens`` ``(B * sum(n_tokens), C)`` (crop after crop; in
    crop ``c`` the row of token ``t`` of image ``b`` is ``b * n_tokens[c] + t``, tokens in raster order) and
    ``n_tokens``, the token count of each crop.
    """
    pooled, tokens, n_tokens = [], [], []
    for start, end in size_groups(views):
        features, pool = tokens_and_pooled(backbone, torch.cat(views[start:end]))
        grid = patch_tokens(backbone, features)  # (G * B, N, C), crop-major
        pooled.append(pool)
        tokens.append(grid.flatten(0, 1))
        n_tokens += [grid.shape[1]] * (end - start)
    return torch.cat(pooled), torch.cat(tokens), n_tokens


@register_method
class EsViT(DINO):
    """DINO's student and teacher with a second, dense head on every patch token.

    View term: DINO's loss on the pooled feature (Swin: the mean of the final tokens; ViT: the class token).
    Region term: each student token is matched to the teacher token of the other view whose backbone feature is
    most similar, and learns that token's dense-head distribution. Loss ``0.5 * view + 0.5 * region``
    (:class:`~mobyssl.losses.EsViTLoss`). Evaluated and exported: the teacher's backbone.
    """

    name = "esvit"
    Options = EsViTOptions
    criterion_class = EsViTLoss
    heads_per_branch = 2  # the view head and the dense head

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Two independent heads per branch (the official code's ``head`` and ``head_dense``), same shape and options.
        self.student_dense_head = DINOHead(norm_last_layer=self.norm_last_layer, **self.head_args)
        self.teacher_dense_head = DINOHead(**self.head_args)
        copy_weights(self.student_dense_head, self.teacher_dense_head)

    def student_heads(self) -> list[nn.Module]:
        return [self.student_head, self.student_dense_head]

    def momentum_pairs(self):
        return super().momentum_pairs() + [(self.student_dense_head, self.teacher_dense_head)]

    def trainable_modules(self):
        return super().trainable_modules() + [self.student_dense_head]

    @staticmethod
    def _outputs(backbone: nn.Module, head: nn.Module, dense_head: nn.Module, views: list[torch.Tensor]) -> DenseOutputs:
        pooled, tokens, n_tokens = dense_forward_by_size(backbone, views)
        return DenseOutputs(head(pooled), dense_head(tokens), tokens, n_tokens)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views``: the 2 global crops, then the local crops, each ``(B, 3, H_i, W_i)``."""
        self._check_views(views)
        student = self._outputs(self.student, self.student_head, self.student_dense_head, views)
        with torch.no_grad():
            teacher = self._outputs(self.teacher, self.teacher_head, self.teacher_dense_head, views[:2])
        return self.criterion(student, teacher, self.teacher_temp)
