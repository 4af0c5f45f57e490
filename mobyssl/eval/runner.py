"""Evaluation jobs built from a run config: k-NN and linear probing of a backbone."""

from __future__ import annotations

import torch
from torch import nn

from .. import build
from .. import distributed as D
from ..config import Config
from ..data import linear_train_transform
from ..data.sampler import GlobalBatchSampler
from .features import extract_features
from .knn import knn_classify
from .linear import linear_probe_fast, linear_probe_full


def _features(cfg: Config, backbone: nn.Module, device, amp_dtype, datasets):
    """Features and labels of each dataset; under torchrun each rank embeds a shard and all gather them."""
    out = []
    for ds in datasets:
        shard = list(range(D.rank(), len(ds), D.world_size())) if D.is_distributed() else None
        loader = build.make_loader(ds, cfg.knn.batch_size, cfg.data.num_workers, device, sampler=shard)
        feats, labels = extract_features(backbone, loader, device, amp_dtype)
        if D.is_distributed():
            feats = D.gather_variable(feats.to(device)).cpu()
            labels = D.gather_variable(labels.to(device)).cpu()
        out.append((feats, labels))
    return out


def run_knn(cfg: Config, backbone: nn.Module, device: torch.device, amp_dtype=None,
            datasets=None) -> dict[str, float]:
    """Weighted k-NN of ``data.test`` against ``data.eval_train`` (or ``data.train``) features.

    ``datasets``: the ``(bank, test)`` pair from ``build_eval_datasets``, to avoid re-scanning large folders.
    """
    train, test = datasets or build.build_eval_datasets(cfg)
    (ftr, ytr), (fte, yte) = _features(cfg, backbone, device, amp_dtype, (train, test))
    # On a GPU the similarity search runs there (ImageNet: 50k x 1.28M dot products).
    return knn_classify(ftr.to(device), ytr, fte.to(device), yte, cfg.knn.k, cfg.knn.temperature,
                        num_classes=len(train.classes))


def run_linear(cfg: Config, backbone: nn.Module, device: torch.device, amp_dtype=None, log=print) -> dict[str, float]:
    """Linear probe in ``cfg.linear.mode`` (``full``: paper protocol; ``fast``: on cached features)."""
    lc = cfg.linear
    if lc.mode == "fast":
        train, test = build.build_eval_datasets(cfg)
        (ftr, ytr), (fte, yte) = _features(cfg, backbone, device, amp_dtype, (train, test))
        return linear_probe_fast(ftr, ytr, fte, yte, len(train.classes), lc.epochs, lc.batch_size, lc.lr,
                                 lc.lr_ref_batch, lc.momentum, lc.weight_decay, seed=cfg.train.seed, log=log)
    aug = linear_train_transform(cfg.data.image_size, cfg.data.normalization)
    train, test = build.build_eval_datasets(cfg, train_transform=aug)
    world = D.world_size()
    batch = max(min(lc.batch_size, len(train)) // world, 1)
    sampler = GlobalBatchSampler(len(train), batch, seed=cfg.train.seed, rank=D.rank(), world_size=world)
    train_loader = build.make_loader(train, batch, cfg.data.num_workers, device, drop_last=True, sampler=sampler)
    (test_feats, test_labels), = _features(cfg, backbone, device, amp_dtype, (test,))
    return linear_probe_full(backbone, train_loader, test_feats, test_labels, len(train.classes), device,
                             amp_dtype, lc.epochs, lc.lr, lc.lr_ref_batch, lc.momentum, lc.weight_decay, log=log)
