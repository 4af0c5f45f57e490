"""Linear probing of a frozen backbone.

``full``: the paper's protocol — each epoch, RandomResizedCrop + flip images pass through the
frozen backbone (eval mode: drop path off, BN running statistics), and a linear layer is trained
with SGD (momentum 0.9, lr 1.0 per 512, no weight decay, cosine). ``fast``: features are
computed once without augmentation, standardised with the training set's mean/std, and the
same optimiser trains the linear layer on them — minutes instead of hours on small datasets.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .. import distributed as D
from ..runtime import autocast
from .features import IGNORE_LABEL


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return 100.0 * hits[:, 0].float().mean().item(), 100.0 * hits.any(1).float().mean().item()


def _sgd(head: nn.Module, lr: float, momentum: float, weight_decay: float):
    return torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _cosine_lr(opt, base_lr: float, step: int, total: int) -> float:
    lr = 0.5 * base_lr * (1 + math.cos(math.pi * step / max(total, 1)))
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def linear_probe_fast(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                      test_labels: torch.Tensor, num_classes: int, epochs: int = 100, batch_size: int = 1024,
                      lr: float = 1.0, lr_ref_batch: int = 512, momentum: float = 0.9, weight_decay: float = 0.0,
                      seed: int = 0, log=None) -> dict[str, float]:
    """Train a linear classifier on precomputed features ``(N, D)``; returns top-1/top-5 in %."""
    mean, std = train_feats.mean(0), train_feats.std(0) + 1e-6
    xtr, xte = (train_feats - mean) / std, (test_feats - mean) / std
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(xtr.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    base_lr = lr * batch_size / lr_ref_batch
    opt = _sgd(head, base_lr, momentum, weight_decay)
    loader = DataLoader(TensorDataset(xtr, train_labels), batch_size=batch_size, shuffle=True, generator=g)
    total, step = epochs * len(loader), 0
    for epoch in range(epochs):
        for x, y in loader:
            _cosine_lr(opt, base_lr, step, total)
            loss = F.cross_entropy(head(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if log and (epoch + 1) % max(epochs // 5, 1) == 0:
            log(f"linear (fast) epoch {epoch + 1}/{epochs}  loss {loss.item():.4f}")
    with torch.no_grad():
        top1, top5 = _accuracy(head(xte), test_labels)
    return {"linear_top1": top1, "linear_top5": top5}


def linear_probe_full(backbone: nn.Module, train_loader: DataLoader, test_feats: torch.Tensor,
                      test_labels: torch.Tensor, num_classes: int, device: torch.device, amp_dtype=None,
                      epochs: int = 100, lr: float = 1.0, lr_ref_batch: int = 512, momentum: float = 0.9,
                      weight_decay: float = 0.0, log=None,
                      check_unreadable: Callable[[set[str]], None] | None = None) -> dict[str, float]:
    """The paper's linear protocol on augmented images through the frozen ``backbone``.

    ``train_loader`` yields this rank's images; under torchrun the head's gradients are averaged
    across ranks (DDP) and the lr follows the global batch. ``test_feats`` ``(M, D)`` are precomputed.

    Over a ``SkipUnreadable`` dataset the loader yields ``(images, labels, keys)``: an unreadable image
    has label ``IGNORE_LABEL`` and no part in the loss (a batch of nothing else makes a zero loss, so
    ranks stay in step). ``check_unreadable`` is called on every rank at the end of each epoch with the
    keys this rank found unreadable so far (it may gather them and raise to stop).
    """
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    head = nn.Linear(backbone.num_features, num_classes).to(device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    world = D.world_size()
    model = D.wrap_ddp(head, device)
    base_lr = lr * train_loader.batch_size * world / lr_ref_batch
    opt = _sgd(head, base_lr, momentum, weight_decay)
    total, step = epochs * len(train_loader), 0
    t0 = time.time()
    failed: set[str] = set()
    for epoch in range(epochs):
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        for batch in train_loader:
            images, y = batch[0], batch[1]
            bad = [k for k in batch[2] if k] if len(batch) > 2 else []
            failed.update(bad)
            _cosine_lr(opt, base_lr, step, total)
            with torch.no_grad(), autocast(device, amp_dtype):
                f = backbone(images.to(device, non_blocking=True))
            logits = model(f.float())
            if bad and len(bad) == len(y):
                loss = logits.sum() * 0.0  # nothing to learn from; still a backward for DDP
            else:
                loss = F.cross_entropy(logits, y.to(device), ignore_index=IGNORE_LABEL)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if check_unreadable is not None:
            check_unreadable(failed)
        if log and D.is_main_process():
            log(f"linear epoch {epoch + 1}/{epochs}  loss {loss.item():.4f}  {time.time() - t0:.0f}s")
    with torch.no_grad():
        top1, top5 = _accuracy(head(test_feats.to(device)).cpu(), test_labels)
    return {"linear_top1": top1, "linear_top5": top5}
