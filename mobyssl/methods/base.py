"""The contract between a self-supervised method and the trainer."""

from __future__ import annotations

import contextlib
from typing import Callable, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..models.momentum import cosine_momentum, ema_update

# Builds a fresh backbone for a given drop-path rate (and ``multi_size=True`` for one that takes crops of other
# sizes too); the trainer binds name, image size, etc.
BackboneFn = Callable[..., nn.Module]


class Method(nn.Module):
    """A self-supervised method: owns its backbone(s), heads, buffers (queues, centres) and momentum pairs.

    The trainer calls, per step::

        method.on_step_start(step, total_steps, steps_per_epoch)   # step: 0-based
        out = method(views)          # views: list of (B, 3, H_i, W_i) tensors, any number and size
        out["loss"].backward()
        method.on_after_backward(epoch); clip; optimizer.step()
        method.on_step_end(step + 1, total_steps)   # momentum updates etc.

    ``forward`` returns a dict holding ``loss`` plus scalar tensors to log. ``backbone`` is the
    network evaluated by k-NN / linear probing and exported.
    """

    name: ClassVar[str] = ""
    # The attribute holding ``backbone``: its weights are ``<backbone_key>.*`` in the method's state dict.
    backbone_key: ClassVar[str] = ""
    base_momentum: float = 0.0
    # Weight decay on every trainable parameter (MoCo v3's single AdamW group); otherwise biases and 1-D parameters
    # (norms, scales) are not decayed (MoBY's, DINO's).
    decay_every_parameter: ClassVar[bool] = False
    # The lr warm-up's last step already at the peak (DINO's np.linspace with its endpoint: DINO, EsViT, SiT);
    # otherwise one step below it (timm's and MoCo v3's lr * step / warmup_steps: MoBY, MoCo v3).
    warmup_ends_at_peak: ClassVar[bool] = False

    @property
    def backbone(self) -> nn.Module:
        """The network that is the result: evaluated (k-NN, linear) and exported (MoBY: the online encoder;
        DINO, EsViT: the teacher's backbone)."""
        raise NotImplementedError

    @property
    def trained_backbone(self) -> nn.Module:
        """The backbone the optimizer trains (gradient checkpointing applies to it); by default ``backbone``."""
        return self.backbone

    @classmethod
    def from_config(cls, cfg, backbone_fn: BackboneFn) -> "Method":
        """Build from the run config; the only place a method reads it."""
        raise NotImplementedError

    @staticmethod
    def train_transform(cfg):
        """The CPU augmentation producing this method's list of views from one PIL image. A transform with
        ``takes_rng`` (``MultiView`` of ``AugmentedView``) is called with a generator seeded per sample; any other
        callable runs with torch's and Python's global generators seeded per sample."""
        raise NotImplementedError

    @classmethod
    def device_transform(cls, cfg):
        """The batched augmentation of ``data.pipeline=gpu_decode`` / ``gpu_resident``: ``uint8 (B, 3, H, W)`` images
        (or a list of them) on the device -> this method's list of views, as ``train_transform`` makes them."""
        raise ConfigError(f"data.pipeline={cfg.data.pipeline} has no batched augmentation for method.name={cls.name}; "
                          "use data.pipeline=cpu.")

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def pictures(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Images that show what the method learns, from a batch of training ``views``: ``{name: (3, H, W)}``
        floats in [0, 1] (SiT: its reconstructions). The trainer calls it in eval mode, without gradients and with
        the random state restored afterwards, and writes each as ``pictures/<name>_epochNNNNN.png``. None by
        default."""
        return {}

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) module pairs updated by EMA after each optimizer step."""
        return []

    def collapse_signs(self, stats: dict[str, float]) -> str | None:
        """What in one log step's statistics (``forward``'s outputs, averaged over ranks) says the representation
        is collapsing, in a few words with the numbers; None when nothing does. The trainer warns with it."""
        return None

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

    def on_step_start(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        """Before optimizer step ``step`` (0-based, the index into every per-step schedule): set what depends on
        the step (DINO: the teacher temperature of its epoch). Must depend on the arguments only, so a resumed
        run sets the same values."""

    def on_after_backward(self, epoch: int) -> None:
        """After the backward pass (gradients unscaled), before clipping and the optimizer step: a method may set
        ``p.grad = None`` to keep parameter ``p`` out of this step (DINO freezes its head's last layer)."""

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


def contrastive_collapse_signs(stats: dict[str, float], negatives: str) -> str | None:
    """The collapse rule of the contrastive methods: ``feature_std`` (about 1 for well-spread features, 0 when
    every image maps to one point) under 0.1, or ``neg_sim`` (mean cosine similarity to the negatives, described
    by ``negatives``) over 0.9."""
    std, neg = stats.get("feature_std"), stats.get("neg_sim")
    if std is not None and std < 0.1:
        return f"feature_std {std:.3f} < 0.1: the images map to nearly one point"
    if neg is not None and neg > 0.9:
        return f"neg_sim {neg:.3f} > 0.9: every image looks like {negatives}"
    return None
