"""MoCo v3's loss against a hand computation on small tensors, its 2T scaling, its gradients and its logs."""

import math

import pytest
import torch

from mobyssl.losses import MoCoV3Loss, batch_contrastive


def by_hand(q, k, t):
    """2T x the mean over rows of -log softmax(q_i . k_j / T)[i], unit vectors, written out with loops."""
    qn = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in q.tolist()]
    kn = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in k.tolist()]
    total = 0.0
    for i, qi in enumerate(qn):
        logits = [sum(a * b for a, b in zip(qi, kj)) / t for kj in kn]
        total += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    return 2 * t * total / len(qn)


@pytest.mark.parametrize("t", [0.2, 1.0])
def test_batch_contrastive_by_hand(float64, t):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    loss, sim = batch_contrastive(q * 3.0, k * 0.5, t)  # the scale must not matter: both are normalised
    assert loss.item() == pytest.approx(by_hand(q, k, t), rel=1e-12)
    assert sim.shape == (5, 5)
    torch.testing.assert_close(sim, torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(k, dim=1).T)


def test_the_loss_is_scaled_by_two_t(float64):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    for t in (0.1, 0.2, 0.5):
        loss, sim = batch_contrastive(q, k, t)
        plain = torch.nn.functional.cross_entropy(sim / t, torch.arange(4))
        assert loss.item() == pytest.approx(2 * t * plain.item(), rel=1e-12)


def test_symmetric_sum_of_both_directions_and_the_logs(float64):
    g = torch.Generator().manual_seed(2)
    q1, q2, k1, k2 = (torch.randn(6, 4, generator=g) for _ in range(4))
    out = MoCoV3Loss(0.2)(q1, q2, k1, k2)
    assert out["loss"].item() == pytest.approx(by_hand(q1, k2, 0.2) + by_hand(q2, k1, 0.2), rel=1e-12)
    n = torch.nn.functional.normalize
    s1, s2 = n(q1, dim=1) @ n(k2, dim=1).T, n(q2, dim=1) @ n(k1, dim=1).T
    eye = torch.eye(6, dtype=torch.bool)
    assert out["pos_sim"].item() == pytest.approx(0.5 * (s1[eye].mean() + s2[eye].mean()).item(), rel=1e-12)
    assert out["neg_sim"].item() == pytest.approx(0.5 * (s1[~eye].mean() + s2[~eye].mean()).item(), rel=1e-12)
    assert out["feature_std"].item() == pytest.approx((n(q1, dim=1).std(0).mean() * 2).item(), rel=1e-12)


def test_gradient_flows_through_the_queries_only(float64):
    g = torch.Generator().manual_seed(3)
    q1, q2, k1, k2 = (torch.randn(4, 5, generator=g).requires_grad_() for _ in range(4))
    MoCoV3Loss(0.2)(q1, q2, k1, k2)["loss"].backward()
    assert q1.grad.abs().sum() > 0 and q2.grad.abs().sum() > 0
    assert k1.grad is None and k2.grad is None


def test_identical_views_of_distinct_images_give_a_low_loss_and_collapse_a_high_one():
    spread = torch.eye(8)  # 8 orthogonal unit vectors: each query's key is clearly its own
    low = MoCoV3Loss(0.2)(spread, spread, spread, spread)
    same = torch.ones(8, 8)  # every image the same point: the positive is no better than any other key
    high = MoCoV3Loss(0.2)(same, same, same, same)
    assert low["loss"] < 0.1 < high["loss"]
    assert high["loss"].item() == pytest.approx(2 * 2 * 0.2 * math.log(8), rel=1e-6)
    assert high["feature_std"] < 1e-6 and low["feature_std"] > 0.9
    assert high["neg_sim"].item() == pytest.approx(1.0) and low["neg_sim"].item() == pytest.approx(0.0)


def test_runs_in_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(4)
    q1, q2, k1, k2 = (torch.randn(4, 5, generator=g) for _ in range(4))
    ref = MoCoV3Loss(0.2)(q1, q2, k1, k2)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MoCoV3Loss(0.2)(q1.bfloat16(), q2.bfloat16(), k1.bfloat16(), k2.bfloat16())["loss"]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=0)
