"""The contract between a self-supervised method and the trainer."""

from __future__ import annotations

import contextlib
from typing import Callable, ClassVar

import torch
from torch import nn

from ..models.momentum import cosine_momentum, ema_update

# Builds a fresh backbone for a given drop-path rate; the trainer binds name, image size, etc.
BackboneFn = Callable[[float], nn.Module]


class Method(nn.Module):
    """A self-supervised method: owns its backbone(s), heads, buffers (queues, centres) and momentum pairs.

    The trainer calls, per step::

        out = method(views)          # views: list of (B, 3, H_i, W_i) tensors, any number and size
        out["loss"].backward(); optimizer.step()
        method.on_step_end(global_step, total_steps)   # momentum updates etc.

    ``forward`` returns a dict holding ``loss`` plus scalar tensors to log. ``backbone`` is the
    network evaluated by k-NN / linear probing and exported.
    """

    name: ClassVar[str] = ""
    base_momentum: float = 0.0

    @property
    def backbone(self) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg, backbone_fn: BackboneFn) -> "Method":
        """Build from the run config; the only place a method reads it."""
        raise NotImplementedError

    @staticmethod
    def train_transform(cfg):
        """The CPU augmentation producing this method's list of views from one PIL image."""
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) module pairs updated by EMA after each optimizer step."""
        return []

    def check_setup(self, global_batch_size: int) -> None:
        """Raise a clear error before training if the batch size cannot work with this method."""

    def trainable_modules(self) -> list[nn.Module]:
        """Modules whose parameters the optimizer updates (targets excluded)."""
        return [m for m in self.children() if any(p.requires_grad for p in m.parameters())]

    @contextlib.contextmanager
    def accumulate(self):
        """Gradient accumulation: inside, buffers (queues) collect updates; they are applied on exit.

        Any submodule with a ``defer_updates`` flag and a ``flush()`` method takes part.
        """
        parts = [m for m in self.modules() if hasattr(m, "defer_updates") and hasattr(m, "flush")]
        for m in parts:
            m.defer_updates = True
        try:
            yield
        finally:
            for m in parts:
                m.defer_updates = False
                m.flush()

    def momentum_at(self, step: int, total_steps: int) -> float:
        return cosine_momentum(step, total_steps, self.base_momentum)

    def on_step_end(self, step: int, total_steps: int, apply: torch.Tensor | bool = True) -> dict[str, float]:
        """After optimizer step number ``step`` (1-based): update the targets with momentum m(step).

        ``apply``: False (or a False 0-d tensor, read on the device) when the step was skipped.
        """
        with torch.no_grad():  # in the body: mutation testing skips decorated functions
            pairs = self.momentum_pairs()
            if not pairs:
                return {}
            m = self.momentum_at(step, total_steps)
            for online, target in pairs:
                ema_update(online, target, m, apply)
            return {"momentum": m}
