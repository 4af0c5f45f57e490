import math

import pytest
import torch

from mobyssl.losses import DenseOutputs, DINOLoss, EsViTLoss
from mobyssl.methods.base import Method

ST = 0.1  # the default student temperature


# ---------------------------------------------------------------------------------------------------------------
# Hand computations, in plain Python straight from the formulas.

def _log_softmax(row, temp):
    z = [x / temp for x in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(x - m) for x in z))
    return [x - lse for x in z]


def _softmax(row, temp):
    return [math.exp(x) for x in _log_softmax(row, temp)]


def _ce(target, log_prob):
    return -sum(a * b for a, b in zip(target, log_prob))


def _target(row, center, temp):
    return _softmax([x - c for x, c in zip(row, center)], temp)


def _hand_pairs(n_crops):
    pairs = []
    for iq in range(2):
        for v in range(n_crops):
            if v != iq:
                pairs.append((iq, v))
    return pairs


def _hand_dino(student, teacher, center, n_crops, teacher_temp):
    """DINO's loss, the teacher entropy and the KL, with explicit loops over pairs and images."""
    s, t, c = student.tolist(), teacher.tolist(), center.flatten().tolist()
    B = len(t) // 2
    losses, kls = [], []
    for iq, v in _hand_pairs(n_crops):
        loss = kl = 0.0
        for b in range(B):
            target = _target(t[iq * B + b], c, teacher_temp)
            log_s = _log_softmax(s[v * B + b], ST)
            loss += _ce(target, log_s)
            kl += sum(p * (math.log(p) - q) for p, q in zip(target, log_s) if p > 0)
        losses.append(loss / B)
        kls.append(kl / B)
    entropy = 0.0
    for row in t:
        entropy -= sum(p * math.log(p) for p in _target(row, c, teacher_temp) if p > 0)
    return {"loss": sum(losses) / len(losses), "n_pairs": len(losses),
            "teacher_entropy": entropy / len(t), "kl_teacher_student": sum(kls) / len(kls)}


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _hand_region(student, teacher, center_grid, n_crops, teacher_temp, match_on="tokens"):
    """EsViT's region term with explicit loops; ``match_on="region"`` matches on the head outputs instead (wrong)."""
    B = teacher.view.shape[0] // 2
    s_reg, t_reg, c = student.region.tolist(), teacher.region.tolist(), center_grid.flatten().tolist()
    s_key = getattr(student, match_on).tolist()
    t_key = getattr(teacher, match_on).tolist()
    s_start = [B * sum(student.n_tokens[:i]) for i in range(n_crops)]
    t_start = [B * sum(teacher.n_tokens[:i]) for i in range(2)]
    terms, matches = [], {}
    for iq, v in _hand_pairs(n_crops):
        n_t, n_s = teacher.n_tokens[iq], student.n_tokens[v]
        total = 0.0
        for b in range(B):
            for ts in range(n_s):
                srow = s_start[v] + b * n_s + ts
                sims = [_cos(s_key[srow], t_key[t_start[iq] + b * n_t + tt]) for tt in range(n_t)]
                j = sims.index(max(sims))
                matches[iq, v, b, ts] = j
                target = _target(t_reg[t_start[iq] + b * n_t + j], c, teacher_temp)
                total += _ce(target, _log_softmax(s_reg[srow], ST))
        terms.append(total / (B * n_s))
    return sum(terms) / len(terms), matches


# ---------------------------------------------------------------------------------------------------------------
# DINO


def _dino_inputs(B=2, K=5, n_crops=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n_crops * B, K, dtype=torch.float64, generator=g) * 2
    teacher = torch.randn(2 * B, K, dtype=torch.float64, generator=g) * 0.2
    return student, teacher


def test_dino_loss_matches_hand_computation_with_the_old_centre():
    crit = DINOLoss(out_dim=5, n_crops=4).double()
    student, teacher = _dino_inputs()
    old = torch.tensor([[0.1, -0.2, 0.05, 0.3, -0.1]], dtype=torch.float64)
    crit.center.copy_(old)
    out = crit(student, teacher, teacher_temp=0.04)
    hand = _hand_dino(student, teacher, old, 4, 0.04)
    assert hand["n_pairs"] == 6
    assert abs(out["loss"].item() - hand["loss"]) < 1e-12
    # The centre changes the value: without it (or with the new one) the loss would differ.
    assert abs(hand["loss"] - _hand_dino(student, teacher, torch.zeros(1, 5), 4, 0.04)["loss"]) > 1e-3
    new = [0.9 * o + 0.1 * sum(row[k] for row in teacher.tolist()) / 4 for k, o in enumerate(old.flatten().tolist())]
    assert torch.allclose(crit.center, torch.tensor([new], dtype=torch.float64), rtol=0, atol=1e-15)
    assert crit.center.shape == (1, 5)


def test_dino_pair_set_excludes_exactly_the_same_crop():
    """2 global + 8 local crops: 18 pairs. The gradient on each student crop names the teacher crops it is paired
    with: a global crop only with the other global crop, a local crop with both."""
    B, K, n_crops = 3, 5, 10
    crit = DINOLoss(out_dim=K, n_crops=n_crops).double()
    student, teacher = _dino_inputs(B=B, K=K, n_crops=n_crops, seed=1)
    student.requires_grad_(True)
    out = crit(student, teacher, teacher_temp=0.07)
    hand = _hand_dino(student.detach(), teacher, torch.zeros(1, K), n_crops, 0.07)
    assert hand["n_pairs"] == 18
    assert abs(out["loss"].item() - hand["loss"]) < 1e-12
    out["loss"].backward()
    p = torch.softmax(student.detach() / ST, dim=1).view(n_crops, B, K)
    t = torch.softmax(teacher / 0.07, dim=1).view(2, B, K)
    # d/ds of the cross-entropy with target t is (softmax(s / ST) - t) / ST; each pair is averaged over B and 18.
    expected = torch.stack([p[0] - t[1], p[1] - t[0]] + [2 * p[v] - t[0] - t[1] for v in range(2, n_crops)])
    assert torch.allclose(student.grad.view(n_crops, B, K), expected / (ST * B * 18), rtol=0, atol=1e-13)


def test_dino_eval_mode_leaves_the_centre():
    crit = DINOLoss(out_dim=5, n_crops=4).double().eval()
    student, teacher = _dino_inputs()
    crit(student, teacher, 0.04)
    assert torch.count_nonzero(crit.center) == 0
    crit.train()
    crit(student, teacher, 0.04)
    assert torch.count_nonzero(crit.center) == 5


def test_dino_centre_is_a_float32_buffer_that_travels_with_state_dict():
    a = DINOLoss(out_dim=5, n_crops=4)
    assert a.center.dtype == torch.float32 and torch.equal(a.center, torch.zeros(1, 5))
    student, teacher = _dino_inputs()
    a(student.float(), teacher.float(), 0.04)
    state = a.state_dict()
    assert list(state) == ["center"]
    b = DINOLoss(out_dim=5, n_crops=4)
    b.load_state_dict(state)
    assert torch.equal(a.center, b.center) and torch.count_nonzero(b.center) == 5


def _micro(x, crops, lo, hi, B):
    """Rows of images lo..hi-1 of a crop-major ``(crops * B, ...)`` tensor."""
    return torch.cat([x[c * B + lo: c * B + hi] for c in range(crops)])


def test_dino_deferred_updates_over_micro_batches_equal_one_batch():
    B = 4
    student, teacher = _dino_inputs(B=B)
    whole = DINOLoss(out_dim=5, n_crops=4).double()
    whole(student, teacher, 0.04)
    method = Method()
    method.crit = DINOLoss(out_dim=5, n_crops=4).double()
    with method.accumulate():
        for lo in (0, 2):
            method.crit(_micro(student, 4, lo, lo + 2, B), _micro(teacher, 2, lo, lo + 2, B), 0.04)
            assert torch.count_nonzero(method.crit.center) == 0  # nothing moves before the optimizer step
    assert torch.allclose(method.crit.center, whole.center, rtol=0, atol=1e-15)
    assert method.crit._pending == [] and not method.crit.defer_updates
    method.crit.flush()  # a second flush has nothing left to apply
    assert torch.allclose(method.crit.center, whole.center, rtol=0, atol=1e-15)


def test_dino_centre_is_the_mean_over_every_rank(monkeypatch):
    """With 2 ranks, the centre moves towards the mean of both ranks' teacher rows: each rank's row mean goes through
    ``mean_across_ranks`` (here a stand-in for the all-reduce, the other rank holding ``other``), once per update."""
    B = 4
    student, teacher = _dino_inputs(B=B)
    other = _dino_inputs(B=B, seed=11)[1] + 1.0
    calls = []

    def two_ranks(x):
        calls.append(x.clone())
        return (x + other.mean(0, keepdim=True)) / 2

    monkeypatch.setattr("mobyssl.losses.dino_loss.mean_across_ranks", two_ranks)
    crit = DINOLoss(out_dim=5, n_crops=4).double()
    crit.defer_updates = True
    crit(_micro(student, 4, 0, 2, B), _micro(teacher, 2, 0, 2, B), 0.04)
    crit(_micro(student, 4, 2, 4, B), _micro(teacher, 2, 2, 4, B), 0.04)
    crit.flush()
    assert len(calls) == 1 and torch.allclose(calls[0], teacher.mean(0, keepdim=True), rtol=0, atol=1e-15)
    both = torch.cat([teacher, other]).mean(0, keepdim=True)
    assert torch.allclose(crit.center, 0.1 * both, rtol=0, atol=1e-15)


def test_dino_non_finite_teacher_outputs_leave_the_centre():
    crit = DINOLoss(out_dim=5, n_crops=4).double()
    student, teacher = _dino_inputs()
    crit(student, teacher, 0.04)
    before = crit.center.clone()
    teacher[1, 2] = float("nan")
    crit(student, teacher, 0.04)
    assert torch.equal(crit.center, before)


def test_dino_bf16_inputs_under_autocast_are_computed_in_float32():
    """bf16 network outputs (as autocast produces them): the loss, the statistics and the centre update are float32 and
    equal a float64 hand computation on the same values."""
    crit = DINOLoss(out_dim=64, n_crops=4)
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(4 * 8, 64, generator=g) * 2).bfloat16()
    teacher = (torch.randn(2 * 8, 64, generator=g) + 3).bfloat16()
    hand = _hand_dino(student.double(), teacher.double(), torch.zeros(1, 64), 4, 0.04)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crit(student, teacher, 0.04)
    for k in ("loss", "teacher_entropy", "kl_teacher_student"):
        assert out[k].dtype == torch.float32, k
        assert abs(out[k].item() - hand[k]) < 1e-5 * max(1.0, abs(hand[k])), k
    assert crit.center.dtype == torch.float32
    assert torch.allclose(crit.center.double(), 0.1 * teacher.double().mean(0, keepdim=True), rtol=1e-6, atol=0)


def test_dino_teacher_gets_no_gradient_the_student_does():
    crit = DINOLoss(out_dim=5, n_crops=4).double()
    student, teacher = _dino_inputs()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    out = crit(student, teacher, 0.04)
    out["loss"].backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert not out["teacher_entropy"].requires_grad and not out["kl_teacher_student"].requires_grad


def test_dino_statistics_match_hand_computation():
    crit = DINOLoss(out_dim=5, n_crops=4).double()
    student, teacher = _dino_inputs(seed=3)
    crit.center.copy_(torch.tensor([[0.05, 0.0, -0.1, 0.2, 0.0]]))
    hand = _hand_dino(student, teacher, crit.center.clone(), 4, 0.04)
    out = crit(student, teacher, 0.04)
    for k in ("teacher_entropy", "kl_teacher_student"):
        assert out[k].dtype == torch.float64 and abs(out[k].item() - hand[k]) < 1e-12, k
    assert 0 < hand["teacher_entropy"] < math.log(5) and hand["kl_teacher_student"] > 0.1


def test_dino_statistics_in_the_two_collapse_modes():
    K, B, n_crops = 16, 4, 4
    crit = DINOLoss(out_dim=K, n_crops=n_crops).double().eval()
    # One dimension dominating: every teacher (and student) row the same one-hot.
    one_hot = torch.zeros(1, K, dtype=torch.float64)
    one_hot[0, 3] = 20.0
    out = crit(one_hot.expand(n_crops * B, K), one_hot.expand(2 * B, K), 0.04)
    assert out["teacher_entropy"].item() < 1e-9 and abs(out["kl_teacher_student"].item()) < 1e-9
    # Uniform: constant rows.
    flat = torch.full((1, K), 0.7, dtype=torch.float64)
    out = crit(flat.expand(n_crops * B, K), flat.expand(2 * B, K), 0.04)
    assert abs(out["teacher_entropy"].item() - math.log(K)) < 1e-12 and abs(out["kl_teacher_student"].item()) < 1e-12


@pytest.mark.parametrize("student_rows, teacher_rows, K, message", [
    (7, 4, 5, "n_crops \\* B rows with n_crops=4"),
    (8, 2, 5, "expected 2 \\* B = 4 rows"),
    (8, 4, 6, "out_dim=5"),
])
def test_dino_wrong_shapes_are_clear_errors(student_rows, teacher_rows, K, message):
    crit = DINOLoss(out_dim=5, n_crops=4)
    teacher_k = 5 if K == 6 else K
    with pytest.raises(ValueError, match=message):
        crit(torch.randn(student_rows, K), torch.randn(teacher_rows, teacher_k), 0.04)
    with pytest.raises(ValueError, match="out_dim=5"):
        crit(torch.randn(8, 5), torch.randn(4, 6), 0.04)


def test_dino_defaults():
    crit = DINOLoss(out_dim=65536, n_crops=10)
    assert crit.student_temp == 0.1 and crit.center_momentum == 0.9 and crit.center.shape == (1, 65536)
    esvit = EsViTLoss(out_dim=8, n_crops=10)
    assert esvit.student_temp == 0.1 and esvit.center_momentum == 0.9 and esvit.center_grid.shape == (1, 8)
    with pytest.raises(ValueError, match="expected >= 2, got 1"):
        DINOLoss(out_dim=8, n_crops=1)


# ---------------------------------------------------------------------------------------------------------------
# EsViT


def _dense(n_crops, B, n_tokens, K, C, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rows = B * sum(n_tokens)
    return DenseOutputs(view=torch.randn(n_crops * B, K, generator=g, dtype=dtype),
                        region=torch.randn(rows, K, generator=g, dtype=dtype),
                        tokens=torch.randn(rows, C, generator=g, dtype=dtype),
                        n_tokens=list(n_tokens))


def _esvit_inputs(B=2, K=5, C=3, n_crops=4, n_global=4, n_local=2, seed=0):
    student = _dense(n_crops, B, [n_global] * 2 + [n_local] * (n_crops - 2), K, C, seed)
    teacher = _dense(2, B, [n_global] * 2, K, C, seed + 100)
    return student._replace(view=student.view * 2, region=student.region * 2), teacher


def test_esvit_loss_matches_hand_computation():
    crit = EsViTLoss(out_dim=5, n_crops=4).double()
    student, teacher = _esvit_inputs()
    crit.center.copy_(torch.tensor([[0.1, 0.0, -0.1, 0.2, 0.0]]))
    crit.center_grid.copy_(torch.tensor([[0.0, -0.3, 0.1, 0.0, 0.2]]))
    view = _hand_dino(student.view, teacher.view, crit.center.clone(), 4, 0.07)
    region, _ = _hand_region(student, teacher, crit.center_grid.clone(), 4, 0.07)
    out = crit(student, teacher, 0.07)
    assert abs(out["view_loss"].item() - view["loss"]) < 1e-12
    assert abs(out["region_loss"].item() - region) < 1e-12
    assert abs(out["loss"].item() - (0.5 * view["loss"] + 0.5 * region)) < 1e-12
    for k in ("teacher_entropy", "kl_teacher_student"):
        assert abs(out[k].item() - view[k]) < 1e-12, k
    # The view term is DINO's, with the same centre.
    dino = DINOLoss(out_dim=5, n_crops=4).double()
    dino.center.copy_(torch.tensor([[0.1, 0.0, -0.1, 0.2, 0.0]]))
    assert abs(dino(student.view, teacher.view, 0.07)["loss"].item() - out["view_loss"].item()) < 1e-12


def _axes_case():
    """n_crops = 2, B = 2, 3 tokens per crop, C = 3. Teacher tokens lie along the axes (lengths 1, 10, 0.1, so a dot
    product would pick other tokens than the cosine); student tokens lie near axes, in a permuted order, two of them
    on the same axis. Returns the inputs and, per (teacher crop, image), the teacher token each student token of the
    other crop must match."""
    K = 5
    eye = torch.eye(3, dtype=torch.float64)
    t_perm = {(0, 0): [2, 0, 1], (0, 1): [1, 2, 0], (1, 0): [0, 1, 2], (1, 1): [2, 1, 0]}  # axis of each token
    lengths = torch.tensor([[1.0], [10.0], [0.1]], dtype=torch.float64)
    s_axes = {(1, 0): [0, 0, 1], (1, 1): [2, 1, 2], (0, 0): [1, 2, 1], (0, 1): [0, 0, 0]}  # (student crop, image)
    nudge = torch.tensor([0.3, 0.25, 0.2], dtype=torch.float64)  # keeps each student token closest to its own axis
    t_tokens = torch.cat([eye[t_perm[c, b]] * lengths for c in range(2) for b in range(2)])
    s_tokens = torch.cat([eye[s_axes[c, b]] + nudge.roll(b) * (1 - eye[s_axes[c, b]]) * 0.5
                          for c in range(2) for b in range(2)])
    g = torch.Generator().manual_seed(5)
    teacher = DenseOutputs(torch.randn(4, K, generator=g, dtype=torch.float64),
                           torch.randn(12, K, generator=g, dtype=torch.float64), t_tokens, [3, 3])
    student = DenseOutputs(torch.randn(4, K, generator=g, dtype=torch.float64) * 2,
                           torch.randn(12, K, generator=g, dtype=torch.float64) * 2, s_tokens, [3, 3])
    expected = {(iq, b): [t_perm[iq, b].index(a) for a in s_axes[1 - iq, b]] for iq in range(2) for b in range(2)}
    return student, teacher, expected


def test_esvit_region_matching_on_a_constructed_case():
    student, teacher, expected = _axes_case()
    assert expected[1, 1] == [2, 2, 2] and expected[0, 1] == [1, 0, 1]  # many-to-one matches
    # Matching by dot product instead of cosine would pick other teacher tokens.
    dot = student.tokens.view(2, 2, 3, 3).flip(0) @ teacher.tokens.view(2, 2, 3, 3).transpose(2, 3)
    assert any(dot[iq, b].argmax(dim=1).tolist() != js for (iq, b), js in expected.items())
    _, matches = _hand_region(student, teacher, torch.zeros(1, 5), 2, 0.07)
    for (iq, b), js in expected.items():
        assert [matches[iq, 1 - iq, b, t] for t in range(3)] == js  # the hand loop agrees with the construction
    crit = EsViTLoss(out_dim=5, n_crops=2).double()
    region = student.region.clone().requires_grad_(True)
    out = crit(student._replace(region=region), teacher, 0.07)
    hand, _ = _hand_region(student, teacher, torch.zeros(1, 5), 2, 0.07)
    assert abs(out["region_loss"].item() - hand) < 1e-12
    # The gathered targets, read back from the gradient: for the rows of student crop v (paired only with teacher
    # crop 1 - v), d loss / d s = 0.5 (weight) * 1/2 (pairs) * (softmax(s / ST) - target) / (ST * B * T_s).
    out["loss"].backward()
    t_probs = torch.softmax(teacher.region / 0.07, dim=1).view(2, 2, 3, 5)  # (crop, image, token, K)
    s_probs = torch.softmax(student.region / ST, dim=1).view(2, 2, 3, 5)
    targets = s_probs - region.grad.view(2, 2, 3, 5) * (4 * ST * 2 * 3)
    for (iq, b), js in expected.items():
        assert torch.allclose(targets[1 - iq, b], t_probs[iq, b, js], rtol=0, atol=1e-12)


def test_esvit_matches_on_backbone_tokens_not_head_outputs():
    student, teacher = _esvit_inputs(seed=7)
    by_tokens, m_tokens = _hand_region(student, teacher, torch.zeros(1, 5), 4, 0.07)
    by_region, m_region = _hand_region(student, teacher, torch.zeros(1, 5), 4, 0.07, match_on="region")
    assert m_tokens != m_region and abs(by_tokens - by_region) > 1e-3  # the case tells the two apart
    out = EsViTLoss(out_dim=5, n_crops=4).double()(student, teacher, 0.07)
    assert abs(out["region_loss"].item() - by_tokens) < 1e-12


def test_esvit_view_and_region_weigh_one_half_each():
    student, teacher = _esvit_inputs(seed=2)
    view = DenseOutputs(student.view.clone().requires_grad_(True), student.region.clone().requires_grad_(True),
                        student.tokens, student.n_tokens)
    out = EsViTLoss(out_dim=5, n_crops=4).double()(view, teacher, 0.07)
    assert abs(out["loss"].item() - 0.5 * (out["view_loss"].item() + out["region_loss"].item())) < 1e-13
    assert abs(out["view_loss"].item() - out["region_loss"].item()) > 0.1  # so that 0.5 / 0.5 is not 1 / 0 or 0 / 1
    out["loss"].backward()
    # The view gradient is half of DINO's.
    s = student.view.clone().requires_grad_(True)
    DINOLoss(out_dim=5, n_crops=4).double()(s, teacher.view, 0.07)["loss"].backward()
    assert torch.allclose(view.view.grad, 0.5 * s.grad, rtol=0, atol=1e-14)


def test_esvit_centres_are_updated_after_the_loss_over_every_teacher_row():
    crit = EsViTLoss(out_dim=5, n_crops=4).double()
    student, teacher = _esvit_inputs(B=3, n_global=4, seed=4)
    # The second global crop's tokens far away, so a mean over the first crop only would be wrong.
    region = teacher.region.clone()
    region[3 * 4:] += 5.0
    teacher = teacher._replace(region=region)
    old_c = torch.tensor([[0.1, 0.0, -0.1, 0.2, 0.0]], dtype=torch.float64)
    old_g = torch.tensor([[0.0, -0.3, 0.1, 0.0, 0.2]], dtype=torch.float64)
    crit.center.copy_(old_c)
    crit.center_grid.copy_(old_g)
    hand, _ = _hand_region(student, teacher, old_g, 4, 0.07)
    out = crit(student, teacher, 0.07)
    assert abs(out["region_loss"].item() - hand) < 1e-12  # the old centre_grid was used
    rows = region.tolist()
    assert len(rows) == 2 * 3 * 4
    grid = [0.9 * o + 0.1 * sum(r[k] for r in rows) / len(rows) for k, o in enumerate(old_g.flatten().tolist())]
    view = [0.9 * o + 0.1 * sum(r[k] for r in teacher.view.tolist()) / 6 for k, o in enumerate(old_c.flatten().tolist())]
    assert torch.allclose(crit.center_grid, torch.tensor([grid], dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.allclose(crit.center, torch.tensor([view], dtype=torch.float64), rtol=0, atol=1e-15)
    assert sorted(crit.state_dict()) == ["center", "center_grid"]
    crit.eval()
    crit(student, teacher, 0.07)
    assert torch.allclose(crit.center_grid, torch.tensor([grid], dtype=torch.float64), rtol=0, atol=1e-15)


def _dense_micro(x, crops, lo, hi, B):
    """Images lo..hi-1 of a DenseOutputs over ``crops`` crops of B images."""
    region, tokens, start = [], [], 0
    for n in x.n_tokens:
        region.append(x.region[start + lo * n: start + hi * n])
        tokens.append(x.tokens[start + lo * n: start + hi * n])
        start += B * n
    return DenseOutputs(_micro(x.view, crops, lo, hi, B), torch.cat(region), torch.cat(tokens), x.n_tokens)


def test_esvit_deferred_updates_over_micro_batches_equal_one_batch():
    B = 4
    student, teacher = _esvit_inputs(B=B, seed=6)
    whole = EsViTLoss(out_dim=5, n_crops=4).double()
    ref = whole(student, teacher, 0.07)
    method = Method()
    method.crit = EsViTLoss(out_dim=5, n_crops=4).double()
    losses = []
    with method.accumulate():
        for lo in (0, 2):
            losses.append(method.crit(_dense_micro(student, 4, lo, lo + 2, B), _dense_micro(teacher, 2, lo, lo + 2, B),
                                      0.07)["loss"])
            assert torch.count_nonzero(method.crit.center_grid) == 0
    assert abs(0.5 * (losses[0] + losses[1]).item() - ref["loss"].item()) < 1e-12  # the slicing is right
    assert torch.allclose(method.crit.center, whole.center, rtol=0, atol=1e-15)
    assert torch.allclose(method.crit.center_grid, whole.center_grid, rtol=0, atol=1e-15)


def test_esvit_tokens_and_teacher_get_no_gradient():
    student, teacher = _esvit_inputs(seed=8)
    student = DenseOutputs(*(x.clone().requires_grad_(True) for x in student[:3]), student.n_tokens)
    teacher = DenseOutputs(*(x.clone().requires_grad_(True) for x in teacher[:3]), teacher.n_tokens)
    out = EsViTLoss(out_dim=5, n_crops=4).double()(student, teacher, 0.07)
    out["loss"].backward()
    assert student.tokens.grad is None and all(x.grad is None for x in teacher[:3])
    assert student.view.grad.abs().sum() > 0 and student.region.grad.abs().sum() > 0
    assert not any(out[k].requires_grad for k in ("view_loss", "region_loss", "teacher_entropy", "kl_teacher_student"))


def test_esvit_matching_stays_float32_under_bf16_autocast():
    crit = EsViTLoss(out_dim=32, n_crops=4)
    student, teacher = _esvit_inputs(B=4, K=32, C=64, n_global=16, n_local=9, seed=9)
    teacher = teacher._replace(view=teacher.view + 3, region=teacher.region + 3)  # so that bf16 sums lose digits
    # Tokens close to one direction: their cosines differ by less than bf16 resolves near 1, so a bf16 matmul would
    # match other tokens. Inputs in bf16 (as autocast produces them), the reference computed by hand in float64 on the
    # same values.
    student, teacher = (DenseOutputs(x.view.bfloat16().double(), x.region.bfloat16().double(),
                                     (1 + 0.03 * x.tokens).bfloat16().double(), x.n_tokens) for x in (student, teacher))
    view = _hand_dino(student.view, teacher.view, torch.zeros(1, 32), 4, 0.07)
    region, _ = _hand_region(student, teacher, torch.zeros(1, 32), 4, 0.07)
    ref = {"view_loss": view["loss"], "region_loss": region, "loss": 0.5 * (view["loss"] + region),
           "teacher_entropy": view["teacher_entropy"], "kl_teacher_student": view["kl_teacher_student"]}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crit(*(DenseOutputs(*(t.bfloat16() for t in x[:3]), x.n_tokens) for x in (student, teacher)), 0.07)
    assert sorted(out) == sorted(ref)
    for k in ref:
        assert out[k].dtype == torch.float32, k
        assert abs(out[k].item() - ref[k]) < 1e-5 * max(1.0, abs(ref[k])), k
    for name, rows in (("center", teacher.view), ("center_grid", teacher.region)):
        center = getattr(crit, name)
        assert center.dtype == torch.float32, name
        assert torch.allclose(center.double(), 0.1 * rows.mean(0, keepdim=True), rtol=1e-6, atol=0), name


def test_esvit_wrong_shapes_are_clear_errors():
    crit = EsViTLoss(out_dim=5, n_crops=4)
    student, teacher = (DenseOutputs(*(t.float() for t in x[:3]), x.n_tokens) for x in _esvit_inputs())
    crit(student, teacher, 0.07)
    with pytest.raises(ValueError, match="one token count per crop \\(4\\)"):
        crit(student._replace(n_tokens=[4, 4, 2]), teacher, 0.07)
    with pytest.raises(ValueError, match="one token count per crop \\(2\\)"):
        crit(student, teacher._replace(n_tokens=[4, 4, 4]), 0.07)
    with pytest.raises(ValueError, match="student.region: expected B \\* sum\\(n_tokens\\) = 2 \\* 12 = 24 rows"):
        crit(student._replace(region=student.region[:-1]), teacher, 0.07)
    with pytest.raises(ValueError, match="teacher.tokens: expected B \\* sum\\(n_tokens\\) = 2 \\* 8 = 16 rows"):
        crit(student, teacher._replace(tokens=teacher.tokens[:-2]), 0.07)
    with pytest.raises(ValueError, match="teacher.region: expected shape \\(rows, out_dim=5\\)"):
        crit(student, teacher._replace(region=teacher.region[:, :4]), 0.07)
    with pytest.raises(ValueError, match="differ in width"):
        crit(student, teacher._replace(tokens=teacher.tokens[:, :2]), 0.07)
    with pytest.raises(ValueError, match="expected 2 \\* B = 4 rows"):
        crit(student, teacher._replace(view=teacher.view[:2]), 0.07)


def test_width_errors_name_the_tensor_at_fault():
    crit = DINOLoss(out_dim=5, n_crops=4)
    with pytest.raises(ValueError, match=r"^student view outputs: expected shape \(rows, out_dim=5\), got \(8, 6\)$"):
        crit(torch.randn(8, 6), torch.randn(4, 5), 0.04)
    with pytest.raises(ValueError, match=r"^teacher view outputs: expected shape \(rows, out_dim=5\), got \(4, 6\)$"):
        crit(torch.randn(8, 5), torch.randn(4, 6), 0.04)


def test_an_empty_batch_is_an_error_not_a_nan():
    with pytest.raises(ValueError, match="expected n_crops \\* B rows with n_crops=4, got 0 rows"):
        DINOLoss(out_dim=5, n_crops=4)(torch.randn(0, 5), torch.randn(0, 5), 0.04)
