"""DINO (Caron et al. 2021): self-distillation without labels, a student matching a momentum teacher over
multi-crop views, with a centred and sharpened teacher."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .. import distributed as D
from ..config import (
    ARCHITECTURE,
    Float,
    Int,
    MethodOptions,
    OrderedPair,
    Text,
    method_name,
    opt,
    register_method_options,
)
from ..data.transforms import MultiCrop
from ..errors import ConfigError
from ..losses import DINOLoss
from ..models import DINOHead, feature_dim, patch_sides
from ..models.momentum import copy_weights
from ..runtime import device_memory_bytes, resolve_device
from .base import BackboneFn
from .registry import register_method
from .teacher_student import TeacherStudentMethod


@register_method_options
class DINOOptions(MethodOptions):
    """``method.*`` keys of DINO (defaults: the official code's, ``main_dino.py``)."""

    name: Text = method_name("dino")
    out_dim: Int = opt(65536, "Output width of the DINO head, the number of 'prototypes' (DINO: 65536).",
                       on_resume=ARCHITECTURE, ge=2, le=2**20)
    hidden_dim: Int = opt(2048, "Hidden width of the head's MLP (DINO: 2048).", on_resume=ARCHITECTURE, ge=1,
                          le=65536)
    bottleneck_dim: Int = opt(256, "Width of the head's L2-normalised bottleneck (DINO: 256).",
                              on_resume=ARCHITECTURE, ge=1, le=65536)
    head_layers: Int = opt(3, "Linear layers of the head's MLP (DINO: 3).", on_resume=ARCHITECTURE, ge=1, le=16)
    use_bn_in_head: bool = opt(False, "BatchNorm in the head's MLP (DINO: off for ViTs).", on_resume=ARCHITECTURE)
    norm_last_layer: bool = opt(
        True, "Fix the norm of the head's last layer (DINO: on; the paper's ViT-S recipes turn it off for a few "
        "points more, at some risk of instability).", on_resume=ARCHITECTURE)
    momentum: Float = opt(
        0.996, "Base EMA momentum of the teacher; rises to 1.0 on a cosine over training (DINO: 0.996; raise it, "
        "e.g. 0.9995, for small batches).", ge=0, lt=1)
    teacher_temp: Float = opt(
        0.04, "Teacher temperature after the warm-up (DINO: 0.04; up to 0.07 for longer runs; above that training "
        "tends to collapse).", gt=0, le=10)
    warmup_teacher_temp: Float = opt(0.04, "Teacher temperature at the start of its warm-up (DINO: 0.04).", gt=0,
                                     le=10)
    warmup_teacher_temp_epochs: Int = opt(
        0, "Epochs of the linear teacher-temperature warm-up (DINO's default: 0; its 0.07 recipes: 30).", ge=0,
        le=100_000)
    student_temp: Float = opt(0.1, "Student temperature (DINO: 0.1).", gt=0, le=10)
    center_momentum: Float = opt(0.9, "EMA momentum of the teacher's centre (DINO: 0.9).", ge=0, lt=1)
    freeze_last_layer: Int = opt(
        1, "Epochs during which the head's last layer is not trained (DINO: 1); raise it if the loss is unstable "
        "early.", ge=0, le=100_000)
    global_crop_scale: OrderedPair(gt=0, le=1) = opt(
        [0.4, 1.0], "Area range of the 2 global crops (data.image_size px; DINO: 0.4-1).")
    local_crops_number: Int = opt(
        8, "Local crops per image (DINO: 8; 0 trains on the 2 global crops only).", ge=0, le=64)
    local_crop_size: Int = opt(96, "Side of the local crops in pixels (DINO: 96 for 224 px images).",
                               ge=8, le=8192)
    local_crop_scale: OrderedPair(gt=0, le=1) = opt(
        [0.05, 0.4], "Area range of the local crops (DINO: 0.05-0.4).")
    local_blur_prob: Float = opt(
        0.5, "Gaussian blur probability of each local crop (DINO: 0.5; the 2 global crops take data.aug.blur_prob, "
        "DINO: 1.0 and 0.1, and data.aug.solarize_prob, DINO: 0 and 0.2). Small images want 0: a blur of up to "
        "data.aug.blur_sigma px erases a 16 px crop.", ge=0, le=1)


def teacher_temperatures(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear ``warmup_temp -> temp`` over ``warmup_epochs`` (both ends
    included, so ``temp`` is reached in epoch ``warmup_epochs - 1``), then ``temp``."""
    warm = np.linspace(warmup_temp, temp, warmup_epochs)
    return np.concatenate([warm, np.full(max(epochs - warmup_epochs, 0), temp)])


def size_groups(views: list[torch.Tensor]) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of consecutive views of the same size (each range goes through a backbone in one
    pass)."""
    groups, start = [], 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        groups.append((start, end))
        start = end
    return groups


def forward_by_size(backbone: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Backbone features of every view, crop-major (row ``crop * B + b``); consecutive views of the same size go
    through the backbone together, in one pass."""
    return torch.cat([backbone(torch.cat(views[start:end])) for start, end in size_groups(views)])


def head_memory_bytes(out_dim: int, bottleneck_dim: int, heads_per_branch: int, images: int, n_crops: int) -> int:
    """A lower bound on the memory that the width of the heads' last layers costs in training, in bytes.

    The last layers (``bottleneck_dim x out_dim`` floats each, with their weight-norm gains): the student's
    weights, gradients and AdamW's two moments and the teacher's weights, 5 float32 copies. The outputs: for
    ``images`` on one device, the student's logits of every crop and the teacher's of the 2 global crops, each
    also as probabilities and gradients (3 copies).
    """
    weights = 5 * out_dim * (bottleneck_dim + 1)
    outputs = 3 * images * (n_crops + 2) * out_dim
    return 4 * heads_per_branch * (weights + outputs)


@register_method
class DINO(TeacherStudentMethod):
    """Student: backbone -> DINO head, on every crop. Teacher: an EMA of both, on the 2 global crops.

    Loss: cross-entropy between the teacher's centred, sharpened output for one global crop and the student's
    output for every other crop. Evaluated and exported: the teacher's backbone (as DINO's own scripts do).
    """

    name = "dino"
    Options = DINOOptions
    criterion_class = DINOLoss
    heads_per_branch = 1  # DINO heads on the student (and as many on the teacher)

    def __init__(self, backbone_fn: BackboneFn, drop_path_rate: float = 0.1, teacher_drop_path_rate: float = 0.0,
                 out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256, head_layers: int = 3,
                 use_bn_in_head: bool = False, norm_last_layer: bool = True, momentum: float = 0.996,
                 teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 0,
                 student_temp: float = 0.1, center_momentum: float = 0.9, freeze_last_layer: int = 1,
                 n_crops: int = 10):
        super().__init__()
        self.base_momentum = momentum
        self.temps = (warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        self.freeze_last_layer = freeze_last_layer
        self.n_crops = n_crops
        self.student = backbone_fn(drop_path_rate, multi_size=n_crops > 2)
        self.norm_last_layer = norm_last_layer
        self.head_args = dict(in_dim=feature_dim(self.student), out_dim=out_dim, hidden_dim=hidden_dim,
                              bottleneck_dim=bottleneck_dim, n_layers=head_layers, use_bn=use_bn_in_head)
        self.student_head = DINOHead(norm_last_layer=norm_last_layer, **self.head_args)
        self.teacher = backbone_fn(teacher_drop_path_rate, multi_size=n_crops > 2)
        self.teacher_head = DINOHead(**self.head_args)  # the teacher's last layer is always norm-fixed, as DINO's
        copy_weights(self.student, self.teacher)
        copy_weights(self.student_head, self.teacher_head)
        self.criterion = self.criterion_class(out_dim, n_crops, student_temp, center_momentum)
        # Set per step by on_step_start (a tensor, so a compiled forward does not recompile when it changes).
        first = warmup_teacher_temp if warmup_teacher_temp_epochs > 0 else teacher_temp
        self.register_buffer("teacher_temp", torch.tensor(first), persistent=False)

    @classmethod
    def from_config(cls, cfg, backbone_fn: BackboneFn) -> "DINO":
        m = cfg.method
        if m.warmup_teacher_temp_epochs > cfg.train.epochs:
            raise ConfigError(f"method.warmup_teacher_temp_epochs={m.warmup_teacher_temp_epochs} is longer than "
                              f"train.epochs={cfg.train.epochs}; lower it.")
        cls._check_head_fits(cfg)
        method = cls(backbone_fn, cfg.model.drop_path_rate, cfg.model.target_drop_path_rate, m.out_dim,
                     m.hidden_dim, m.bottleneck_dim, m.head_layers, m.use_bn_in_head, m.norm_last_layer, m.momentum,
                     m.teacher_temp, m.warmup_teacher_temp, m.warmup_teacher_temp_epochs, m.student_temp,
                     m.center_momentum, m.freeze_last_layer, 2 + m.local_crops_number)
        sides = patch_sides(method.student)
        step = math.lcm(*sides) if sides else 0  # a square crop must tile into patches along both sides
        if m.local_crops_number and step and m.local_crop_size % step:
            lower, upper = max(m.local_crop_size // step, 1) * step, -(-m.local_crop_size // step) * step
            patch = sides[0] if len(set(sides)) == 1 else "x".join(map(str, sides))
            raise ConfigError(f"method.local_crop_size={m.local_crop_size} is not a multiple of the patch size {patch} "
                              f"of backbone '{cfg.model.backbone}' (model.backbone): the local crops would not tile "
                              f"into patches. Use method.local_crop_size={lower}" + (f" or {upper}." if upper != lower
                                                                                     else "."))
        return method

    @classmethod
    def _check_head_fits(cls, cfg) -> None:
        """Refuse, before anything is allocated, an ``out_dim`` whose heads cannot fit in the device's memory."""
        m = cfg.method
        device = resolve_device(cfg.train.device)
        total = device_memory_bytes(device)
        images = -(-cfg.train.batch_size // (D.world_size() * cfg.train.accum_steps))
        need = head_memory_bytes(m.out_dim, m.bottleneck_dim, cls.heads_per_branch, images, 2 + m.local_crops_number)
        if total is not None and need > total:
            gib, where = 2.0 ** 30, "this machine's RAM" if device.type == "cpu" else str(device)
            raise ConfigError(
                f"method.out_dim={m.out_dim} (with method.bottleneck_dim={m.bottleneck_dim}): the {cls.name} heads' "
                f"last layers and their outputs alone need at least {need / gib:.1f} GiB in training, more than the "
                f"{total / gib:.1f} GiB of {where}. Lower method.out_dim (DINO: 65536; a few thousand suit small "
                "datasets), method.bottleneck_dim or train.batch_size.")

    @staticmethod
    def crops(cfg) -> MultiCrop:
        """The crops of ``cfg``: sizes, scales and the local blur from ``method.*``; the global crops' blur and
        solarize probabilities from ``data.aug`` (DINO's two global crops are MoBY's two views)."""
        m, aug = cfg.method, cfg.data.aug
        return MultiCrop(global_size=cfg.data.image_size, global_scale=tuple(m.global_crop_scale),
                         n_local=m.local_crops_number, local_size=m.local_crop_size,
                         local_scale=tuple(m.local_crop_scale), global_blur_prob=tuple(aug.blur_prob),
                         global_solarize_prob=tuple(aug.solarize_prob), local_blur_prob=m.local_blur_prob)

    def momentum_pairs(self):
        return [(self.student, self.teacher), (self.student_head, self.teacher_head)]

    def trainable_modules(self):
        return [self.student, self.student_head]

    def on_step_start(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        warmup_temp, temp, warmup_epochs = self.temps
        epochs = max(total_steps // max(steps_per_epoch, 1), 1)
        temps = teacher_temperatures(warmup_temp, temp, warmup_epochs, epochs)
        self.teacher_temp.fill_(float(temps[min(step // max(steps_per_epoch, 1), len(temps) - 1)]))

    def collapse_signs(self, stats: dict[str, float]) -> str | None:
        """DINO's two collapse modes (as its paper studies them): the student reproduces the teacher exactly
        (``kl_teacher_student`` near 0) while the teacher's targets are uniform (entropy near log K) or all on one
        dimension (entropy near 0)."""
        kl, entropy = stats.get("kl_teacher_student"), stats.get("teacher_entropy")
        if kl is None or entropy is None or kl >= 0.01:
            return None
        log_k = math.log(self.criterion.out_dim)
        kind = ("uniform targets" if entropy > 0.9 * log_k else "one dimension dominates" if entropy < 0.1 * log_k
                else "the student copies the teacher")
        return (f"kl_teacher_student {kl:.4f} < 0.01 with teacher_entropy {entropy:.3f} (log K = {log_k:.2f}): "
                f"{kind}; raise method.teacher_temp's warm-up or lower the lr")

    def student_heads(self) -> list[nn.Module]:
        """The heads whose last layer ``freeze_last_layer`` holds still."""
        return [self.student_head]

    def on_after_backward(self, epoch: int) -> None:
        if epoch < self.freeze_last_layer:
            for head in self.student_heads():
                for name, p in head.named_parameters():
                    if "last_layer" in name:
                        p.grad = None

    def _check_views(self, views: list[torch.Tensor]) -> None:
        if len(views) != self.n_crops:
            raise ValueError(f"{type(self).__name__} was built for {self.n_crops} crops (2 global + "
                             f"method.local_crops_number), got {len(views)} views")

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views``: the 2 global crops, then the local crops, each ``(B, 3, H_i, W_i)``."""
        self._check_views(views)
        student_out = self.student_head(forward_by_size(self.student, views))
        with torch.no_grad():
            teacher_out = self.teacher_head(forward_by_size(self.teacher, views[:2]))
        return self.criterion(student_out, teacher_out, self.teacher_temp)
