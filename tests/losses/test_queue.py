"""FeatureQueue keeps non-finite keys out of the negatives.

Pinned behaviour (``FeatureQueue.enqueue``): the decision is per call and all-or-nothing. If any value of the
``(B, dim)`` keys is NaN or +-Inf, the B rows the keys would have overwritten keep their previous content
(bit for bit), and the pointer still advances by B, as for finite keys: the queue stays aligned with the step
count (and across ranks) without a host synchronisation, at the cost of keeping B old negatives one more round.
The next finite keys are written normally at the advanced pointer.
"""

import pytest
import torch
import torch.nn.functional as F

from mobyssl.losses import FeatureQueue, MoBYLoss


def _unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_enqueue_refuses_non_finite_keys_and_still_advances_the_pointer(bad):
    torch.manual_seed(0)
    q = FeatureQueue(dim=4, size=12)
    first = _unit(4, 4)
    q.enqueue(first)
    before = q.queue.clone()
    keys = _unit(4, 4)
    keys[2, 1] = bad  # one bad value in one row refuses the whole batch
    q.enqueue(keys)
    assert torch.equal(q.queue, before)  # rows 4-7 still hold what they held
    assert int(q.ptr) == 8  # the pointer advanced by the batch size all the same
    nxt = _unit(4, 4)
    q.enqueue(nxt)
    assert torch.equal(q.queue[8:], nxt)  # finite keys afterwards: written normally, at the advanced pointer
    assert torch.equal(q.queue[:8], before[:8])
    assert int(q.ptr) == 0
    # Wrapping around: the refused rows are overwritten by the next finite keys that reach them.
    q.enqueue(_unit(4, 4))
    last = _unit(4, 4)
    q.enqueue(last)
    assert torch.equal(q.queue[4:8], last) and int(q.ptr) == 8


def test_moby_loss_keeps_a_nan_target_out_of_its_queue_only():
    torch.manual_seed(0)
    crit = MoBYLoss(dim=8, queue_size=16, temperature=0.2)
    q1_before, q2_before = crit.queue_1.queue.clone(), crit.queue_2.queue.clone()
    p1, p2, t1, t2 = (torch.randn(4, 8) for _ in range(4))
    t1[1, 3] = float("nan")
    out = crit(p1, p2, t1, t2)
    assert not torch.isfinite(out["loss"])  # the trainer skips this step
    assert torch.equal(crit.queue_1.queue, q1_before) and int(crit.queue_1.ptr) == 4
    # The other view's keys are finite and are written as usual.
    assert torch.allclose(crit.queue_2.queue[:4], F.normalize(t2, dim=1)) and int(crit.queue_2.ptr) == 4
    assert torch.equal(crit.queue_2.queue[4:], q2_before[4:])
    # A finite step afterwards writes both queues at the advanced pointers.
    t1, t2 = torch.randn(4, 8), torch.randn(4, 8)
    crit(torch.randn(4, 8), torch.randn(4, 8), t1, t2)
    assert torch.allclose(crit.queue_1.queue[4:8], F.normalize(t1, dim=1))
    assert torch.allclose(crit.queue_2.queue[4:8], F.normalize(t2, dim=1))
    assert torch.equal(crit.queue_1.queue[:4], q1_before[:4]) and int(crit.queue_1.ptr) == 8


def test_deferred_keys_with_a_nan_micro_batch_are_refused_together():
    """Gradient accumulation: the keys of one optimizer step are enqueued at once, so one non-finite
    micro-batch keeps the whole step's keys of that view out (and the pointer advances by the whole step)."""
    torch.manual_seed(0)
    crit = MoBYLoss(dim=8, queue_size=16)
    q1_before = crit.queue_1.queue.clone()
    crit.defer_updates = True
    good = torch.randn(4, 8)
    bad = torch.randn(4, 8)
    bad[0, 0] = float("inf")
    t2 = [torch.randn(4, 8), torch.randn(4, 8)]
    crit(torch.randn(4, 8), torch.randn(4, 8), good, t2[0])
    crit(torch.randn(4, 8), torch.randn(4, 8), bad, t2[1])
    assert torch.equal(crit.queue_1.queue, q1_before) and int(crit.queue_1.ptr) == 0  # nothing before flush
    crit.defer_updates = False
    crit.flush()
    assert torch.equal(crit.queue_1.queue, q1_before) and int(crit.queue_1.ptr) == 8
    assert torch.allclose(crit.queue_2.queue[:8], F.normalize(torch.cat(t2), dim=1)) and int(crit.queue_2.ptr) == 8


def test_enqueue_stores_keys_in_the_queues_dtype():
    """Keys of another precision (bf16 from autocast into a float32 queue, or float32 into a queue cast to bf16)
    are converted to the queue's dtype and written in FIFO order."""
    for queue_dtype, key_dtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)):
        q = FeatureQueue(4, 8).to(queue_dtype)
        keys = F.normalize(torch.randn(4, 4), dim=1).to(key_dtype)
        q.enqueue(keys)
        assert q.queue.dtype == queue_dtype
        assert torch.equal(q.queue[:4], keys.to(queue_dtype)) and int(q.ptr) == 4


def test_enqueue_refuses_a_batch_that_does_not_tile_the_queue():
    """A batch size that does not divide the queue (remainder 1 or more) is a ConfigError naming both sizes."""
    from mobyssl.errors import ConfigError

    for size, batch in ((16, 5), (16, 6)):
        q = FeatureQueue(4, size)
        with pytest.raises(ConfigError, match=f"method.queue_size={size} is not a multiple of the global batch size "
                                              f"{batch}"):
            q.enqueue(torch.randn(batch, 4))
    FeatureQueue(4, 16).enqueue(torch.randn(8, 4))  # a divisor is fine
