import pytest
import torch

from mobyssl import runtime


def test_amp_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.resolve_amp("auto", cpu) is None
    assert runtime.resolve_amp("off", cuda) is None
    assert runtime.resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="train.amp=fp16 needs a CUDA device"):
        runtime.resolve_amp("fp16", cpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert runtime.resolve_amp("auto", cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert runtime.resolve_amp("auto", cuda) is torch.float16  # older GPUs: fp16 with a grad scaler


def test_device_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        runtime.resolve_device("cuda")


def test_rng_state_round_trip():
    import random

    import numpy as np

    runtime.seed_everything(3)
    state = runtime.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    runtime.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_device_constant_is_made_once_per_values_device_and_dtype():
    from mobyssl.runtime import device_constant

    a = device_constant((0.5, 0.25), torch.device("cpu"))
    assert torch.equal(a, torch.tensor([0.5, 0.25])) and a.dtype == torch.float32
    assert device_constant((0.5, 0.25), torch.device("cpu")) is a  # cached: no copy per call
    b = device_constant((0.5, 0.25), torch.device("cpu"), torch.float64)
    assert b is not a and b.dtype == torch.float64
    assert torch.equal(device_constant((1, 2), torch.device("cpu"), torch.long), torch.tensor([1, 2]))
