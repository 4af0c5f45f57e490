"""SiT must reproduce, in float64, the trajectory recorded from today's implementation.

``golden/make_golden_sit.py`` recorded it: three ``train_step`` + ``on_step_end`` steps of a tiny ViT with all three
corruption kinds and the batch replacement, with per-parameter clipping. This test rebuilds the method, checks the
initial state, then from the recorded initial state the corruption masks of each step (the GMML law drawn from the
seeded global RNG), the losses (contrastive and reconstruction terms), the statistics, the momenta, the step-1
gradients and the final state, with the tolerance of the MoBY golden test (1e-10, absolute up to 1, relative above;
1e-8 for the values that are rounding noise by construction: ``NOISE_ONLY`` in make_golden_sit.py says which and why).

If this fails after a refactor, the refactor changed SiT's math or its random draws: fix it. Re-record only for a
deliberate change (see make_golden_sit.py).
"""

import torch
from helpers import check_golden, check_golden_dict, golden_record, golden_recorder

golden = golden_recorder("make_golden_sit")


def test_construction_matches_golden_init(float64):
    check_golden_dict(golden.state(golden.build()), golden_record(golden, "vit")["init"], "init")


def test_three_steps_match_golden_trajectory(float64):
    ref = golden_record(golden, "vit")
    method = golden.build()
    method.load_state_dict(ref["init"], strict=True)
    rec = golden.run(method)
    assert torch.equal(rec["masks"], ref["masks"])
    for k in (*golden.STATS, "momentum"):
        check_golden(rec[k], ref[k], k)
    check_golden_dict(rec["grads"], ref["grads"], "step-1 gradients")
    check_golden_dict(rec["final"], ref["final"], "final state", golden.NOISE_ONLY)


def test_golden_file_is_small_and_nontrivial():
    assert golden.golden_path().stat().st_size < 1_000_000
    ref = golden_record(golden, "vit")
    moved = ref["final"]["student_decoder.to_pixels.weight"] - ref["init"]["student_decoder.to_pixels.weight"]
    assert moved.abs().max() > 1e-5
    assert 0.2 < ref["masks"].double().mean() < 0.6 and not torch.equal(ref["masks"][0], ref["masks"][1])
    assert (ref["reconstruction"] > 0).all() and (ref["contrastive"] > 0).all()
    assert all(v.dtype == torch.float64 for v in ref["final"].values() if v.is_floating_point())
