"""Device, precision and seeding."""

from __future__ import annotations

import contextlib
import functools
import os
import random

import numpy as np
import torch

from .errors import ConfigError


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """``model`` in eval mode (no dropout, drop path; BatchNorm running statistics) without gradients; the caller's
    mode comes back afterwards, also after an error."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


@functools.lru_cache(maxsize=256)
def device_constant(values: tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device``, made once per (values, device, dtype); do not modify it in place.

    Copying a Python list to a GPU goes through pageable host memory, which makes the host wait for all the
    work queued on the device; in a per-batch path that wait stops the host from running ahead of the GPU.
    """
    return torch.tensor(values, device=device, dtype=dtype)


def resolve_device(spec: str = "auto") -> torch.device:
    """``train.device`` -> a device that exists here (a clear ConfigError otherwise)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={spec} but CUDA is not available here; use train.device=cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={spec} but this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1}); use train.device=cuda "
                              "(under torchrun each process takes its LOCAL_RANK device)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"train.device={spec} but Apple's MPS backend is not available here; use train.device=cpu")
    return dev


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes: a GPU's own, the machine's RAM for the CPU; None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (AttributeError, ValueError, OSError):
            return None
    return None


def resolve_amp(spec: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device`` (None: full precision)."""
    if spec == "off":
        return None
    if spec == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if spec == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a CUDA device; on CPU use train.amp=bf16 or off")
    return torch.bfloat16 if spec == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states as tensors and plain Python values (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
