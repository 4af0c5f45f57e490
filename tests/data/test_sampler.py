import torch

from mobyssl.data.sampler import GlobalBatchSampler


def _batches(sampler, batch):
    idx = list(sampler)
    return [idx[i:i + batch] for i in range(0, len(idx), batch)]


def test_one_epoch_is_a_permutation_without_the_remainder():
    s = GlobalBatchSampler(103, 10, seed=1)
    idx = list(s)
    assert len(idx) == len(s) == 100 and len(set(idx)) == 100 and s.steps_per_epoch == 10


def test_epochs_differ_and_are_reproducible():
    s = GlobalBatchSampler(50, 5, seed=3)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    assert list(s) != e0
    s.set_epoch(0)
    assert list(s) == e0


def test_ranks_split_each_global_batch_like_a_single_process():
    single = _batches(GlobalBatchSampler(64, 8, seed=0), 8)
    r0 = _batches(GlobalBatchSampler(64, 4, seed=0, rank=0, world_size=2), 4)
    r1 = _batches(GlobalBatchSampler(64, 4, seed=0, rank=1, world_size=2), 4)
    assert len(single) == len(r0) == len(r1) == 8
    for step in range(8):
        assert r0[step] + r1[step] == single[step]


def test_mid_epoch_start_skips_done_steps():
    s = GlobalBatchSampler(40, 4, seed=0)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_step=3)
    assert list(s) == full[12:] and len(s) == 28


def test_sampler_drives_a_dataloader():
    s = GlobalBatchSampler(20, 5)
    loader = torch.utils.data.DataLoader(list(range(20)), batch_size=5, sampler=s, drop_last=True)
    got = torch.cat(list(loader)).tolist()
    assert got == list(s)
