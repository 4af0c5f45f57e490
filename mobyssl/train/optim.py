"""Optimizer parameter groups and per-iteration schedules (precomputed, DINO style)."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn


def param_groups(modules: list[nn.Module], weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Two groups: weights with decay; biases and every 1-D parameter (norms, scales) without (with ``decay_all``
    every parameter is in the first group and the second is empty). Frozen parameters are left out."""
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if not decay_all and (p.ndim <= 1 or name.endswith(".bias")) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                  warmup_start: float = 0.0, warmup_ends_at_peak: bool = False) -> np.ndarray:
    """Per-step values: linear ``warmup_start -> base`` over ``warmup_steps``, then cosine ``base -> final``
    (``final`` itself is not reached). The last warm-up step takes ``base`` itself with ``warmup_ends_at_peak``
    (DINO's ``np.linspace`` with its endpoint, so the peak comes twice), one step below it otherwise (timm's and
    MoCo v3's ``base * step / warmup_steps``)."""
    warmup_steps = min(warmup_steps, total_steps)
    warm = (np.linspace(warmup_start, base, warmup_steps, endpoint=warmup_ends_at_peak) if warmup_steps
            else np.array([]))
    n = total_steps - warmup_steps
    t = np.arange(n)
    cos = final + 0.5 * (base - final) * (1 + np.cos(math.pi * t / max(n, 1)))
    return np.concatenate([warm, cos])


def build_adamw(modules: list[nn.Module], lr: float, weight_decay: float, betas, device: torch.device,
                decay_all: bool = False):
    """AdamW, fused where PyTorch has a fused kernel (CUDA; CPU from 2.4): one kernel per step, and a
    non-finite step is skipped on the device (GradScaler's ``found_inf``) without a host synchronisation."""
    fused = {"fused": True} if fused_adamw_on(torch.device(device).type) else {}
    return torch.optim.AdamW(param_groups(modules, weight_decay, decay_all), lr=lr, betas=tuple(betas), **fused)


@functools.cache
def fused_adamw_on(device_type: str) -> bool:
    """Whether this PyTorch has a fused AdamW for ``device_type`` (asked once on a probe tensor, rather than by
    catching errors of the real construction, which would hide a wrong call behind the fallback)."""
    try:
        torch.optim.AdamW([torch.zeros(1, device=device_type, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def clip_each_gradient_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale each parameter's gradient on its own to a norm of at most ``max_norm`` (DINO's clipping: a gradient
    of norm n is multiplied by ``max_norm / (n + 1e-6)`` when that is below 1). Returns the norm of all the
    gradients before clipping (for the non-finite check), on the device, without a host synchronisation."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    if math.isfinite(max_norm):
        coefs = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(grads, coefs)
    return torch.linalg.vector_norm(torch.stack(norms))
