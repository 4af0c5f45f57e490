"""``knn_classify`` against a brute-force reference written here, on more queries than one chunk."""

import pytest
import torch

from mobyssl.eval import knn_classify

N_BANK, N_QUERY, DIM, CLASSES = 300, 2500, 24, 10
KS = (1, 3, 20, 500)  # 500 > N_BANK: capped at the bank size
TOP5_KS = (20, 500)  # k with at least 6 classes voting: the top 5 has no ties between zero votes
TEMPERATURES = (0.07, 0.5)


def _reference(bank, bank_labels, queries, query_labels, k, temperature, num_classes):
    """Dense float64 computation on all queries at once: per-query correct flags (top-1, top-5)."""
    bank = bank.double() / bank.double().norm(dim=1, keepdim=True)
    queries = queries.double() / queries.double().norm(dim=1, keepdim=True)
    k = min(k, bank.shape[0])
    sims = queries @ bank.t()
    order = sims.argsort(dim=1, descending=True)[:, :k]
    top_sims = sims.gather(1, order)
    votes = torch.zeros(queries.shape[0], num_classes, dtype=torch.float64)
    votes.scatter_add_(1, bank_labels[order], (top_sims / temperature).exp())
    ranked = votes.argsort(dim=1, descending=True)
    top1 = ranked[:, 0] == query_labels
    top5 = (ranked[:, :5] == query_labels[:, None]).any(dim=1)
    return top1, top5, sims, votes


def _well_conditioned(bank, bank_labels, queries, query_labels):
    """Queries whose answer float32 rounding cannot change: clear gaps at every k boundary and in the votes."""
    ok = torch.ones(queries.shape[0], dtype=torch.bool)
    for t in TEMPERATURES:
        for k in KS:
            _, _, sims, votes = _reference(bank, bank_labels, queries, query_labels, k, t, CLASSES)
            s = sims.sort(dim=1, descending=True).values
            kk = min(k, bank.shape[0])
            if kk < bank.shape[0]:
                ok &= (s[:, kk - 1] - s[:, kk]) > 1e-4
            v = votes.sort(dim=1, descending=True).values
            n_voting = (v > 0).sum(1)
            gaps = (v[:, :-1] - v[:, 1:]) / v[:, :1]
            # Distinct votes among the classes that voted (enough of them for a tie-free top 5 where needed).
            for j in range(6):
                ok &= (gaps[:, j] > 1e-4) | (j + 1 >= n_voting)
            if k in TOP5_KS:
                ok &= n_voting >= 6
    return ok


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(CLASSES, DIM, generator=g)
    bank_labels = torch.randint(0, CLASSES, (N_BANK,), generator=g)
    bank = centers[bank_labels] + 1.5 * torch.randn(N_BANK, DIM, generator=g)

    def draw(n):
        y = torch.randint(0, CLASSES, (n,), generator=g)
        return centers[y] + 1.5 * torch.randn(n, DIM, generator=g), y

    queries, labels = [], []
    while sum(len(q) for q in queries) < N_QUERY:  # leave out the queries sitting on a near tie
        q, y = draw(3000)
        ok = _well_conditioned(bank, bank_labels, q, y)
        queries.append(q[ok])
        labels.append(y[ok])
    queries, labels = torch.cat(queries)[:N_QUERY], torch.cat(labels)[:N_QUERY]
    return bank, bank_labels, queries, labels


@pytest.mark.parametrize("chunk", [1024, 7, 5000])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_knn_equals_brute_force_over_many_chunks(problem, chunk, temperature):
    bank, bank_labels, queries, labels = problem
    out = knn_classify(bank, bank_labels, queries, labels, ks=KS, temperature=temperature,
                       num_classes=CLASSES, chunk=chunk)
    assert set(out) == {f"knn_top{t}_k{k}" for t in (1, 5) for k in KS}
    for k in KS:
        top1, top5, _, _ = _reference(bank, bank_labels, queries, labels, k, temperature, CLASSES)
        assert out[f"knn_top1_k{k}"] == 100.0 * int(top1.sum()) / N_QUERY, (k, chunk)
        if k in TOP5_KS:
            assert out[f"knn_top5_k{k}"] == 100.0 * int(top5.sum()) / N_QUERY, (k, chunk)
        assert out[f"knn_top5_k{k}"] >= out[f"knn_top1_k{k}"]
    # The answers are not trivial: neither all right nor all wrong, and k matters.
    assert 20 < out["knn_top1_k20"] < 95
    assert out["knn_top1_k1"] != out["knn_top1_k20"]


def test_knn_per_query_answers_are_independent_of_the_position_in_the_chunks(problem):
    # The queries after the first chunk are scored against their own labels: reversing the order of the
    # queries (and their labels) or scoring them one chunk-boundary apart must not change any count.
    bank, bank_labels, queries, labels = problem
    a = knn_classify(bank, bank_labels, queries, labels, ks=(20,), num_classes=CLASSES)
    b = knn_classify(bank, bank_labels, queries.flip(0), labels.flip(0), ks=(20,), num_classes=CLASSES, chunk=999)
    assert a == b
    tail = knn_classify(bank, bank_labels, queries[1024:], labels[1024:], ks=(20,), num_classes=CLASSES)
    top1, _, _, _ = _reference(bank, bank_labels, queries[1024:], labels[1024:], 20, 0.07, CLASSES)
    assert tail["knn_top1_k20"] == 100.0 * int(top1.sum()) / (N_QUERY - 1024)


def test_k1_with_nonzero_labels_and_a_known_partial_accuracy():
    # Classes 3 and 7 of 8: an empty vote (argmax class 0) is never right.
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    bank_labels = torch.tensor([3, 7, 3, 7])
    queries = torch.tensor([[0.9, 0.1], [0.2, 1.0], [-1.0, -0.3], [0.1, -0.8], [1.0, 0.2]])
    # Nearest neighbours: 3, 7, 3, 7, 3. Labels: right, right, wrong, right, wrong -> 60%.
    labels = torch.tensor([3, 7, 7, 7, 7])
    out = knn_classify(bank, bank_labels, queries, labels, ks=(1,), temperature=0.07, num_classes=8)
    assert out["knn_top1_k1"] == 60.0
    # Every query right / every query wrong, with the labels the nearest neighbour gives / does not give.
    nearest = torch.tensor([3, 7, 3, 7, 3])
    assert knn_classify(bank, bank_labels, queries, nearest, ks=(1,), num_classes=8)["knn_top1_k1"] == 100.0
    assert knn_classify(bank, bank_labels, queries, 10 - nearest, ks=(1,), num_classes=8)["knn_top1_k1"] == 0.0
    # With num_classes inferred from the labels (max + 1 = 8).
    assert knn_classify(bank, bank_labels, queries, labels, ks=(1,))["knn_top1_k1"] == 60.0


def test_k1_follows_the_single_nearest_neighbour_over_a_weighted_majority():
    # Two class-5 points slightly farther than one class-2 point: k=1 says 2, k=3 at a high temperature says 5.
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.3], [0.9, -0.3]])
    bank_labels = torch.tensor([2, 5, 5])
    q = torch.tensor([[1.0, 0.01]])
    assert knn_classify(bank, bank_labels, q, torch.tensor([2]), ks=(1,), num_classes=6)["knn_top1_k1"] == 100.0
    hot = knn_classify(bank, bank_labels, q, torch.tensor([5]), ks=(1, 3), temperature=10.0, num_classes=6)
    assert hot["knn_top1_k1"] == 0.0 and hot["knn_top1_k3"] == 100.0
