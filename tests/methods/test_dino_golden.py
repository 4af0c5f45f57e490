"""DINO and EsViT must reproduce, in float64, the trajectories recorded from today's implementation.

``golden/make_golden_dino.py`` recorded it (and documents how); this test rebuilds the method the same way and
checks, for DINO on a tiny ViT with 2 global + 2 local crops, on one with a BatchNorm head on the global crops only,
and for EsViT on a tiny Swin whose local crops are padded to its window:
the initial state (teacher = copy of the student, centre zero), then from that recorded state three steps as the
trainer takes them: losses, teacher entropies and KLs, the teacher temperature and momentum of each step, every
gradient of steps 1 and 3 (step 1 with the last layer frozen, so its gradients must be absent) and the final
state_dict. Tolerance as in test_moby_golden.py: 1e-10 absolute up to 1, relative above (1e-8 for the few\nvalues that are rounding noise by construction: ``NOISE_ONLY`` in make_golden_dino.py says which and why).

If this fails after a refactor, the refactor changed the method's math: fix it. Re-record only for a deliberate change.
"""

import pytest
import torch
from helpers import check_golden, check_golden_dict, golden_record, golden_recorder

golden = golden_recorder("make_golden_dino")

NAMES = sorted(golden.VARIANTS)



@pytest.mark.parametrize("name", NAMES)
def test_construction_matches_golden_init(name, float64):
    ref = golden_record(golden, name)
    check_golden_dict(golden.state(golden.build(name)), ref["init"], "init")


@pytest.mark.parametrize("name", NAMES)
def test_three_steps_match_golden_trajectory(name, float64):
    ref = golden_record(golden, name)
    method = golden.build(name)
    method.load_state_dict(ref["init"], strict=True)
    rec = golden.run(method, name)
    for k in (*golden.stats(name), "teacher_temp", "momentum"):
        check_golden(rec[k], ref[k], k)
    check_golden_dict(rec["grads"], ref["grads"], "gradients of steps 1 and 3")
    check_golden_dict(rec["final"], ref["final"], "final state", golden.NOISE_ONLY.get(name))


def test_golden_files_are_small_and_exercise_what_they_pin():
    for name in NAMES:
        path = golden.golden_path(name)
        assert path.suffix == ".pt" and path.stat().st_size < 1_000_000, path
        ref = golden_record(golden, name)
        init, final, grads = ref["init"], ref["final"], ref["grads"]
        assert all(v.dtype == torch.float64 for v in final.values() if v.is_floating_point())
        # The student and, by the momentum, the teacher moved; the centre left zero.
        for branch in ("student", "teacher"):
            key = next(k for k in final if k.startswith(f"{branch}.") and k.endswith("0.attn.qkv.weight"))
            assert (final[key] - init[key]).abs().max() > 1e-5, key
        centres = [k for k in final if k.startswith("criterion.center")]
        assert centres == (["criterion.center", "criterion.center_grid"] if "esvit" in name else ["criterion.center"])
        for key in centres:
            assert init[key].abs().max() == 0 and final[key].abs().max() > 1e-3, key
        # Steps 1-2 in epoch 0 (last layer frozen, warm-up temperature), step 3 in epoch 1.
        assert not any(k.startswith("step1.") and "last_layer" in k for k in grads)
        assert any(k.startswith("step3.") and "last_layer" in k for k in grads)
        assert ref["teacher_temp"].tolist() == [0.04, 0.04, 0.07]
        # Only the student gets gradients; EsViT's dense head too.
        heads = ("student.", "student_head.", "student_dense_head.")
        assert grads and all(k.split(".", 1)[1].startswith(heads) for k in grads)
        assert any(".student_dense_head." in k for k in grads) == ("esvit" in name)
        assert ("region_loss" in ref) == ("esvit" in name)
