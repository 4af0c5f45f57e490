"""N-shot classification on frozen features.

For each N in ``shots`` and each of ``trials`` seeded draws, N images per class are drawn without replacement
from the labelled train split (the support set), the features are standardised with that support set's own
mean/std, a multinomial logistic regression with an L2 penalty is fitted to them (full batch, L-BFGS, float64),
and its top-1 accuracy is measured on the whole test split. The report per N is the mean over trials and the
half-width of its 95% Student-t interval.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError

# Penalty of the mean cross-entropy + (l2 / 2) * ||W||^2 objective on standardised features. Support sets are
# separable, so l2 moves the fit between the max-margin direction (small) and class-mean prototypes (large); on
# synthetic clusters top-1 moved by a few points at most across 1e-4..10. 1e-2 is sklearn's default (C=1) for
# 100 support images, mid-range for this protocol, and converges in ~35 L-BFGS iterations (100 classes x 25
# shots x 768 features). max_iter is only a cap on the time a tiny l2 could take.
DEFAULT_L2 = 1e-2
DEFAULT_MAX_ITER = 1000

# Two-sided 95% quantiles of Student's t (t_0.975) for 1..30 degrees of freedom; the normal 1.96 beyond.
_T95 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
        2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
_Z95 = 1.96


def t95(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df >= 1`` degrees of freedom (1.96 for df > 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T95[df - 1] if df <= len(_T95) else _Z95


def mean_and_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean of ``values`` and the half-width of its 95% interval, ``t95(n - 1) * s / sqrt(n)`` with ``s`` the
    sample standard deviation. One value gives ``nan``: its spread cannot be estimated (0.0 would claim it is
    exact)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_and_ci95 needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t95(n - 1) * s / math.sqrt(n)


def check_shots(train_labels: torch.Tensor, shots: Sequence[int], num_classes: int | None = None,
                key: str = "fewshot.shots", class_names: Sequence[str] | None = None,
                split: str = "the labelled train split") -> None:
    """Raise ``ConfigError`` unless every N in ``shots`` is >= 1 and at most the image count of every class.

    ``train_labels``: ``(n,)`` class indices in ``[0, num_classes)`` (``num_classes`` defaults to the largest
    label + 1). The message names ``key``, the offending N, the smallest class (by name when ``class_names`` is
    given, and by index), its count in ``split``, and the fix.
    """
    for n in shots:
        if n < 1:
            raise ConfigError(f"config key '{key}': every N must be at least 1 image per class, got {n}; remove it "
                              f"from {key}.")
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1 if train_labels.numel() else 0
    counts = torch.bincount(train_labels.long().flatten(), minlength=num_classes)[:num_classes]
    if not shots or num_classes == 0:
        return
    smallest = int(counts.argmin())
    count = int(counts[smallest])
    largest = max(shots)
    if largest <= count:
        return
    name = f"'{class_names[smallest]}' (index {smallest})" if class_names is not None else f"index {smallest}"
    if count == 0:
        raise ConfigError(f"config key '{key}': class {name} has no image in {split}, so no N-shot draw can "
                          f"include it; add labelled images of that class to {split}.")
    raise ConfigError(f"config key '{key}': N={largest} images per class is more than the smallest class has: "
                      f"class {name} has {count} images in {split}. Lower every N in {key} to at most {count}, "
                      f"or add labelled images of that class.")


def _trial_seed(seed: int, shots: int, trial: int) -> int:
    # A hash, not a running generator: each draw depends on (seed, N, trial) only, not on the order of shots.
    digest = hashlib.sha256(f"mobyssl-fewshot/{seed}/{shots}/{trial}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def support_indices(train_labels: torch.Tensor, num_classes: int, shots: int, seed: int, trial: int) -> torch.Tensor:
    """Indices into ``train_labels`` ``(n,)`` of ``shots`` images per class, drawn without replacement.

    Returns ``(num_classes * shots,)`` int64, class by class. The draw is a function of
    ``(train_labels, seed, shots, trial)`` alone.
    """
    g = torch.Generator().manual_seed(_trial_seed(seed, shots, trial))
    labels = train_labels.long().flatten()
    by_class = labels.argsort(stable=True)  # each class's indices in increasing order, one sort for all classes
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    picked, start = [], 0
    for c in range(num_classes):
        members = by_class[start:start + counts[c]]
        picked.append(members[torch.randperm(counts[c], generator=g)[:shots]])
        start += counts[c]
    return torch.cat(picked)


def support_statistics(support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and (population) std ``(d,)`` float64 of ``support`` ``(n, d)``, to standardise it and
    the test split as ``(x - mean) / std``. A feature constant in the support set gets std 1: it carries no
    information there, and dividing by ~0 would blow up its test values."""
    support = support.to(torch.float64)
    std = support.std(0, unbiased=False)
    return support.mean(0), torch.where(std > 0, std, torch.ones_like(std))


def logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = DEFAULT_L2,
                        max_iter: int = DEFAULT_MAX_ITER) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: minimises ``mean cross-entropy(x @ W.T + b, y) + (l2 / 2) * ||W||^2``
    (bias not penalised) with full-batch L-BFGS in float64, from zero.

    Args:
        x: ``(n, d)`` features, already standardised; y: ``(n,)`` class indices in ``[0, num_classes)``.
    Returns:
        ``(W, b)``: ``(num_classes, d)`` and ``(num_classes,)`` float64.
    """
    x = x.to(torch.float64)
    y = y.long()
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.t() + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(objective)  # LBFGS runs the objective with grad enabled, also under a caller's no_grad
    return weight.detach(), bias.detach()


def _top1(weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, x: torch.Tensor,
          y: torch.Tensor, chunk: int = 8192) -> float:
    correct = 0
    for start in range(0, x.shape[0], chunk):  # chunks: a float64 copy of a large test split would not fit
        logits = ((x[start:start + chunk].to(torch.float64) - mean) / std) @ weight.t() + bias
        correct += int((logits.argmax(1) == y[start:start + chunk]).sum())
    return 100.0 * correct / x.shape[0]


def fewshot_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                     test_labels: torch.Tensor, shots: Sequence[int] = (1, 5, 10, 25), trials: int = 5, seed: int = 0,
                     num_classes: int | None = None, l2: float = DEFAULT_L2, max_iter: int = DEFAULT_MAX_ITER,
                     class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Top-1 accuracy (in %) of N-shot logistic regression on frozen features, averaged over seeded trials.

    Args:
        train_features: ``(n, d)`` labelled train split (any float dtype, CPU); train_labels ``(n,)``.
        test_features: ``(m, d)``; test_labels ``(m,)``.
        shots: the N's; trials: draws per N (>= 1); seed: the draw of trial t for N is fixed by (seed, N, t).
        num_classes: defaults to the largest label of either split + 1.
    Returns:
        ``{"fewshot_top1_{N}shot": mean over trials, "fewshot_ci95_{N}shot": half-width of its 95% interval
        (nan with one trial), ...}``.
    Raises:
        ConfigError: naming ``fewshot.shots`` / ``fewshot.trials`` when a draw is impossible.
    """
    if trials < 1:
        raise ConfigError(f"config key 'fewshot.trials' must be at least 1, got {trials}")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    check_shots(train_labels, shots, num_classes, class_names=class_names)
    test_labels = test_labels.long()
    out = {}
    for n in dict.fromkeys(shots):  # each N once, in the given order
        accuracies = []
        for trial in range(trials):
            idx = support_indices(train_labels, num_classes, n, seed, trial)
            support = train_features[idx].to(torch.float64)
            mean, std = support_statistics(support)
            weight, bias = logistic_regression((support - mean) / std, train_labels[idx], num_classes, l2, max_iter)
            accuracies.append(_top1(weight, bias, mean, std, test_features, test_labels))
        out[f"fewshot_top1_{n}shot"], out[f"fewshot_ci95_{n}shot"] = mean_and_ci95(accuracies)
    return out
