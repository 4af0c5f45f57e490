"""Momentum (EMA) target networks."""

from __future__ import annotations

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
    """``target = momentum * target + (1 - momentum) * online`` over parameters, in foreach ops.

    ``apply`` may be a 0-d bool tensor: the update then becomes a no-op where it is False, decided on
    the device without a host synchronisation. (Not through ``_foreach_lerp_``: it has no tensor-weight
    overload, and a 0-d tensor passed as its weight is read back to the host as a Python number.)
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
        step = torch._foreach_sub(o_params, t_params)
        torch._foreach_mul_(step, weight)  # the Tensor overload: the weight stays on the device
        torch._foreach_add_(t_params, step)
