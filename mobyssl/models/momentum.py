"""Momentum (EMA) target networks."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """``1 - (1 - base) * (cos(pi * step / total_steps) + 1) / 2``: ``base`` at step 0, 1.0 at the end."""
    if total_steps <= 0:
        return base
    step = min(step, total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0


def copy_weights(online: nn.Module, target: nn.Module) -> None:
    """Initialise ``target`` from ``online`` and freeze it; buffers (BN stats) are copied too."""
    target.load_state_dict(online.state_dict())
    for p in target.parameters():
        p.requires_grad_(False)


def ema_update(online: nn.Module, target: nn.Module, momentum: float, apply: torch.Tensor | bool = True) -> None:
    """``target = momentum * target + (1 - momentum) * online`` over parameters, in one foreach op.

    ``apply`` may be a 0-d bool tensor: the update then becomes a no-op where it is False, decided on
    the device without a host synchronisation.
    """
    with torch.no_grad():  # in the body: mutation testing skips decorated functions
        t_params = [p for p in target.parameters()]
        o_params = [p.detach() for p in online.parameters()]
        if len(t_params) != len(o_params):
            raise ValueError("online and target networks have different parameter lists")
        if isinstance(apply, bool):
            if apply:
                torch._foreach_lerp_(t_params, o_params, 1.0 - momentum)
            return
        weight = apply.to(t_params[0].dtype) * (1.0 - momentum)
        if lerp_takes_a_tensor_weight():
            torch._foreach_lerp_(t_params, o_params, weight)
        else:
            diff = torch._foreach_sub(o_params, t_params)
            torch._foreach_mul_(diff, weight)
            torch._foreach_add_(t_params, diff)


@functools.cache
def lerp_takes_a_tensor_weight() -> bool:
    """Whether this PyTorch has ``_foreach_lerp_`` with a tensor weight (asked once, not by catching errors of
    the real update, which would hide a wrong call behind the fallback)."""
    try:
        torch._foreach_lerp_([torch.zeros(1)], [torch.ones(1)], torch.tensor(0.5))
    except (TypeError, RuntimeError):
        return False
    return True
