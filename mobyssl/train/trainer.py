"""The pre-training loop, shared by every method.

Per step: lr from a precomputed per-iteration schedule, forward of the method on a list of
views under autocast, backward (through a grad scaler for fp16), gradient clipping, optimizer
step, then ``method.on_step_end`` (momentum updates). Checkpoints hold everything needed to
continue the same trajectory: weights, heads, queues, step counter, optimizer, scaler and RNG states;
the data order and each sample's augmentation are functions of (seed, epoch, index).

One code path serves one process and ``torchrun``: ``train.batch_size`` is the global batch, each
rank takes its slice of every global batch, BatchNorms are synchronised, the method is wrapped in
DistributedDataParallel, and only rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import build
from .. import distributed as D
from ..config import BUNDLED_TEST, Config, to_dict, to_yaml, validate
from ..data import DataError
from ..errors import CheckpointError, ConfigError, MobysslError
from ..eval.runner import run_knn
from ..methods import Method
from ..models.momentum import copy_weights
from ..models.sync_bn import convert_sync_batchnorm
from ..runtime import autocast, resolve_amp, resolve_device, rng_state, seed_everything, set_rng_state
from .checkpoint import (
    DIAGNOSTIC,
    backbone_state_dict,
    check_finite,
    find_resumable,
    load_backbone_weights,
    load_checkpoint,
    save_checkpoint,
    write_run_checkpoint,
)
from .compat import check_resume_changes, config_changes
from .guards import BadDataMonitor, CollapseMonitor, NonFiniteGuard, StopSignals, TrainingInterrupted
from .logging import MetricsLogger, Progress
from .optim import build_adamw, clip_each_gradient_, warmup_cosine
from .rundir import RunLock, acquire_writable, check_fresh_output_dir


class TrainingDiverged(MobysslError, FloatingPointError):
    """Too many steps in a row with a non-finite loss or gradient; a diagnostic checkpoint was written."""


@dataclass
class ResumePoint:
    """A checkpoint to continue from: its path and its loaded state."""

    path: Path
    state: dict

    def config(self) -> dict:
        saved = self.state.get("config")
        if not isinstance(saved, dict):
            raise CheckpointError(f"{self.path} stores no config; pass --config with the recipe the run was "
                                  "started with (and its overrides)")
        return copy.deepcopy(saved)


def find_resume_point(output_dir, resume: bool | str, log=print) -> ResumePoint:
    """``resume=True``: the newest checkpoint in ``output_dir`` that loads; a path: that checkpoint."""
    if resume is True:
        found = find_resumable(output_dir, log)
        if found is None:
            raise CheckpointError(f"--resume: no checkpoint that loads in output_dir={output_dir}; start without "
                                  "--resume or set output_dir to the run to continue.")
        return ResumePoint(*found)
    return ResumePoint(Path(resume), load_checkpoint(resume))


@dataclass
class Schedules:
    """Per-step values, indexed by the 0-based step about to run. ``weight_decay`` is None when constant."""

    lr: list
    total_steps: int
    steps_per_epoch: int
    weight_decay: list | None = None


def make_schedules(cfg: Config, steps_per_epoch: int, warmup_ends_at_peak: bool = False) -> Schedules:
    """The run's per-step lr (and weight decay) schedules; ``warmup_ends_at_peak``: the method's
    ``Method.warmup_ends_at_peak`` (DINO's warm-up form)."""
    t = cfg.train
    scale = t.batch_size / t.lr_ref_batch
    total = t.epochs * steps_per_epoch
    lr = warmup_cosine(t.lr * scale, t.min_lr * scale, total, int(round(t.warmup_epochs * steps_per_epoch)),
                       t.warmup_lr * scale, warmup_ends_at_peak)
    wd = None if t.weight_decay_end is None else warmup_cosine(t.weight_decay, t.weight_decay_end, total).tolist()
    return Schedules(lr=lr.tolist(), total_steps=total, steps_per_epoch=steps_per_epoch, weight_decay=wd)


def write_pictures(method, views: list, folder: Path, epoch: int, warn=print) -> list[Path]:
    """``method.pictures(views)`` as ``folder/<name>_epochNNNNN.png``, drawn in eval mode without gradients and with
    the RNG states (CPU and the views' GPU) restored, so the training trajectory does not depend on it. A failure
    to write is reported with ``warn`` and training goes on."""
    from torchvision.utils import save_image

    device = views[0].device
    was_training = method.training
    method.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            pictures = method.pictures(views)
    finally:
        method.train(was_training)
    written = []
    for name, image in pictures.items():
        path = folder / f"{name}_epoch{epoch:05d}.png"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            save_image(image.float().clamp(0, 1).cpu(), path)
            written.append(path)
        except OSError as e:
            warn(f"warning: could not write {path}: {e}; training goes on")
    return written


def train_step(model, views: list, optimizer, scaler, lr: float, clip_grad: float | None,
               amp_dtype=None, accum_steps: int = 1, *, weight_decay: float | None = None,
               clip_mode: str = "global", epoch: int = 0) -> tuple[dict, torch.Tensor]:
    """One optimizer step of ``model`` (the method, or its DDP wrapper) on ``views``.

    ``weight_decay``: this step's decay of the decayed parameter group (None: left as built). ``clip_mode``:
    ``global`` clips the norm of all gradients together, ``per_parameter`` each gradient tensor on its own.
    After the backward pass the method's ``on_after_backward(epoch)`` may drop gradients (a parameter whose
    gradient is None is skipped by the optimizer: no update, no decay, no moment).

    With ``accum_steps > 1`` the batch is split into micro-batches whose gradients add up (DDP
    synchronises only the last); the method's buffers (queues) update once, after the last one.
    Returns the outputs (averaged over micro-batches) and ``ok``, a 0-d bool tensor on the device: False
    when the loss or the gradient norm is not finite, in which case the optimizer step was skipped.
    Momentum updates are the caller's (``method.on_step_end(..., apply=ok)``), so they are skipped with it.
    ``scaler`` comes from ``make_scaler``.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # lr_scale: layer-wise decay (fine-tuning's groups)
    if weight_decay is not None:
        optimizer.param_groups[0]["weight_decay"] = weight_decay  # build_adamw's group 0 is the decayed one
    optimizer.zero_grad(set_to_none=True)
    method = getattr(model, "module", model)
    if accum_steps == 1:
        with autocast(views[0].device, amp_dtype):
            outputs = model(views)
        scaler.scale(outputs["loss"]).backward()
    else:
        chunks = list(zip(*(v.chunk(accum_steps) for v in views)))
        parts = []
        with method.accumulate():
            for i, micro in enumerate(chunks):
                sync = contextlib.nullcontext() if i == len(chunks) - 1 or not hasattr(model, "no_sync") \
                    else model.no_sync()
                with sync:
                    with autocast(views[0].device, amp_dtype):
                        out = model(list(micro))
                    scaler.scale(out["loss"] / len(chunks)).backward()
                parts.append({k: v.detach() for k, v in out.items()})
        outputs = {k: torch.stack([p[k] for p in parts]).mean() for k in parts[0]}
    scaler.unscale_(optimizer)  # also finds inf/NaN gradients, on the device
    method.on_after_backward(epoch)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if clip_mode == "per_parameter":
        grad_norm = clip_each_gradient_(params, clip_grad or math.inf)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad or math.inf)
    # The scaler skips the optimizer step when gradients are not finite; with a fused optimizer the
    # decision stays on the device (no host synchronisation). Only fp16 needs a real loss scale.
    scaler.step(optimizer)
    scaler.update() if amp_dtype == torch.float16 else scaler.update(1.0)
    ok = torch.isfinite(outputs["loss"].detach()) & torch.isfinite(grad_norm)
    return outputs, ok


def make_scaler(device: torch.device, amp_dtype) -> torch.amp.GradScaler:
    """fp16: a dynamic loss scale. Otherwise a constant scale of 1, used only to skip non-finite steps."""
    if amp_dtype == torch.float16:
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**30)


def pretrain(cfg: Config, resume: bool | str | ResumePoint = False, log=print, accept_changes: bool = False,
             dry_run: bool = False) -> dict:
    """Pre-train ``cfg.method`` on ``cfg.data.train``; returns the final metrics.

    ``resume``: False, True (the newest checkpoint in ``output_dir`` that loads), a checkpoint path, or a
    ``ResumePoint``. A resume whose config differs from the checkpoint's in keys that change the run is refused
    unless ``accept_changes``. ``dry_run``: every check (config, data, model, output_dir), then return without
    writing anything.
    """
    validate(cfg)
    device = D.init_distributed(resolve_device(cfg.train.device))
    amp_dtype = resolve_amp(cfg.train.amp, device)
    seed_everything(cfg.train.seed + D.rank())  # own drop-path stream per rank; DDP copies rank 0's weights
    out = Path(cfg.output_dir)
    main = D.is_main_process()
    world = D.world_size()
    log = log if main else (lambda *a, **k: None)

    # Everything that can be wrong with the input fails here, on every rank, before any training.
    D.check_same_config(to_dict(cfg))
    batch = cfg.train.batch_size
    if batch % world:
        raise ConfigError(f"train.batch_size={batch} is the global batch and must be divisible by the "
                         f"number of processes ({world}); use a multiple of {world}.")
    accum = cfg.train.accum_steps
    if (batch // world) % accum or batch // world // accum < 2:
        raise ConfigError(f"train.batch_size={batch} over {world} process(es) and train.accum_steps={accum} gives "
                         f"micro-batches of {batch / world / accum:g} images; they must be whole and at least 2 "
                         "(BatchNorm in the heads). Raise train.batch_size or lower train.accum_steps.")
    dataset = D.on_every_rank_then_agree(lambda: build.build_train_dataset(cfg, D.rank(), world))  # own shards
    sampler = build.build_train_sampler(cfg, dataset, batch // world)
    if sampler.steps_per_epoch == 0:
        what = (f"has {len(dataset)} images" if world == 1 else
                f"gives a process too few images ({dataset.dataset.summary()})")
        raise DataError(f"data.train={cfg.data.train} {what}, fewer than one batch "
                        f"(train.batch_size={batch}{f' over {world} processes' if world > 1 else ''}); lower "
                        "train.batch_size.")
    eval_sets = _eval_sets_for_knn(cfg, log) if cfg.train.knn_every >= 0 and cfg.data.test else None
    method = build.build_method(cfg)
    method.check_setup(batch)
    if cfg.train.grad_checkpointing:
        method.trained_backbone.set_grad_checkpointing(True)
    point = _resume_point(cfg, out, resume, accept_changes, log)
    if point is None:
        D.on_main_then_agree(lambda: check_fresh_output_dir(out))
        if cfg.model.init:
            init_backbone(method, cfg.model.init, log)
    if dry_run:
        return {"global_step": point.state.get("global_step", 0) if point else 0,
                "steps_per_epoch": sampler.steps_per_epoch}
    # One run per output_dir: rank 0 holds the lock; a new run re-checks the folder under it (another run may have
    # started meanwhile). Every rank stops if rank 0 cannot.
    lock = RunLock(out, fresh=point is None or point.path.resolve().parent != out.resolve())
    D.on_main_then_agree(lambda: acquire_writable(lock))
    status = {"steps": 0}
    try:
        return _train(cfg, out, device, amp_dtype, dataset, sampler, eval_sets, method, point, log, status)
    except BaseException:
        if status["steps"] == 0:
            lock.undo_new_run()  # a new run that failed before its first step leaves the folder as it found it
        raise
    finally:
        lock.release()


def _eval_sets_for_knn(cfg: Config, log):
    """The k-NN splits of the in-run evaluation. When they do not fit data.train (no class folders, other classes)
    and data.test is the bundled sample the quickstart sets, the user is pre-training on their own images and did
    not ask for this evaluation: it is switched off with a notice saying how to get one. A data.test the user
    chose fails as before."""
    try:
        return build.build_eval_datasets(cfg)
    except DataError as e:
        if cfg.data.test != BUNDLED_TEST or cfg.data.eval_train:
            raise
        log(f"note: k-NN during training is off: {e} (data.test is the bundled CIFAR-10 sample, the quickstart's "
            "default.) To evaluate your own data, set data.test=<labelled test split>, and data.eval_train=<labelled "
            "train split> when data.train has no class folders; or evaluate later with `mobyssl knn --checkpoint "
            "...` and those keys.")
        return None


def _resume_point(cfg: Config, out: Path, resume, accept_changes: bool, log) -> ResumePoint | None:
    """The checkpoint to continue from (None for a new run), after checking its config against ``cfg``."""
    if not resume:
        return None
    point = resume if isinstance(resume, ResumePoint) else find_resume_point(out, resume, log)
    check_finite(point.state.get("method", {}), point.path)
    check_resume_changes(config_changes(point.config(), cfg), point.path, accept_changes, log)
    if point.path.resolve().parent != out.resolve():
        D.on_main_then_agree(lambda: check_fresh_output_dir(out))  # another run's checkpoint, continued elsewhere
    return point


def _train(cfg: Config, out: Path, device, amp_dtype, dataset, sampler, eval_sets, method, point: ResumePoint | None,
           log, status: dict) -> dict:
    main = D.is_main_process()
    world = D.world_size()
    batch, accum = cfg.train.batch_size, cfg.train.accum_steps
    knn_enabled = eval_sets is not None
    if world > 1:
        method = convert_sync_batchnorm(method, device)
    method.to(device)
    steps_per_epoch = sampler.steps_per_epoch
    if cfg.data.pipeline != "cpu":
        loader = build.device_loader(cfg, dataset.dataset, sampler, batch // world, device)
    else:
        # A private generator: creating the loader's iterator (it draws worker seeds) must not move the
        # global RNG that drop path uses, or a resumed run would diverge from an uninterrupted one.
        loader = build.make_loader(dataset, batch // world, cfg.data.num_workers, device, drop_last=True,
                                   sampler=sampler, generator=torch.Generator().manual_seed(cfg.train.seed))
    sched = make_schedules(cfg, steps_per_epoch, method.warmup_ends_at_peak)
    optimizer = build_adamw(method.trainable_modules(), sched.lr[0], cfg.train.weight_decay,
                            cfg.train.betas, device, decay_all=method.decay_every_parameter)
    scaler = make_scaler(device, amp_dtype)

    last_step = sched.total_steps if cfg.train.max_steps <= 0 else min(sched.total_steps, cfg.train.max_steps)
    start_epoch, global_step = 0, 0
    if point is not None:
        global_step = load_training_state(point.state, point.path, method, optimizer, scaler)
        start_epoch = global_step // steps_per_epoch
        if global_step >= last_step:
            log(f"nothing to train: {point.path} is at step {global_step} and this run ends at step {last_step} "
                f"(train.epochs={cfg.train.epochs}, train.max_steps={cfg.train.max_steps}). To train longer, raise "
                "train.epochs (with --accept-changes) or train.max_steps.")
            return {"global_step": global_step, "trained_steps": 0}
        log(f"resumed from {point.path} at step {global_step} (epoch {global_step / steps_per_epoch:.2f})")
    first_step = global_step
    model = D.wrap_ddp(method, device)
    if cfg.train.compile:
        model = torch.compile(model)

    logger = None
    if main:  # check_output_dir_writable created output_dir
        _write_config(out, cfg, point, global_step)
        logger = MetricsLogger(out)
    n_params = sum(p.numel() for p in method.backbone.parameters()) / 1e6
    log(f"{cfg.method.name} | backbone {cfg.model.backbone} ({n_params:.1f}M) | {dataset.dataset.summary()} | "
        f"batch {batch}" + (f" ({world} x {batch // world})" if world > 1 else "")
        + f" | {steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs | device {device} | "
        f"amp {amp_dtype or 'off'} | output {out}")

    saved = {"path": None, "step": None}  # the newest checkpoint this run wrote

    def save(path_fn=None) -> bool:
        """Rank 0 writes a checkpoint (every rank calls this: RNG states are gathered); a failed write is
        reported and the previous checkpoint stays intact. Returns whether it was written."""
        rng = D.gather_objects(rng_state())
        if not main:
            return True
        ckpt = {"method": method.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "rng": rng, "epoch": global_step // steps_per_epoch,
                "global_step": global_step, "config": to_dict(cfg)}
        try:
            if path_fn is not None:
                save_checkpoint(ckpt, path_fn)
                return True
            done = global_step // steps_per_epoch
            keep = done if (cfg.train.keep_every and global_step % steps_per_epoch == 0
                            and done % cfg.train.keep_every == 0) else None
            saved["path"] = write_run_checkpoint(ckpt, out, global_step, cfg.train.keep_last, keep_epoch=keep,
                                                 log=progress.write)
            saved["step"] = global_step
            return True
        except OSError as e:
            previous = f"the previous checkpoint ({saved['path']}) is intact" if saved["path"] else \
                "no checkpoint of this run was written yet"
            progress.write(f"warning: could not write a checkpoint at step {global_step} "
                           f"({getattr(e, 'strerror', None) or e}); {previous}. Free disk space or fix {out}; "
                           "training continues.")
            return False

    progress = Progress(last_step, global_step, cfg.train.log_every, enabled=main)
    nonfinite = NonFiniteGuard(cfg.train.max_bad_steps)
    bad_data = BadDataMonitor(cfg.data.max_bad_fraction, cfg.data.train, min_images=min(200, len(dataset)))
    collapse = CollapseMonitor()
    results: dict = {}
    method.train()
    try:
        with StopSignals() as stop_signals:
            for epoch in range(start_epoch, cfg.train.epochs):
                if global_step >= last_step:
                    break
                # Data order and augmentations depend only on (seed, epoch, index): a resumed run sees the same.
                sampler.set_epoch(epoch, start_step=global_step - epoch * steps_per_epoch)
                tick, seen = time.time(), 0
                for views, _, failed in loader:
                    bad_data.update(len(views[0]), failed, progress.write)
                    lr = sched.lr[global_step]
                    wd = sched.weight_decay[global_step] if sched.weight_decay else None
                    views = [v.to(device, non_blocking=True) for v in views]
                    if (main and cfg.train.pictures_every and global_step % steps_per_epoch == 0
                            and epoch % cfg.train.pictures_every == 0):
                        write_pictures(method, views, out / "pictures", epoch, progress.write)
                    method.on_step_start(global_step, sched.total_steps, steps_per_epoch)
                    outputs, ok = train_step(model, views, optimizer, scaler, lr, cfg.train.clip_grad, amp_dtype, accum,
                                             weight_decay=wd, clip_mode=cfg.train.clip_mode, epoch=epoch)
                    global_step += 1
                    status["steps"] += 1
                    extra = method.on_step_end(global_step, sched.total_steps, apply=ok)
                    nonfinite.record(ok)  # on the device: checked below, where the host waits anyway
                    seen += views[0].shape[0] * world
                    is_last = global_step >= last_step
                    end_of_epoch = global_step % steps_per_epoch == 0
                    log_due = global_step % cfg.train.log_every == 0 or is_last
                    save_due = (is_last
                                or (cfg.train.save_every_steps and global_step % cfg.train.save_every_steps == 0)
                                or (end_of_epoch and (global_step // steps_per_epoch) % cfg.train.save_every == 0))
                    # Ranks agree on a stop signal every step only where that costs nothing (one process).
                    stop = stop_signals.signum is not None
                    if world > 1:
                        stop = (log_due or save_due) and D.any_rank(stop, device)
                    if log_due or save_due or stop:
                        if not nonfinite.check(global_step, progress.write):
                            wrote = save(out / DIAGNOSTIC)
                            raise TrainingDiverged(nonfinite.message(out / DIAGNOSTIC if wrote else None))

                    if log_due:
                        values = {k: D.mean_across_ranks(v.detach().float()).item() for k, v in outputs.items()}
                        img_s = seen / max(time.time() - tick, 1e-9)
                        if logger:
                            logger.log("train", global_step, epoch=round(global_step / steps_per_epoch, 3), lr=lr,
                                       **({"weight_decay": wd} if wd is not None else {}), img_per_s=img_s, skipped_steps=nonfinite.total,
                                       skipped_images=bad_data.failed, **values, **extra)
                        collapse.check(method.collapse_signs(values), global_step, progress.write)
                        progress.update(global_step, epoch=f"{global_step / steps_per_epoch:.2f}",
                                        loss=values["loss"], lr=lr, **{"img/s": round(img_s, 1)})
                        tick, seen = time.time(), 0
                    else:
                        progress.update(global_step)
                    # During a run of skipped steps keep the last good file; on SIGTERM / Ctrl-C keep this step.
                    if (save_due or stop) and nonfinite.consecutive == 0:
                        save()
                    if stop:
                        raise TrainingInterrupted(stop_signals.signum or signal.SIGTERM, global_step, saved["path"],
                                                  saved["step"])
                    if is_last:
                        break

                done_epochs = global_step // steps_per_epoch
                due = (cfg.train.knn_every > 0 and global_step % steps_per_epoch == 0
                       and done_epochs % cfg.train.knn_every == 0)
                if knn_enabled and (due or global_step >= last_step):
                    skipped: dict = {}
                    results = run_knn(cfg, method.backbone, device, amp_dtype, eval_sets, skipped=skipped)
                    if logger:
                        unreadable = sum(skipped.values())
                        logger.log("knn", global_step, epoch=done_epochs, **results,
                                   **({"skipped_images": unreadable} if unreadable else {}))
                    progress.write(f"k-NN at epoch {global_step / steps_per_epoch:g} (step {global_step}): "
                                   + _fmt(results))
                    method.train()
    finally:
        progress.close()
        if logger:
            logger.close()
    D.barrier()
    trained = global_step - first_step
    if main and saved["step"] != global_step:
        where = (f"the newest checkpoint is {saved['path']} (step {saved['step']})" if saved["path"] else
                 "no checkpoint of this run was written")
        if nonfinite.consecutive:
            raise TrainingDiverged(f"trained to step {global_step}, but the last {nonfinite.consecutive} step(s) had a "
                                   f"NaN/Inf loss or gradient, so their state was not saved; {where}. Lower train.lr or "
                                   "raise train.warmup_epochs, then resume.")
        raise CheckpointError(f"trained {trained} steps (to step {global_step}) but the final checkpoint could not "
                              f"be written; {where}. Free disk space in {out}, then resume.")
    log(f"done: trained {trained} steps (to step {global_step}); checkpoint {saved['path']}"
        + (f"; k-NN: {_fmt(results)}" if results else "")
        + (f"; skipped {bad_data.failed} unreadable images" if bad_data.failed else ""))
    return {"global_step": global_step, "trained_steps": trained, **results}


def init_backbone(method: Method, path: str, log=print) -> None:
    """``model.init``: the trained backbone starts from the weights in ``path`` (any layout
    :func:`backbone_state_dict` reads), and so does every momentum copy of it (MoBY's target encoder, DINO's
    teacher); heads, queues and centres keep their fresh initialisation."""
    source = f"model.init={path}"
    try:
        sd = backbone_state_dict(load_checkpoint(path), source)
    except CheckpointError as e:
        raise CheckpointError(f"config key 'model.init': {e}") from None
    online = method.trained_backbone
    load_backbone_weights(online, sd, source)
    for module, momentum_copy in method.momentum_pairs():
        if module is online:
            copy_weights(module, momentum_copy)
    log(f"backbone initialised from {path} ({len(sd)} tensors)")


def load_training_state(state: dict, path, model, optimizer, scaler, key: str = "method",
                        what: str = "pre-training", command: str = "mobyssl pretrain",
                        fix: str = "Resume with the config it was trained with (omit --config: the checkpoint's own "
                                   "config is used).") -> int:
    """Load a checkpoint's training state (``state[key]``: the trained module's weights; the optimizer, grad scaler
    and this rank's RNG states) into freshly built objects; returns its step."""
    missing = [k for k in (key, "optimizer", "scaler", "rng", "global_step") if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a {what} checkpoint of mobyssl (no {', '.join(missing)}); --resume "
                              f"needs a checkpoint_*.pth written by `{command}`.")
    check_finite(state[key], path)
    try:
        model.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} does not fit the model this config builds "
                              f"({str(e).strip().splitlines()[0][:200]}). {fix}") from None
    rng = state["rng"]  # one state per rank that saved it
    set_rng_state(rng[D.rank()] if D.rank() < len(rng) else rng[0])
    return int(state["global_step"])


def _write_config(out: Path, cfg: Config, point: ResumePoint | None, step: int) -> None:
    """``config.yaml`` holds the config a run started with and is never replaced; a resume with another
    config (accepted changes) records it beside, as ``config_step<N>.yaml``."""
    first = out / "config.yaml"
    if not first.exists():
        first.write_text(to_yaml(cfg))
    elif point is not None and config_changes(point.config(), cfg):
        (out / f"config_step{step:08d}.yaml").write_text(to_yaml(cfg))


def _fmt(results: dict) -> str:
    return "  ".join(f"{k} {v:.2f}" for k, v in results.items() if "top1" in k)
