"""torch.distributed set-up and helpers; every helper is a no-op in a single process.

Launch with ``torchrun`` (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL on GPUs,
gloo on CPU. Without those variables everything runs as one process with no process group.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .errors import ConfigError, MobysslError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (once); returns this process's device."""
    if not launched_by_torchrun():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not is_distributed():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return device


def check_same_config(config: dict) -> None:
    """Raise on every rank if the ranks were started with different configs (instead of hanging later)."""
    if not is_distributed():
        return
    import json

    mine = json.dumps(config, sort_keys=True)
    every = [None] * world_size()
    dist.all_gather_object(every, mine)
    differing = [r for r, c in enumerate(every) if c != every[0]]
    if differing:
        a, b = json.loads(every[0]), json.loads(every[differing[0]])
        keys = _diff_keys(a, b)
        raise ConfigError(f"ranks {differing} were started with a config that differs from rank 0's "
                         f"(keys: {', '.join(keys[:5])}); start every rank with the same recipe and overrides.")


def _diff_keys(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def on_main_then_agree(check) -> None:
    """Run ``check()`` on rank 0; if it raises a ``MobysslError``, every rank raises it (rather than hanging in the
    next collective while rank 0 exits). A no-op wrapper in one process."""
    error = None
    if is_main_process():
        try:
            check()
        except MobysslError as e:
            error = e
    if is_distributed():
        box = [None if error is None else (type(error), str(error))]
        dist.broadcast_object_list(box, src=0)
        if error is None and box[0] is not None:
            error = box[0][0](box[0][1])
    if error is not None:
        raise error


def on_every_rank_then_agree(fn):
    """Run ``fn()`` on every rank and return its result; if it raises a ``MobysslError`` on any rank, every rank
    raises the first such error (naming the rank), rather than the others hanging in the next collective. For work
    that differs by rank, such as opening each rank's own data shards. A plain call in one process."""
    if not is_distributed():
        return fn()
    result, error = None, None
    try:
        result = fn()
    except MobysslError as e:
        error = e
    errors = gather_objects(None if error is None else (type(error), str(error)))
    for r, e in enumerate(errors):
        if e is not None:
            raise error if r == rank() else e[0](f"process {r}: {e[1]}")
    return result


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order); ``x`` itself in one process."""
    with torch.no_grad():  # in the body: mutation testing skips decorated functions
        if not is_distributed():
            return x
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)


def gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Like ``gather_no_grad`` for per-rank tensors whose first dimension differs between ranks."""
    with torch.no_grad():  # in the body: mutation testing skips decorated functions
        if not is_distributed():
            return x
        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(world_size())]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        out = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(out, padded)
        return torch.cat([o[:s] for o, s in zip(out, sizes)], dim=0)


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank; ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (a collective: call it on all ranks)."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def mean_across_ranks(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size()


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel under torchrun, ``module`` itself otherwise.

    Buffers are not broadcast each step: queues receive the gathered keys and BatchNorms are
    synchronised, so they stay identical on every rank without it.
    """
    if not is_distributed() or world_size() == 1:
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # Newer PyTorch renames broadcast_buffers to forward_sync_buffers (buffers are still synced at start).
    params = inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)
