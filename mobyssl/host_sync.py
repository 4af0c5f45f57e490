"""Find where a piece of torch code makes the host wait for the device, on any device, CPU included.

On a GPU, an op whose result size or value the host must know (``.item()``, ``bool(t)``, ``nonzero``, indexing with
a boolean mask) stalls the Python thread until the device has finished all queued work, so the host stops queueing
ahead. ``torch.cuda.set_sync_debug_mode`` reports those only on CUDA; this dispatch mode records the same ops on any
device, so a CPU test can prove that a training-step piece never waits (see tests/test_host_sync.py).
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# Ops whose output the host must read back (a Python scalar, or a size only known after the computation).
_ALWAYS_SYNC = {
    _aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t), .tolist() element by element
    _aten.is_nonzero.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten.equal.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
}


def _indexes_with_a_mask(func, args) -> bool:
    """``t[mask]`` and ``t[mask] = v`` dispatch as ``index`` / ``index_put`` with a boolean index, which the
    kernel turns into ``nonzero`` below the dispatcher."""
    if func.overloadpacket not in (_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _repeats_without_size(func, kwargs) -> bool:
    return func.overloadpacket is _aten.repeat_interleave and kwargs.get("output_size") is None


class HostSyncCounter(TorchDispatchMode):
    """Counts, by op name, the ops run inside ``with HostSyncCounter() as syncs:`` that make the host wait for the
    device. ``syncs.total`` is their number; ``syncs.counts`` a ``Counter`` of op names."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ALWAYS_SYNC or _indexes_with_a_mask(func, args) or _repeats_without_size(func, kwargs):
            self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **kwargs)


def cuda_syncs(function, *args, **kwargs) -> tuple[object, int]:
    """``function(*args, **kwargs)`` under CUDA's own sync detector (``torch.cuda.set_sync_debug_mode``): returns its
    result and how many times it made the host wait for the GPU. CUDA only: the detector sees nothing elsewhere."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = function(*args, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchroniz" in str(w.message) for w in caught)
