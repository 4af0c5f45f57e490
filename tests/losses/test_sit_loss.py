"""SiT's loss: the masked L1 by hand, the contrastive part equal to MoCo v3's, the weighting."""

import pytest
import torch

from mobyssl.losses import MoCoV3Loss, SiTLoss, masked_l1


def test_masked_l1_by_hand(float64):
    rec = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]]])  # (1, 2, 2, 2)
    clean = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]], [[1.0, -1.0], [2.0, 5.0]]]])
    mask = torch.tensor([[[True, False], [False, True]]])  # pixels (0,0) and (1,1), both channels
    # |1-0| + |4-0| (channel 0) + |0-1| + |0-5| (channel 1) over 4 masked elements
    assert masked_l1(rec, clean, mask).item() == pytest.approx((1 + 4 + 1 + 5) / 4)


def test_masked_l1_pools_over_the_batch_so_bigger_masks_weigh_more(float64):
    rec, clean = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    rec[1] = 3.0
    mask = torch.tensor([[[True, True], [True, False]], [[True, False], [False, False]]])  # 3 and 1 pixels
    assert masked_l1(rec, clean, mask).item() == pytest.approx((3 * 1 + 1 * 3) / 4)  # not (1 + 3) / 2


def test_unmasked_pixels_get_no_gradient_and_an_empty_mask_gives_zero(float64):
    rec = torch.randn(1, 3, 4, 4, requires_grad=True)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2] = True
    masked_l1(rec, torch.zeros(1, 3, 4, 4), mask).backward()
    assert rec.grad[:, :, 2:].abs().sum() == 0 and rec.grad[:, :, :2].abs().min() > 0
    empty = masked_l1(rec, torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool))
    assert empty.item() == 0 and empty.requires_grad


@pytest.mark.parametrize("lmbda", [1.0, 5.0, 0.0])
def test_sit_loss_is_mocov3s_contrastive_term_plus_lmbda_times_the_masked_l1(float64, lmbda):
    g = torch.Generator().manual_seed(0)
    s1, s2, t1, t2 = (torch.randn(4, 8, generator=g) for _ in range(4))
    rec, clean = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    mask = torch.rand(8, 4, 4, generator=g) < 0.5
    out = SiTLoss(0.2, lmbda)([s1, s2], [t1, t2], rec, clean, mask)
    contrastive = MoCoV3Loss(0.2)(s1, s2, t1, t2)  # the student projections are the queries, the teacher's the keys
    assert out["contrastive"].item() == pytest.approx(contrastive["loss"].item(), rel=1e-12)
    assert out["reconstruction"].item() == pytest.approx(masked_l1(rec, clean, mask).item(), rel=1e-12)
    assert out["loss"].item() == pytest.approx(out["contrastive"].item() + lmbda * out["reconstruction"].item(),
                                               rel=1e-12)
    for k in ("pos_sim", "neg_sim", "feature_std"):
        assert out[k].item() == pytest.approx(contrastive[k].item(), rel=1e-12)
    # The views are crossed: student view 1 against teacher view 2, not against its own view.
    same_view = MoCoV3Loss(0.2)(s1, s2, t2, t1)["loss"]
    assert abs(same_view.item() - out["contrastive"].item()) > 1e-3
