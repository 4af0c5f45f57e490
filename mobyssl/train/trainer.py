"""The pre-training loop, shared by every method.

Per step: lr from a precomputed per-iteration schedule, forward of the method on a list of
views under autocast, backward (through a grad scaler for fp16), gradient clipping, optimizer
step, then ``method.on_step_end`` (momentum updates). Checkpoints hold everything needed to
continue: weights, heads, queues, step counter, optimizer, scaler and RNG states.

One code path serves one process and ``torchrun``: ``train.batch_size`` is the global batch, each
rank takes its slice of every global batch, BatchNorms are synchronised, the method is wrapped in
DistributedDataParallel, and only rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import build
from .. import distributed as D
from ..config import Config, to_dict, to_yaml, validate
from ..data import DataError
from ..data.sampler import GlobalBatchSampler
from ..eval.runner import run_knn
from ..models.sync_bn import convert_sync_batchnorm
from ..runtime import autocast, resolve_amp, resolve_device, rng_state, seed_everything, set_rng_state
from .checkpoint import LATEST, CheckpointError, load_checkpoint, numbered_name, save_checkpoint
from .logging import MetricsLogger, Progress
from .optim import build_adamw, warmup_cosine


@dataclass
class Schedules:
    lr: list
    total_steps: int
    steps_per_epoch: int


def make_schedules(cfg: Config, steps_per_epoch: int) -> Schedules:
    t = cfg.train
    scale = t.batch_size / t.lr_ref_batch
    total = t.epochs * steps_per_epoch
    lr = warmup_cosine(t.lr * scale, t.min_lr * scale, total, int(round(t.warmup_epochs * steps_per_epoch)),
                       t.warmup_lr * scale)
    return Schedules(lr=lr.tolist(), total_steps=total, steps_per_epoch=steps_per_epoch)


def train_step(model, views: list, optimizer, scaler, lr: float, clip_grad: float | None,
               amp_dtype=None) -> dict:
    """One optimizer step of ``model`` (the method, or its DDP wrapper) on ``views``; returns its outputs.

    Momentum updates are not part of it: the caller runs ``method.on_step_end`` after it.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(views[0].device, amp_dtype):
        outputs = model(views)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(outputs["loss"]).backward()
    if clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return outputs


def pretrain(cfg: Config, resume: bool | str = False, log=print) -> dict:
    """Pre-train ``cfg.method`` on ``cfg.data.train``; returns the final metrics.

    ``resume``: False, True (the latest checkpoint in ``output_dir``) or a checkpoint path.
    """
    validate(cfg)
    device = D.init_distributed(resolve_device(cfg.train.device))
    amp_dtype = resolve_amp(cfg.train.amp, device)
    seed_everything(cfg.train.seed)
    out = Path(cfg.output_dir)
    main = D.is_main_process()
    world = D.world_size()
    log = log if main else (lambda *a, **k: None)

    # Everything that can be wrong with the input fails here, on every rank, before any training.
    D.check_same_config(to_dict(cfg))
    batch = cfg.train.batch_size
    if batch % world:
        raise ValueError(f"train.batch_size={batch} is the global batch and must be divisible by the "
                         f"number of processes ({world}); use a multiple of {world}.")
    if batch // world < 2:
        raise ValueError(f"train.batch_size={batch} over {world} processes leaves {batch // world} image per "
                         "process; BatchNorm in the heads needs at least 2. Raise train.batch_size.")
    dataset = build.build_train_dataset(cfg)
    if len(dataset) < batch:
        raise DataError(f"data.train={cfg.data.train} has {len(dataset)} images, fewer than one batch "
                        f"(train.batch_size={batch}); lower train.batch_size.")
    knn_enabled = cfg.train.knn_every >= 0 and bool(cfg.data.test)
    if knn_enabled:
        build.build_eval_datasets(cfg)
    method = build.build_method(cfg)
    method.check_setup(batch)
    ckpt_path = _resume_path(out, resume)
    state = load_checkpoint(ckpt_path) if ckpt_path is not None else None

    if world > 1:
        method = convert_sync_batchnorm(method, device)
    method.to(device)
    sampler = GlobalBatchSampler(len(dataset), batch // world, seed=cfg.train.seed, rank=D.rank(), world_size=world)
    steps_per_epoch = sampler.steps_per_epoch
    loader = build.make_loader(dataset, batch // world, cfg.data.num_workers, device, drop_last=True,
                               sampler=sampler, generator=torch.Generator().manual_seed(cfg.train.seed + D.rank()))
    sched = make_schedules(cfg, steps_per_epoch)
    optimizer = build_adamw(method.trainable_modules(), sched.lr[0], cfg.train.weight_decay,
                            cfg.train.betas, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, global_step = 0, 0
    if state is not None:
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_epoch, global_step = state["epoch"], state["global_step"]
        log(f"resumed from {ckpt_path} at epoch {start_epoch}, step {global_step}")
        del state
    model = D.wrap_ddp(method, device)

    logger = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
        logger = MetricsLogger(out)
    n_params = sum(p.numel() for p in method.backbone.parameters()) / 1e6
    log(f"{cfg.method.name} | backbone {cfg.model.backbone} ({n_params:.1f}M) | {len(dataset)} images | "
        f"batch {batch}" + (f" ({world} x {batch // world})" if world > 1 else "")
        + f" | {steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs | device {device} | "
        f"amp {amp_dtype or 'off'} | output {out}")

    last_step = sched.total_steps if cfg.train.max_steps <= 0 else min(sched.total_steps, cfg.train.max_steps)
    progress = Progress(last_step, global_step, cfg.train.log_every, enabled=main)
    results: dict = {}
    method.train()
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            if global_step >= last_step:
                break
            # The data order depends only on (seed, epoch), so a resumed run sees the same batches.
            sampler.set_epoch(epoch, start_step=global_step - epoch * steps_per_epoch)
            tick, seen = time.time(), 0
            for views, _ in loader:
                lr = sched.lr[global_step]
                views = [v.to(device, non_blocking=True) for v in views]
                outputs = train_step(model, views, optimizer, scaler, lr, cfg.train.clip_grad, amp_dtype)
                global_step += 1
                extra = method.on_step_end(global_step, sched.total_steps)
                seen += views[0].shape[0] * world

                if global_step % cfg.train.log_every == 0 or global_step == last_step:
                    # The only host synchronisation: every log_every steps, averaged over ranks.
                    values = {k: D.mean_across_ranks(v.detach().float()).item() for k, v in outputs.items()}
                    if not math.isfinite(values["loss"]):
                        raise FloatingPointError(f"loss is {values['loss']} at step {global_step}; lower "
                                                 "train.lr or use train.amp=off to find the cause")
                    img_s = seen / max(time.time() - tick, 1e-9)
                    if logger:
                        logger.log("train", global_step, epoch=round(global_step / steps_per_epoch, 3), lr=lr,
                                   img_per_s=img_s, **values, **extra)
                    progress.update(global_step, epoch=f"{global_step / steps_per_epoch:.2f}",
                                    loss=values["loss"], lr=lr, **{"img/s": round(img_s, 1)})
                    tick, seen = time.time(), 0
                else:
                    progress.update(global_step)
                if global_step >= last_step:
                    break

            finished_epoch = global_step % steps_per_epoch == 0
            done_epochs = global_step // steps_per_epoch
            is_last = global_step >= last_step
            if main and (is_last or (finished_epoch and done_epochs % cfg.train.save_every == 0)):
                ckpt = {
                    "method": method.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "rng": rng_state(), "epoch": done_epochs,
                    "global_step": global_step, "config": to_dict(cfg),
                }
                save_checkpoint(ckpt, out / LATEST)
                if cfg.train.keep_every and finished_epoch and done_epochs % cfg.train.keep_every == 0:
                    save_checkpoint(ckpt, out / numbered_name(done_epochs))
            due = cfg.train.knn_every > 0 and finished_epoch and done_epochs % cfg.train.knn_every == 0
            if knn_enabled and (due or is_last):
                results = run_knn(cfg, method.backbone, device, amp_dtype)
                if logger:
                    logger.log("knn", global_step, epoch=done_epochs, **results)
                progress.write(f"k-NN after epoch {done_epochs}: " + _fmt(results))
                method.train()
    finally:
        progress.close()
        if logger:
            logger.close()
    D.barrier()
    log(f"done: {global_step} steps; checkpoint {out / LATEST}"
        + (f"; k-NN: {_fmt(results)}" if results else ""))
    return {"global_step": global_step, **results}


def _resume_path(out: Path, resume: bool | str) -> Path | None:
    if not resume:
        return None
    if resume is True:
        path = out / LATEST
        if not path.is_file():
            raise CheckpointError(f"--resume: no {LATEST} in output_dir={out}; start without --resume or set "
                                  "output_dir to the run to continue.")
        return path
    return Path(resume)


def _fmt(results: dict) -> str:
    return "  ".join(f"{k} {v:.2f}" for k, v in results.items() if "top1" in k)
