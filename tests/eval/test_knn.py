import pytest
import torch

from mobyssl.eval import knn_classify, linear_probe_fast


def test_knn_weighted_vote_by_hand():
    # Bank: class 0 along +x, class 1 along +y. The query is closer to +x but has 2 class-1 neighbours.
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.8]])
    # k=1: nearest is +x -> class 0.
    out = knn_classify(bank, labels, q, torch.tensor([0]), ks=[1, 3], temperature=0.07, num_classes=2)
    assert out["knn_top1_k1"] == 100.0
    # k=3 with a low temperature the close +x point dominates; with a high one the majority wins.
    assert out["knn_top1_k3"] == 100.0
    hot = knn_classify(bank, labels, q, torch.tensor([1]), ks=[3], temperature=100.0, num_classes=2)
    assert hot["knn_top1_k3"] == 100.0


def test_knn_on_clusters_and_k_capped_at_bank_size():
    torch.manual_seed(0)
    centers = torch.randn(5, 16) * 5
    ytr = torch.arange(5).repeat_interleave(20)
    xtr = centers[ytr] + torch.randn(100, 16)
    yte = torch.arange(5).repeat_interleave(4)
    xte = centers[yte] + torch.randn(20, 16)
    out = knn_classify(xtr, ytr, xte, yte, ks=[20, 200])
    assert out["knn_top1_k20"] == 100.0 and out["knn_top5_k200"] == 100.0
    shuffled = knn_classify(xtr, ytr[torch.randperm(100)], xte, yte, ks=[20])
    assert shuffled["knn_top1_k20"] < 60.0


def test_fast_linear_probe_learns_separable_features():
    torch.manual_seed(0)
    w = torch.randn(16, 4)
    xtr, xte = torch.randn(2000, 16), torch.randn(500, 16)
    ytr, yte = (xtr @ w).argmax(1), (xte @ w).argmax(1)
    out = linear_probe_fast(xtr, ytr, xte, yte, num_classes=4, epochs=20, batch_size=128, lr=1.0)
    assert out["linear_top1"] > 90.0
    assert out["linear_top5"] == pytest.approx(100.0)
