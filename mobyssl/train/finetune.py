"""End-to-end supervised fine-tuning of a backbone plus a new linear head (``mobyssl finetune``).

The ViT recipe of MAE and BEiT, from timm's pieces: AdamW with layer-wise lr decay (``create_optimizer_v2``),
per-step cosine lr with linear warm-up, drop path, RandAugment and random erasing (``create_transform``), mixup /
CutMix with label smoothing (``Mixup``, ``SoftTargetCrossEntropy``). Top-1 / top-5 on ``data.test`` after every
epoch go to ``metrics.jsonl`` and TensorBoard.

Exact resume: the data order and every image's augmentation are functions of (``train.seed``, epoch, index), each
step's mixup draw of (``train.seed``, step), and the checkpoint written after every epoch holds the model, the
optimizer, the grad scaler and the RNG states; ``--resume`` continues from the newest one. The output folder and
its lock, checkpoint writes and non-finite steps follow ``pretrain``'s rules.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import build
from .. import distributed as D
from ..config import Config, to_dict
from ..data import DataError, eval_transform, open_dataset
from ..data.datasets import check_labelled_splits
from ..data.sampler import GlobalBatchSampler
from ..data.training import TrainingDataset, sample_seed
from ..data.transforms import NORMALIZATION
from ..errors import CheckpointError, ConfigError
from ..eval.features import SkipUnreadable
from ..runtime import autocast, eval_mode, rng_state, seed_everything
from .checkpoint import find_resumable, write_run_checkpoint
from .guards import NonFiniteGuard, StopSignals, TrainingInterrupted
from .logging import MetricsLogger, Progress
from .optim import warmup_cosine
from .rundir import RunLock, acquire_writable, check_fresh_output_dir


class Classifier(nn.Module):
    """A timm backbone with a new linear head; ``forward(views)`` is the training step's loss, so the
    pre-training ``train_step`` (AMP, grad scaler, clipping, accumulation) runs it unchanged.

    ``views``: ``[images (B, 3, S, S), targets (B, C)]`` (soft targets after mixup / smoothing)."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        backbone.reset_classifier(num_classes)
        head = backbone.get_classifier()
        nn.init.trunc_normal_(head.weight, std=2e-5)  # MAE's head init: the first logits are ~0
        nn.init.zeros_(head.bias)
        self.model = backbone
        self.loss = SoftTargetLoss()

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        images, targets = views
        return {"loss": self.loss(self.model(images), targets)}

    def on_after_backward(self, epoch: int) -> None:  # train_step's hooks: nothing to do here
        pass

    def accumulate(self):
        import contextlib

        return contextlib.nullcontext()


class SoftTargetLoss(nn.Module):
    """Cross-entropy against soft targets ``(B, C)`` (rows sum to 1), computed in float32."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.sum(-targets * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def finetune_transform(cfg: Config):
    """timm's training transform for ``data.image_size``: RandomResizedCrop (``finetune.crop_scale``, bicubic),
    flip, RandAugment, normalisation, random erasing (per-pixel noise)."""
    from timm.data import create_transform

    fc = cfg.finetune
    mean, std = NORMALIZATION[cfg.data.normalization]
    transform = create_transform(cfg.data.image_size, is_training=True, scale=tuple(fc.crop_scale),
                                 auto_augment=fc.rand_augment, re_prob=fc.random_erasing, re_mode="pixel",
                                 re_count=1, interpolation="bicubic", mean=mean, std=std)
    for t in getattr(transform, "transforms", ()):
        for op in getattr(t, "ops", ()):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize  # this transform's ops only: timm itself is left alone
    return transform


def _posterize(img, bits_to_keep, **_):
    """timm's posterize with 0 bits kept allowed again: RandAugment's strongest level keeps 0 bits (a black
    image, what Pillow did before version 13, which now refuses 0)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def make_mixup(cfg: Config, num_classes: int):
    """timm's Mixup (mixup or CutMix per batch, label smoothing); with both off, smoothed one-hot targets."""
    from timm.data import Mixup

    fc = cfg.finetune
    if fc.mixup > 0 or fc.cutmix > 0:
        return Mixup(mixup_alpha=fc.mixup, cutmix_alpha=fc.cutmix, label_smoothing=fc.label_smoothing,
                     num_classes=num_classes)

    def smooth(images, labels):
        off = fc.label_smoothing / num_classes
        targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
        targets.scatter_(1, labels[:, None], 1.0 - fc.label_smoothing + off)
        return images, targets

    return smooth


def _mix(mixup, images, labels, seed: int, step: int):
    """``mixup(images, labels)`` with its numpy draws fixed by (seed, step) and the global numpy state kept."""
    state = np.random.get_state()
    np.random.seed(sample_seed(seed, step, 0) % 2**32)
    try:
        return mixup(images, labels)
    finally:
        np.random.set_state(state)


def default_output_dir(checkpoint: str | None) -> Path:
    return Path(checkpoint).resolve().parent / "finetune" if checkpoint else Path("runs/finetune_random_init")


def evaluate_top1(model: nn.Module, loader, device: torch.device, amp_dtype) -> dict[str, float]:
    """Top-1 / top-5 (%) of ``model``'s logits on the readable images of ``loader`` (over all ranks)."""
    counts = torch.zeros(3, device=device, dtype=torch.float64)
    with eval_mode(model):
        for images, labels, keys in loader:
            keep = torch.tensor([not k for k in keys])
            if not keep.any():
                continue
            images, labels = images[keep].to(device), torch.as_tensor(labels)[keep].to(device)
            with autocast(device, amp_dtype):
                logits = model(images).float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            counts += torch.stack([(top5[:, 0] == labels).sum(), (top5 == labels[:, None]).any(1).sum(),
                                   torch.tensor(labels.shape[0], device=device)]).double()
    counts = D.gather_no_grad(counts[None]).sum(0)
    return {"top1": (100 * counts[0] / counts[2]).item(), "top5": (100 * counts[1] / counts[2]).item()}


def finetune(cfg: Config, backbone: nn.Module, output_dir: str | Path, device: torch.device, amp_dtype=None,
             resume: bool = False, log=print, dry_run: bool = False, source: str = "") -> dict:
    """Fine-tune ``backbone`` (built with ``drop_path_rate=finetune.drop_path``, weights loaded) with a new head on
    ``data.eval_train`` (or ``data.train``; labelled), testing on ``data.test`` after every epoch. Returns the last
    epoch's results. ``resume``: continue the run in ``output_dir`` from its newest checkpoint."""
    from timm.optim import create_optimizer_v2

    from .trainer import TrainingDiverged, load_training_state, make_scaler, train_step

    fc, out = cfg.finetune, Path(output_dir)
    world = D.world_size()
    if fc.batch_size % world or fc.batch_size // world < 2 or (fc.batch_size // world) % 2:
        raise ConfigError(f"finetune.batch_size={fc.batch_size} over {world} process(es) must give an even number of "
                          "at least 2 images per process (mixup pairs them).")
    if not cfg.data.test:
        raise DataError("data.test is not set: fine-tuning reports its top-1 on a labelled test split "
                        "(data.test=<ImageFolder dir or zip>).")
    train_key = "data.eval_train" if cfg.data.eval_train else "data.train"
    labelled = open_dataset(cfg.data.eval_train or cfg.data.train, key=train_key)
    test = open_dataset(cfg.data.test, eval_transform(cfg.data.image_size, cfg.data.eval_crop_ratio,
                                                      cfg.data.normalization), key="data.test")
    check_labelled_splits(labelled, train_key, test, "fine-tuning")
    if len(labelled) < fc.batch_size:
        raise DataError(f"{train_key}={labelled.source} has {len(labelled)} images, fewer than one batch "
                        f"(finetune.batch_size={fc.batch_size}); lower finetune.batch_size.")
    point = None
    if resume:
        point = find_resumable(out, log)
        if point is None:
            raise CheckpointError(f"--resume: {out} holds no fine-tuning checkpoint that loads; start a new run "
                                  "without --resume (in a new or empty finetune.output_dir).")
        if "finetune" not in point[1]:
            raise CheckpointError(f"--resume: {point[0]} is not a fine-tuning checkpoint of mobyssl.")
    else:
        D.on_main_then_agree(lambda: check_fresh_output_dir(out))
    num_classes = len(labelled.classes)
    seed_everything(cfg.train.seed)  # the head's init and drop path (a resumed run restores its RNG states below)
    model = Classifier(backbone, num_classes).to(device)
    dataset = TrainingDataset(labelled, finetune_transform(cfg), seed=cfg.train.seed)
    per_rank = fc.batch_size // world
    sampler = GlobalBatchSampler(len(dataset), per_rank, seed=cfg.train.seed, rank=D.rank(), world_size=world,
                                 yield_epoch=True)
    steps_per_epoch = sampler.steps_per_epoch
    total = fc.epochs * steps_per_epoch
    scale = fc.batch_size / fc.lr_ref_batch
    lr = warmup_cosine(fc.lr * scale, fc.min_lr * scale, total, int(round(fc.warmup_epochs * steps_per_epoch)))
    if dry_run:
        return {"steps_per_epoch": steps_per_epoch}
    optimizer = create_optimizer_v2(model.model, "adamw", lr=float(lr[0]), weight_decay=fc.weight_decay,
                                    layer_decay=fc.layer_decay if fc.layer_decay < 1 else None)
    scaler = make_scaler(device, amp_dtype)
    mixup = make_mixup(cfg, num_classes)
    step, start_epoch = 0, 0
    if point is not None:
        path, state = point
        step = load_training_state(state, path, model, optimizer, scaler, key="finetune", what="fine-tuning",
                                   command="mobyssl finetune", fix="Resume with the command that started the run.")
        start_epoch = step // steps_per_epoch
        log(f"resumed from {path} at step {step} (epoch {step / steps_per_epoch:.2f})")
    loader = build.make_loader(dataset, per_rank, cfg.data.num_workers, device, drop_last=True, sampler=sampler,
                               generator=torch.Generator().manual_seed(cfg.train.seed))
    test_loader = build.make_loader(SkipUnreadable(test), cfg.knn.batch_size, cfg.data.num_workers, device,
                                    sampler=list(range(D.rank(), len(test), world)) if world > 1 else None)
    lock = RunLock(out, fresh=point is None)
    D.on_main_then_agree(lambda: acquire_writable(lock))
    main = D.is_main_process()
    wrapped = D.wrap_ddp(model, device)
    if cfg.train.compile:
        wrapped = torch.compile(wrapped)
    logger = MetricsLogger(out) if main else None
    if main:
        (out / "config.yaml").write_text(_config_text(cfg, source))
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        log(f"finetune | {cfg.model.backbone} ({n_params:.1f}M) + head of {num_classes} classes | {len(labelled)} "
            f"images | batch {fc.batch_size} | {steps_per_epoch} steps/epoch x {fc.epochs} epochs | layer decay "
            f"{fc.layer_decay:g} | device {device} | output {out}")
    progress = Progress(total, step, cfg.train.log_every, desc="finetune", enabled=main)
    guard = NonFiniteGuard(cfg.train.max_bad_steps)
    results: dict = {}
    saved = {"path": None, "step": None}

    def save() -> None:
        rng = D.gather_objects(rng_state())  # every rank: the states are gathered
        if main:
            saved["path"] = write_run_checkpoint(
                {"finetune": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "rng": rng, "epoch": step // steps_per_epoch, "global_step": step, "config": to_dict(cfg),
                 "source": source, "classes": labelled.classes},
                out, step, keep_last=cfg.train.keep_last, log=progress.write)
            saved["step"] = step

    model.train()
    first_step = step
    try:
        with StopSignals() as stop_signals:
            for epoch in range(start_epoch, fc.epochs):
                sampler.set_epoch(epoch, start_step=step - epoch * steps_per_epoch)  # mid-epoch after a stop
                tick, seen = time.time(), 0
                for images, labels, _ in loader:
                    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                    images, targets = _mix(mixup, images, labels, cfg.train.seed, step)
                    outputs, ok = train_step(wrapped, [images, targets], optimizer, scaler, float(lr[step]),
                                             fc.clip_grad, amp_dtype, epoch=epoch)
                    step += 1
                    guard.record(ok)
                    seen += images.shape[0] * world
                    if step % cfg.train.log_every == 0 or step % steps_per_epoch == 0:
                        if not guard.check(step, progress.write):
                            raise TrainingDiverged(
                                f"fine-tuning diverged: {guard.consecutive} steps in a row had a NaN/Inf loss or "
                                f"gradient; the newest checkpoint ({saved['path']}) is untouched. Lower finetune.lr, "
                                "raise finetune.warmup_epochs or try train.amp=off, then resume.")
                        loss = D.mean_across_ranks(outputs["loss"].detach().float()).item()
                        if logger:
                            logger.log("train", step, epoch=round(step / steps_per_epoch, 3), lr=float(lr[step - 1]),
                                       loss=loss, img_per_s=seen / max(time.time() - tick, 1e-9),
                                       skipped_steps=guard.total)
                        progress.update(step, epoch=f"{step / steps_per_epoch:.2f}", loss=loss, lr=float(lr[step - 1]))
                        tick, seen = time.time(), 0
                    else:
                        progress.update(step)
                    stop = stop_signals.signum is not None
                    if world > 1:
                        stop = D.any_rank(stop, device)
                    if stop:
                        if guard.check(step, progress.write) and guard.consecutive == 0:
                            save()
                        raise TrainingInterrupted(stop_signals.signum or 15, step, saved["path"], saved["step"])
                results = evaluate_top1(model.model, test_loader, device, amp_dtype)
                if logger:
                    logger.log("eval", step, epoch=epoch + 1, **results)
                progress.write(f"epoch {epoch + 1}/{fc.epochs}: top-1 {results['top1']:.2f}  top-5 "
                               f"{results['top5']:.2f}")
                save()
    except BaseException:
        progress.close()
        if logger:
            logger.close()
        if step == first_step:
            lock.undo_new_run()  # a new run that failed before its first step leaves the folder as it found it
        raise
    finally:
        progress.close()
        if logger:
            logger.close()
        lock.release()
    return {"epoch": fc.epochs, **results}


def _config_text(cfg: Config, source: str) -> str:
    from ..config import to_yaml

    return f"# mobyssl finetune of {source or 'a backbone'}\n" + to_yaml(cfg)
