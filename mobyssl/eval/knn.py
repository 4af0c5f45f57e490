"""Weighted k-NN classification on frozen features (the DINO / InstDisc protocol)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks: Sequence[int] = (20, 200), temperature: float = 0.07,
                 num_classes: int | None = None, chunk: int = 1024) -> dict[str, float]:
    """Top-1/top-5 accuracy (in %) of a cosine-similarity k-NN vote weighted by ``exp(sim / T)``.

    Args:
        train_features: ``(N, D)`` memory bank; train_labels ``(N,)``.
        test_features: ``(M, D)`` queries; test_labels ``(M,)``.
        ks: neighbour counts (each capped at N).
    Returns:
        ``{"knn_top1_k20": ..., "knn_top5_k20": ..., ...}``. Runs on the device of the features.
    """
    with torch.no_grad():  # in the body: mutation testing skips decorated functions
        if num_classes is None:
            num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        bank = F.normalize(train_features.float(), dim=1)
        queries = F.normalize(test_features.float(), dim=1)
        train_labels, test_labels = train_labels.to(bank.device), test_labels.to(queries.device)
        kmax = min(max(ks), bank.shape[0])
        correct = {k: [0, 0] for k in ks}
        for start in range(0, queries.shape[0], chunk):
            q = queries[start:start + chunk]
            y = test_labels[start:start + chunk]
            sim, idx = (q @ bank.t()).topk(kmax, dim=1)
            neighbours = train_labels[idx]
            weights = (sim / temperature).exp()
            for k in ks:
                kk = min(k, kmax)
                votes = torch.zeros(q.shape[0], num_classes, device=q.device)
                votes.scatter_add_(1, neighbours[:, :kk], weights[:, :kk])
                top = votes.topk(min(5, num_classes), dim=1).indices
                hits = top == y[:, None]
                correct[k][0] += hits[:, 0].sum()  # tensors: no host sync per chunk
                correct[k][1] += hits.any(dim=1).sum()
        m = queries.shape[0]
        out = {}
        for k in ks:
            out[f"knn_top1_k{k}"] = 100.0 * float(correct[k][0]) / m
            out[f"knn_top5_k{k}"] = 100.0 * float(correct[k][1]) / m
        return out
