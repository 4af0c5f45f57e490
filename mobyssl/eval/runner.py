"""Evaluation jobs built from a run config: k-NN and linear probing of a backbone.

Unreadable images follow the rule of every split: an evaluation leaves them out (it never replaces them,
which would bias it), names each on stderr, counts them, and stops with a ``DataError`` listing them when
more than ``data.max_bad_fraction`` of a split is unreadable. The accuracies are computed on the images
that could be read; pass ``skipped={}`` to ``run_knn`` / ``run_linear`` to get the number left out per
split (``{"data.test": 1, ...}``; 0 for clean splits). The returned accuracy dicts hold accuracies only.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .. import build
from .. import distributed as D
from ..config import Config
from ..data import DataError, linear_train_transform
from ..data.sampler import GlobalBatchSampler
from ..models.last_blocks import LastBlocksFeatures
from .features import SkipUnreadable, extract_features
from .knn import knn_classify
from .linear import linear_probe_fast, linear_probe_full


def _split_name(ds) -> str:
    return getattr(ds, "key", None) or str(getattr(ds, "source", "dataset"))


def check_unreadable(ds, failed: list[str], max_fraction: float, skipped: dict | None = None,
                     used_for: str = "evaluation") -> None:
    """Apply the bad-image rule to ``failed``, the keys of ``ds`` found unreadable (on all ranks together).

    Records the count in ``skipped[split]``; raises ``DataError`` listing the files when they are more than
    ``max_fraction`` of ``ds`` (or all of it); otherwise the main process lists them on stderr.
    """
    split = _split_name(ds)
    if skipped is not None:
        skipped[split] = len(failed)
    if not failed:
        return
    if hasattr(ds, "unreadable"):
        ds.unreadable.update(failed)  # each file's reason is printed once per run
    n = len(ds)
    names = sorted(failed)
    listed = ", ".join(names[:10]) + (f" ... ({len(names)} in all)" if len(names) > 10 else "")
    if len(failed) >= n:
        raise DataError(f"{split}={ds.source}: none of its {n} images could be read ({listed}); check the data "
                        "source.")
    if len(failed) / n > max_fraction:
        raise DataError(f"{split}={ds.source}: {len(failed)} of {n} images could not be read "
                        f"({100 * len(failed) / n:.1f}% > data.max_bad_fraction={max_fraction}): {listed}. Fix or "
                        "remove these files, or raise data.max_bad_fraction.")
    if D.is_main_process():
        print(f"mobyssl: {split}: {len(failed)} of {n} images could not be read and were left out of the "
              f"{used_for}: {listed}", file=sys.stderr, flush=True)


def _features(cfg: Config, backbone: nn.Module, device, amp_dtype, datasets, skipped: dict | None = None):
    """Features and labels of the readable images of each dataset; under torchrun each rank embeds a shard
    and all gather them (unreadable ones are dropped on each rank before gathering, with their labels)."""
    out = []
    for ds in datasets:
        shard = list(range(D.rank(), len(ds), D.world_size())) if D.is_distributed() else None
        loader = build.make_loader(SkipUnreadable(ds), cfg.knn.batch_size, cfg.data.num_workers, device,
                                   sampler=shard)
        failed: list[str] = []
        feats, labels = extract_features(backbone, loader, device, amp_dtype, failed=failed)
        if D.is_distributed():
            feats = D.gather_variable(feats.to(device)).cpu()
            labels = D.gather_variable(labels.to(device)).cpu()
            failed = [k for part in D.gather_objects(failed) for k in part]
        check_unreadable(ds, failed, cfg.data.max_bad_fraction, skipped)
        out.append((feats, labels))
    return out


def run_knn(cfg: Config, backbone: nn.Module, device: torch.device, amp_dtype=None,
            datasets=None, skipped: dict | None = None) -> dict[str, float]:
    """Weighted k-NN of ``data.test`` against ``data.eval_train`` (or ``data.train``) features.

    ``datasets``: the ``(bank, test)`` pair from ``build_eval_datasets``, to avoid re-scanning large folders.
    ``skipped``: a dict that receives the number of unreadable images left out, per split.
    """
    train, test = datasets or build.build_eval_datasets(cfg)
    (ftr, ytr), (fte, yte) = _features(cfg, backbone, device, amp_dtype, (train, test), skipped)
    # On a GPU the similarity search runs there (ImageNet: 50k x 1.28M dot products).
    return knn_classify(ftr.to(device), ytr, fte.to(device), yte, cfg.knn.k, cfg.knn.temperature,
                        num_classes=len(train.classes))


def run_linear(cfg: Config, backbone: nn.Module, device: torch.device, amp_dtype=None, log=print,
               skipped: dict | None = None) -> dict[str, float]:
    """Linear probe in ``cfg.linear.mode`` (``full``: paper protocol; ``fast``: on cached features), on the
    pooled outputs of the backbone's last ``cfg.linear.n_last_blocks`` blocks.

    ``skipped``: a dict that receives the number of unreadable images left out, per split.
    """
    lc = cfg.linear
    if lc.n_last_blocks > 1:
        backbone = LastBlocksFeatures(backbone, lc.n_last_blocks)
        if log and D.is_main_process():
            log(f"linear probe on the pooled outputs of the last {lc.n_last_blocks} blocks "
                f"({backbone.num_features} features)")
    if lc.mode == "fast":
        train, test = build.build_eval_datasets(cfg)
        (ftr, ytr), (fte, yte) = _features(cfg, backbone, device, amp_dtype, (train, test), skipped)
        return linear_probe_fast(ftr, ytr, fte, yte, len(train.classes), lc.epochs, lc.batch_size, lc.lr,
                                 lc.lr_ref_batch, lc.momentum, lc.weight_decay, seed=cfg.train.seed, log=log)
    aug = linear_train_transform(cfg.data.image_size, cfg.data.normalization)
    train, test = build.build_eval_datasets(cfg, train_transform=aug)
    world = D.world_size()
    batch = max(min(lc.batch_size, len(train)) // world, 1)
    sampler = GlobalBatchSampler(len(train), batch, seed=cfg.train.seed, rank=D.rank(), world_size=world)
    train_loader = build.make_loader(SkipUnreadable(train), batch, cfg.data.num_workers, device, drop_last=True,
                                     sampler=sampler)
    (test_feats, test_labels), = _features(cfg, backbone, device, amp_dtype, (test,), skipped)
    if skipped is not None:
        skipped[_split_name(train)] = 0
    known: set[str] = set()

    def check_train(failed: set[str]) -> None:  # every rank, at the end of each epoch
        everything = set().union(*(set(part) for part in D.gather_objects(sorted(failed))))
        if everything != known:
            known.update(everything)
            check_unreadable(train, sorted(everything), cfg.data.max_bad_fraction, skipped,
                             "linear probe's training")

    return linear_probe_full(backbone, train_loader, test_feats, test_labels, len(train.classes), device,
                             amp_dtype, lc.epochs, lc.lr, lc.lr_ref_batch, lc.momentum, lc.weight_decay, log=log,
                             check_unreadable=check_train)
