"""Evaluation jobs built from a run config: k-NN and linear probing of a backbone.

Unreadable images follow the rule of every split: an evaluation leaves them out (it never replaces them,
which would bias it), names each on stderr, counts them, and stops with a ``DataError`` listing them when
more than ``data.max_bad_fraction`` of a split is unreadable. The accuracies are computed on the images
that could be read; pass ``skipped={}`` to ``run_knn`` / ``run_linear`` to get the number left out per
split (``{"data.test": 1, ...}``; 0 for clean splits). The returned accuracy dicts hold accuracies only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from .. import build
from .. import distributed as D
from ..config import Config
from ..data import DataError, eval_transform, linear_train_transform, open_dataset
from ..data.sampler import GlobalBatchSampler
from ..errors import ConfigError
from ..models.last_blocks import LastBlocksFeatures
from ..runtime import eval_mode
from .correspondence import View2, evaluate_correspondence, token_grid
from .features import SkipUnreadable, extract_features
from .fewshot import check_shots, fewshot_classify
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
    """Features and labels of the readable images of each dataset, in the dataset's order; under torchrun each
    rank embeds a shard and all gather them (unreadable ones are dropped on each rank before gathering, with their
    labels), so the result is the one process's, row for row."""
    out = []
    for ds in datasets:
        shard = list(range(D.rank(), len(ds), D.world_size())) if D.is_distributed() else None
        loader = build.make_loader(SkipUnreadable(ds), cfg.knn.batch_size, cfg.data.num_workers, device,
                                   sampler=shard)
        failed: list[str] = []
        feats, labels = extract_features(backbone, loader, device, amp_dtype, failed=failed)
        if D.is_distributed():
            unreadable = set(failed)
            kept = torch.tensor([i for i in shard if ds.keys[i] not in unreadable], dtype=torch.long)
            feats = D.gather_variable(feats.to(device)).cpu()
            labels = D.gather_variable(labels.to(device)).cpu()
            order = D.gather_variable(kept.to(device)).cpu().argsort()  # back to the dataset's order, as on 1 process
            feats, labels = feats[order], labels[order]
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


def check_fewshot_shots(cfg: Config, train) -> None:
    """Refuse a ``fewshot.shots`` N larger than the smallest class of the labelled split ``train`` (from its
    labels: no image is read)."""
    check_shots(torch.as_tensor(train.labels), cfg.fewshot.shots, len(train.classes), class_names=train.classes,
                split=f"{_split_name(train)}={train.source}")


def run_fewshot(cfg: Config, backbone: nn.Module, device: torch.device, amp_dtype=None, datasets=None,
                skipped: dict | None = None) -> dict[str, float]:
    """N-shot logistic regression on frozen features for each N of ``fewshot.shots``, ``fewshot.trials`` draws
    each from ``data.eval_train`` (or ``data.train``), tested on ``data.test``: mean top-1 and 95% interval per N.

    The shots are checked against the smallest class before any image is read, and again after unreadable images
    are left out.
    """
    fc = cfg.fewshot
    train, test = datasets or build.build_eval_datasets(cfg)
    check_fewshot_shots(cfg, train)
    (ftr, ytr), (fte, yte) = _features(cfg, backbone, device, amp_dtype, (train, test), skipped)
    return fewshot_classify(ftr, ytr, fte, yte, fc.shots, fc.trials, cfg.train.seed, num_classes=len(train.classes),
                            l2=fc.l2, class_names=train.classes)


def check_correspondence_top_k(backbone: nn.Module, cfg: Config) -> None:
    """Refuse ``correspondence.top_k`` larger than the backbone's final token grid at ``data.image_size`` (one
    forward pass of a blank image), before any data is read."""
    size = cfg.data.image_size
    param = next(backbone.parameters(), None)
    with eval_mode(backbone):
        blank = torch.zeros(1, 3, size, size, device=param.device if param is not None else "cpu")
        _, h, w, _ = token_grid(backbone, blank).shape
    if cfg.correspondence.top_k > h * w:
        raise ConfigError(f"config key 'correspondence.top_k' is {cfg.correspondence.top_k}, but {cfg.model.backbone} "
                          f"has a {h}x{w} final token grid at data.image_size={size} ({h * w} tokens); set "
                          f"correspondence.top_k={h * w} or lower (corr_all_accuracy scores every token anyway).")


def run_correspondence(cfg: Config, backbone: nn.Module, device: torch.device, amp_dtype=None, datasets=None,
                       skipped: dict | None = None) -> dict[str, float]:
    """EsViT's dense correspondence accuracy on ``data.test`` (view 2: the ``correspondence.*`` transform of
    each image). Under torchrun each rank scores a shard; the averages are over all images."""
    cc = cfg.correspondence
    check_correspondence_top_k(backbone, cfg)
    _, test = datasets or build.build_eval_datasets(cfg)
    shard = list(range(D.rank(), len(test), D.world_size())) if D.is_distributed() else None
    loader = build.make_loader(SkipUnreadable(test), cfg.knn.batch_size, cfg.data.num_workers, device, sampler=shard)
    failed: list[str] = []
    view2 = View2(cc.flip, tuple(cc.jitter), cc.jitter_prob, cc.grayscale)
    results = evaluate_correspondence(backbone, loader, device, amp_dtype, cfg.data.normalization, cc.top_k, view2,
                                      seed=cfg.train.seed + D.rank(), failed=failed)
    if D.is_distributed():
        failed = [k for part in D.gather_objects(failed) for k in part]
    check_unreadable(test, failed, cfg.data.max_bad_fraction, skipped)
    return results


def load_images(paths, cfg: Config) -> torch.Tensor:
    """User image files -> a normalised ``(B, 3, S, S)`` batch as the evaluation sees them (``data.image_size``,
    centre crop); a file that cannot be read raises ``DataError`` naming it, before any picture is drawn."""
    from ..data.datasets import decode_image_bytes

    transform = eval_transform(cfg.data.image_size, 1.0, cfg.data.normalization)
    images = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise DataError(f"--images {path}: cannot be read ({e.strerror or e}); check the path.") from None
        images.append(transform(decode_image_bytes(data, str(path))))
    return torch.stack(images)


def run_visualize(cfg: Config, backbone: nn.Module, device: torch.device, amp_dtype, images: torch.Tensor,
                  names: list[str], out, labels: torch.Tensor | None = None, class_names=None, k: int = 0,
                  threshold: float | None = None, log=print) -> list:
    """Pictures of ``backbone`` for the normalised ``images`` ``(B, 3, S, S)`` in the folder ``out``: the last
    block's CLS attention per head (ViTs), the first three principal components of the token features as colours
    (any backbone), and with ``k > 0`` a retrieval grid of each image's ``k`` nearest neighbours in
    ``data.eval_train`` (or ``data.train``). Returns the files written."""
    from ..errors import BackboneError
    from .visualize import nearest_neighbours, save_attention_pngs, save_pca_pngs, save_retrieval_grid

    norm = cfg.data.normalization
    images = images.to(device)
    written = []
    try:
        written += save_attention_pngs(backbone, images, out, names, norm, threshold)
    except BackboneError as e:
        log(f"no attention maps: {e}")
    written += save_pca_pngs(backbone, images, out, names, norm)
    if k > 0:
        key = "data.eval_train" if cfg.data.eval_train else "data.train"
        bank = open_dataset(cfg.data.eval_train or cfg.data.train,
                                  eval_transform(cfg.data.image_size, 1.0, norm), key=key)
        if k > len(bank):
            raise ConfigError(f"--k {k} is more than the {len(bank)} images of {key}={bank.source}; lower --k.")
        loader = build.make_loader(SkipUnreadable(bank), cfg.knn.batch_size, cfg.data.num_workers, device)
        failed: list[str] = []
        bank_features, bank_labels = extract_features(backbone, loader, device, amp_dtype, failed=failed)
        check_unreadable(bank, failed, cfg.data.max_bad_fraction)
        unreadable = set(failed)
        kept = [i for i, name in enumerate(bank.keys) if name not in unreadable]  # the rows of bank_features
        with eval_mode(backbone):
            query_features = backbone(images).float().cpu()
        similarities, rows = nearest_neighbours(query_features, bank_features, min(k, len(kept)))
        neighbours = torch.stack([torch.stack([bank[kept[r]][0] for r in row]) for row in rows.tolist()])
        names_of_classes = class_names or bank.classes or None
        written.append(save_retrieval_grid(images.cpu(), neighbours, labels, bank_labels[rows], names_of_classes,
                                           Path(out) / "retrieval.png", similarities, norm))
    return written
