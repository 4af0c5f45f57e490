import math

import torch
import torch.nn.functional as F

from mobyssl.losses import FeatureQueue, MoBYLoss, info_nce


def _manual_info_nce(q, k, negs, t):
    total = 0.0
    for i in range(q.shape[0]):
        logits = [float(q[i] @ k[i]) / t] + [float(q[i] @ n) / t for n in negs]
        m = max(logits)
        lse = m + math.log(sum(math.exp(l - m) for l in logits))
        total += lse - logits[0]
    return total / q.shape[0]


def _unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def test_info_nce_matches_hand_computation():
    torch.manual_seed(0)
    q, k, negs = _unit(4, 8), _unit(4, 8), _unit(6, 8)
    got = info_nce(q, k, negs, 0.2)
    assert math.isclose(got.item(), _manual_info_nce(q, k, negs, 0.2), rel_tol=1e-9)


def test_info_nce_is_low_when_positive_dominates():
    q = torch.eye(4, dtype=torch.float64)
    negs = -torch.eye(4, dtype=torch.float64)
    assert info_nce(q, q, negs, 0.05).item() < 1e-6
    assert info_nce(q, -q, negs, 0.05).item() > 20


def test_moby_loss_pairs_each_prediction_with_the_other_views_target_and_queue():
    torch.manual_seed(0)
    crit = MoBYLoss(dim=8, queue_size=12, temperature=0.2).double()
    p1, p2, t1, t2 = (torch.randn(4, 8, dtype=torch.float64) for _ in range(4))
    q1_before = crit.queue_1.queue.clone()
    q2_before = crit.queue_2.queue.clone()
    out = crit(p1, p2, t1, t2)
    n = lambda x: F.normalize(x, dim=1)  # noqa: E731
    expected = (_manual_info_nce(n(p1), n(t2), q2_before, 0.2)
                + _manual_info_nce(n(p2), n(t1), q1_before, 0.2))
    assert math.isclose(out["loss"].item(), expected, rel_tol=1e-6)
    # Swapping the queues gives another value, so the pairing above is what is computed.
    swapped = (_manual_info_nce(n(p1), n(t2), q1_before, 0.2)
               + _manual_info_nce(n(p2), n(t1), q2_before, 0.2))
    assert not math.isclose(expected, swapped, rel_tol=1e-3)


def test_queues_are_updated_after_the_loss_with_normalised_targets():
    torch.manual_seed(0)
    crit = MoBYLoss(dim=8, queue_size=12, temperature=0.2)
    t1, t2 = torch.randn(4, 8), torch.randn(4, 8)
    old1 = crit.queue_1.queue.clone()
    crit(torch.randn(4, 8), torch.randn(4, 8), t1, t2)
    assert torch.allclose(crit.queue_1.queue[:4], F.normalize(t1, dim=1))
    assert torch.allclose(crit.queue_2.queue[:4], F.normalize(t2, dim=1))
    assert torch.equal(crit.queue_1.queue[4:], old1[4:])
    assert int(crit.queue_1.ptr) == 4 and int(crit.queue_2.ptr) == 4


def test_queue_wraps_around_fifo():
    q = FeatureQueue(dim=3, size=6)
    batches = [F.normalize(torch.randn(3, 3), dim=1) for _ in range(3)]
    for b in batches:
        q.enqueue(b)
    # 3 batches of 3 in a queue of 6: the third overwrote the first.
    assert torch.allclose(q.queue[:3], batches[2]) and torch.allclose(q.queue[3:], batches[1])
    assert int(q.ptr) == 3


def test_eval_mode_does_not_touch_the_queues():
    crit = MoBYLoss(dim=8, queue_size=8).eval()
    before = crit.queue_1.queue.clone()
    crit(*(torch.randn(4, 8) for _ in range(4)))
    assert torch.equal(before, crit.queue_1.queue) and int(crit.queue_1.ptr) == 0


def test_queue_size_not_multiple_of_batch_is_a_clear_error():
    crit = MoBYLoss(dim=8, queue_size=100)
    try:
        crit.check_batch(64)
    except ValueError as e:
        assert "method.queue_size=100" in str(e) and "64" in str(e)
    else:
        raise AssertionError("expected ValueError")
    crit.check_batch(50)


def test_queue_state_travels_with_state_dict():
    a = MoBYLoss(dim=8, queue_size=8)
    a(*(torch.randn(4, 8) for _ in range(4)))
    b = MoBYLoss(dim=8, queue_size=8)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.queue_2.queue, b.queue_2.queue) and int(b.queue_2.ptr) == 4


def _unit_rows(x):
    return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in x.tolist()]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def test_logged_statistics_match_hand_computation():
    """``pos_sim``, ``neg_sim`` and ``feature_std`` (read by the collapse monitor), by hand in plain Python."""
    torch.manual_seed(0)
    B, D = 5, 4
    crit = MoBYLoss(dim=D, queue_size=10, temperature=0.2).double()
    p1, p2, t1, t2 = (torch.randn(B, D, dtype=torch.float64) * 3 + 1 for _ in range(4))
    queue_1, queue_2 = crit.queue_1.queue.tolist(), crit.queue_2.queue.tolist()
    out = crit(p1, p2, t1, t2)
    q1, q2, k1, k2 = (_unit_rows(x) for x in (p1, p2, t1, t2))
    # Cosine of each prediction with the other view's target, averaged over the batch and the two pairs.
    pos_sim = 0.5 * (sum(_dot(a, b) for a, b in zip(q1, k2)) / B + sum(_dot(a, b) for a, b in zip(q2, k1)) / B)
    # Mean cosine of each prediction with every entry of the queue it is contrasted with (before this step's keys).
    neg_sim = 0.5 * (sum(_dot(a, n) for a in q1 for n in queue_2) / (B * len(queue_2))
                     + sum(_dot(a, n) for a in q2 for n in queue_1) / (B * len(queue_1)))
    # Std over the batch (unbiased, B - 1) of each dimension of the view-1 predictions, mean over dimensions, x sqrt(D).
    stds = []
    for d in range(D):
        col = [row[d] for row in q1]
        mean = sum(col) / B
        stds.append(math.sqrt(sum((v - mean) ** 2 for v in col) / (B - 1)))
    feature_std = sum(stds) / D * math.sqrt(D)
    assert abs(out["pos_sim"].item() - pos_sim) < 1e-12
    assert abs(out["neg_sim"].item() - neg_sim) < 1e-12
    assert abs(out["feature_std"].item() - feature_std) < 1e-12


def test_feature_std_is_zero_for_collapsed_and_near_one_for_spread_features():
    crit = MoBYLoss(dim=64, queue_size=512).double()
    same = torch.randn(1, 64, dtype=torch.float64).expand(512, 64)
    assert crit(same, same, same, same)["feature_std"].item() < 1e-6
    spread = torch.randn(512, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert abs(crit(spread, spread, spread, spread)["feature_std"].item() - 1.0) < 0.05


def test_similarities_to_the_queue_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    crit = MoBYLoss(dim=64, queue_size=256, temperature=0.2).eval()
    inputs = [torch.randn(16, 64) for _ in range(4)]
    ref = crit(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crit(*inputs)
    for k in ref:
        assert out[k].dtype == torch.float32, k
        assert abs(out[k].item() - ref[k].item()) < 1e-6 * max(1.0, abs(ref[k].item())), k


def test_bf16_predictions_and_targets_are_computed_in_float32():
    """Network outputs in bf16 (as autocast produces them) are taken to float32 first: the result equals the float32
    computation on the same (bf16-rounded) values, and is float32."""
    torch.manual_seed(0)
    crit = MoBYLoss(dim=64, queue_size=256, temperature=0.2).eval()
    inputs = [torch.randn(16, 64).to(torch.bfloat16) for _ in range(4)]
    ref = crit(*[x.float() for x in inputs])
    out = crit(*inputs)
    for k in ref:
        assert out[k].dtype == torch.float32, k
        assert abs(out[k].item() - ref[k].item()) < 1e-6 * max(1.0, abs(ref[k].item())), k


def test_defaults_are_the_papers():
    """Used without arguments, the loss is MoBY's: two queues of 4096 keys of width 256, temperature 0.2."""
    loss = MoBYLoss()
    assert loss.queue_1.queue.shape == loss.queue_2.queue.shape == (4096, 256)
    assert loss.temperature == 0.2
