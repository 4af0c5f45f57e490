"""The host-sync counter flags exactly the ops that make the host wait for the device, on CPU too."""

import pytest
import torch

from mobyssl.host_sync import HostSyncCounter

x = torch.arange(12.0).view(3, 4)
mask = x > 5


@pytest.mark.parametrize("waits", [
    lambda: x.sum().item(),
    lambda: bool(x.sum() > 0),
    lambda: int(x[0, 0]),
    lambda: torch.nonzero(mask),
    lambda: x[mask],
    lambda: x.clone().__setitem__(mask, 0.0),
    lambda: x.masked_select(mask),
    lambda: torch.repeat_interleave(torch.tensor([1, 2])),
    lambda: torch.unique(x),
    lambda: torch.equal(x, x),
], ids=["item", "bool", "int", "nonzero", "mask-index", "mask-assign", "masked_select", "repeat_interleave",
        "unique", "equal"])
def test_ops_that_read_back_are_counted(waits):
    with HostSyncCounter() as syncs:
        waits()
    assert syncs.total >= 1, syncs.counts


def test_ops_that_stay_on_the_device_are_not_counted():
    with HostSyncCounter() as syncs:
        index = torch.tensor([2, 0])
        y = x[index] + x[:, index].sum()
        y = torch.where(mask[:2], y, 0.0).masked_fill(mask[:2], 1.0)
        y.scatter_add_(1, torch.zeros(2, 4, dtype=torch.long), y.clone())
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
        (y.sum() > 0).any()
    assert syncs.total == 0, syncs.counts


def test_counts_by_op_name():
    with HostSyncCounter() as syncs:
        x.sum().item()
        x.max().item()
        torch.nonzero(mask)
    assert syncs.counts == {"_local_scalar_dense": 2, "nonzero": 1}


@pytest.mark.gpu
def test_cuda_sync_detector_counts_a_read_back_and_nothing_else():
    from mobyssl.host_sync import cuda_syncs

    y = torch.arange(12.0, device="cuda")
    assert cuda_syncs(lambda: (y + 1).sum() * 2)[1] == 0
    value, waits = cuda_syncs(lambda: y.sum().item())
    assert value == 66.0 and waits >= 1
