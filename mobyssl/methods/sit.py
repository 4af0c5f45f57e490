"""SiT (Atito, Awais and Kittler 2021), as its authors' code trains it now: group masked model learning (GMML, groups
of connected pixels corrupted and reconstructed) plus a contrastive term between the student's corrupted views and a
momentum teacher's clean ones."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn
from torchvision.utils import make_grid

from ..config import (
    ARCHITECTURE,
    Choice,
    Float,
    Int,
    MethodOptions,
    OrderedPair,
    Text,
    method_name,
    opt,
    register_method_options,
)
from ..data.gmml import KINDS, GMMLCorruption, corrupt_views
from ..data.transforms import NORMALIZATION, MultiCrop
from ..errors import BackboneError
from ..losses import SiTLoss
from ..models import ReconstructionHead, SiTHead, feature_dim, patch_sides, patch_tokens
from ..models.momentum import copy_weights
from .base import BackboneFn, contrastive_collapse_signs
from .registry import register_method
from .teacher_student import TeacherStudentMethod


@register_method_options
class SiTOptions(MethodOptions):
    """``method.*`` keys of SiT (defaults: its authors' current code, ``main.py``)."""

    name: Text = method_name("sit")
    out_dim: Int = opt(256, "Output width of the contrastive head on the class token (SiT: 256).",
                       on_resume=ARCHITECTURE, ge=1, le=65536)
    hidden_dim: Int = opt(4096, "Hidden width of the contrastive head (SiT: 4096).", on_resume=ARCHITECTURE, ge=1,
                          le=65536)
    head_layers: Int = opt(3, "Linear layers of the contrastive head (SiT: 3).", on_resume=ARCHITECTURE, ge=1, le=16)
    temperature: Float = opt(0.2, "Temperature of the contrastive term (SiT: 0.2); the term is scaled by 2 x it.",
                             gt=0, le=10)
    lmbda: Float = opt(
        1.0, "Weight of the reconstruction loss against the contrastive one (SiT: 1; its authors advise a high "
        "value, e.g. 5, on small datasets).", ge=0, le=1000)
    momentum: Float = opt(0.996, "Base EMA momentum of the teacher; rises to 1.0 on a cosine (SiT: 0.996).",
                          ge=0, lt=1)
    crop_scale: OrderedPair(gt=0, le=1) = opt([0.2, 1.0], "Area range of the 2 random crops (SiT: 0.2-1).")
    drop_perc: Float = opt(
        0.5, "Fraction of each view corrupted by the blocks of method.drop_type (SiT: 0.5; above 0.5 the fraction is "
        "drawn uniformly between 0.5 and it). 0 turns this corruption off.", ge=0, lt=1)
    drop_replace: Float = opt(
        0.3, "Fraction of a view replaced, with probability 1/2, by the same blocks of another image of the batch "
        "instead (SiT: 0.3). 0 turns it off.", ge=0, lt=1)
    drop_align: Int = opt(
        1, "Corrupted blocks start and end on multiples of this many pixels (SiT: 1; the patch size aligns them "
        "with the patches).", ge=1, le=4096)
    drop_type: Annotated[list[Choice(*KINDS)], Field(min_length=1, max_length=3)] = opt(
        ["zeros"], "What the blocks hold, one kind drawn per image: zeros (the mean colour), noise (N(0, 1)) or copy "
        "(another block of the same image) (SiT: zeros).")


@register_method
class SiT(TeacherStudentMethod):
    """Student: ViT on GMML-corrupted views -> contrastive head (class token) and reconstruction head (patch
    tokens). Teacher: an EMA of all three, on the clean views (contrastive head only).

    Loss: ``ctr(s_1, t_2) + ctr(s_2, t_1) + lmbda * L1(reconstruction, clean | corrupted pixels)``
    (:class:`~mobyssl.losses.SiTLoss`). Evaluated and exported: the teacher's backbone.
    """

    name = "sit"
    Options = SiTOptions

    def __init__(self, backbone_fn: BackboneFn, drop_path_rate: float = 0.1, teacher_drop_path_rate: float = 0.0,
                 out_dim: int = 256, hidden_dim: int = 4096, head_layers: int = 3, temperature: float = 0.2,
                 lmbda: float = 1.0, momentum: float = 0.996, corruption: GMMLCorruption | None = None,
                 normalization: tuple = NORMALIZATION["imagenet"]):
        super().__init__()
        self.base_momentum = momentum
        self.corruption = corruption or GMMLCorruption()
        self.normalization = normalization  # (mean, std) of the views, to show the pictures in their own colours
        self.student = backbone_fn(drop_path_rate)
        patch = _patch_size(self.student)
        dim = feature_dim(self.student)
        self.student_head = SiTHead(dim, out_dim, hidden_dim, head_layers)
        self.student_decoder = ReconstructionHead(dim, patch)
        self.teacher = backbone_fn(teacher_drop_path_rate)
        self.teacher_head = SiTHead(dim, out_dim, hidden_dim, head_layers)
        self.teacher_decoder = ReconstructionHead(dim, patch)  # EMA-updated like SiT's, never used
        for online, target in self.momentum_pairs():
            copy_weights(online, target)
        self.criterion = SiTLoss(temperature, lmbda)

    @classmethod
    def from_config(cls, cfg, backbone_fn: BackboneFn) -> "SiT":
        m = cfg.method
        corruption = GMMLCorruption(m.drop_perc, m.drop_replace, m.drop_align, tuple(m.drop_type))
        corruption.check(cfg.data.image_size)
        return cls(backbone_fn, cfg.model.drop_path_rate, cfg.model.target_drop_path_rate, m.out_dim, m.hidden_dim,
                   m.head_layers, m.temperature, m.lmbda, m.momentum, corruption,
                   NORMALIZATION[cfg.data.normalization])

    @staticmethod
    def crops(cfg) -> MultiCrop:
        """SiT's two views: DINO's two global crops (bicubic; blur 1.0 / 0.1, solarize 0 / 0.2 from ``data.aug``)
        over ``method.crop_scale``."""
        aug = cfg.data.aug
        return MultiCrop(global_size=cfg.data.image_size, global_scale=tuple(cfg.method.crop_scale), n_local=0,
                         global_blur_prob=tuple(aug.blur_prob), global_solarize_prob=tuple(aug.solarize_prob))

    def momentum_pairs(self):
        return [(self.student, self.teacher), (self.student_head, self.teacher_head),
                (self.student_decoder, self.teacher_decoder)]

    def trainable_modules(self):
        return [self.student, self.student_head, self.student_decoder]

    def collapse_signs(self, stats: dict[str, float]) -> str | None:
        """``feature_std`` under 0.1, or ``neg_sim`` (mean cosine similarity to the other images' teacher
        projections) over 0.9."""
        return contrastive_collapse_signs(stats, "every other one in the batch")

    def pictures(self, views: list[torch.Tensor], n: int = 15) -> dict[str, torch.Tensor]:
        """SiT's reconstruction samples: for up to ``n`` images of the first view, one row each of the clean view,
        its corrupted version, the student's reconstruction and the mask, in the images' own colours."""
        clean = views[0][:n]
        corrupted, mask = self.corruption(clean)
        reconstruction = self.student_decoder(patch_tokens(self.student, self.student.forward_features(corrupted)))
        mean, std = (torch.tensor(v, dtype=clean.dtype, device=clean.device).view(1, 3, 1, 1)
                     for v in self.normalization)
        rows = [x * std + mean for x in (clean, corrupted, reconstruction.to(clean.dtype))]
        rows.append(mask.unsqueeze(1).expand_as(clean).to(clean.dtype))
        return {"reconstruction": make_grid(torch.cat(rows).clamp(0, 1), nrow=clean.shape[0], padding=2)}

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views``: the two clean ``(B, 3, H, W)`` crops; they are corrupted here, on their device."""
        if len(views) != 2:
            raise ValueError(f"SiT takes exactly 2 views, got {len(views)}")
        corrupted, masks = corrupt_views(self.corruption, views)
        batch = views[0].shape[0]
        tokens = self.student.forward_features(torch.cat(corrupted))  # (2B, 1 + N, D) after the final norm
        student = self.student_head(tokens[:, 0])
        reconstruction = self.student_decoder(patch_tokens(self.student, tokens))
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher.forward_features(torch.cat(views))[:, 0])
        return self.criterion(list(student.split(batch)), list(teacher.split(batch)), reconstruction,
                              torch.cat(views), torch.cat(masks))


def _patch_size(backbone: nn.Module) -> int:
    """The square patch size of a ViT (SiT's decoder paints one patch per token)."""
    sides = patch_sides(backbone)
    if not sides or int(getattr(backbone, "num_prefix_tokens", 0)) != 1 or sides[0] != sides[1]:
        raise BackboneError(f"SiT needs a ViT with a class token and square patches (its contrastive head reads the "
                            f"class token, its decoder one patch per token); got {type(backbone).__name__}. Use a ViT "
                            "(model.backbone, e.g. vit_small_patch16_224).")
    return int(sides[0])
