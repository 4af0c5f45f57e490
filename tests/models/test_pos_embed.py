"""DINO's position-embedding resampling on a timm ViT (multi-crop views of another size than the build size)."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from mobyssl.models import create_backbone
from mobyssl.models.pos_embed import dino_resample, use_dino_pos_embed


def _vit(**kw):
    torch.manual_seed(0)
    model = create_backbone("vit_nano_patch4_32", depth=1, dynamic_img_size=True, **kw)
    with torch.no_grad():
        model.pos_embed.normal_()  # timm starts it near zero; unit variance makes resampling differences visible
    return model.eval()


def test_build_size_is_left_as_it_is():
    pos = torch.randn(1, 1 + 64, 8)
    assert dino_resample(pos, (8, 8)) is pos


def test_smaller_grid_uses_dinos_scale_factor_not_a_size():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 64, 8, dtype=torch.float64)
    out = dino_resample(pos, (3, 5))
    assert out.shape == (1, 1 + 15, 8) and torch.equal(out[:, :1], pos[:, :1])  # the CLS entry is kept
    grid = pos[:, 1:].reshape(1, 8, 8, 8).permute(0, 3, 1, 2)
    # Rows and columns are scaled separately: (3 + 0.1) / 8 and (5 + 0.1) / 8.
    expected = F.interpolate(grid, scale_factor=(3.1 / 8, 5.1 / 8), mode="bicubic", align_corners=False)
    assert torch.allclose(out[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 15, 8), atol=1e-12)
    by_size = F.interpolate(grid, size=(3, 5), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    assert (out[:, 1:] - by_size.reshape(1, 15, 8)).abs().max() > 1e-2  # the sampling positions really differ


def test_vit_tokens_use_dino_resampling_for_local_crops_and_nothing_changes_at_the_build_size():
    timm_vit, dino_vit = _vit(), use_dino_pos_embed(_vit())
    assert set(dino_vit.state_dict()) == set(timm_vit.state_dict())  # exports still load in timm
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(dino_vit.forward_features(x), timm_vit.forward_features(x))
    local = torch.randn(2, 3, 16, 16)
    tokens = dino_vit.forward_features(local)
    assert tokens.shape == (2, 1 + 16, 128)
    assert not torch.allclose(tokens, timm_vit.forward_features(local), atol=1e-3)  # timm resamples otherwise
    # By hand: patch embedding, CLS, DINO-resampled positions, then the blocks and the final norm.
    with torch.no_grad():
        patches = dino_vit.patch_embed(local).reshape(2, 16, 128)
        seq = torch.cat([dino_vit.cls_token.expand(2, -1, -1), patches], 1) + dino_resample(dino_vit.pos_embed, (4, 4))
        expected = dino_vit.norm(dino_vit.blocks(seq))
    assert torch.allclose(tokens, expected, atol=1e-6)
    reference = resample_abs_pos_embed(dino_vit.pos_embed, new_size=(4, 4), num_prefix_tokens=1)
    assert not torch.allclose(dino_resample(dino_vit.pos_embed, (4, 4)), reference, atol=1e-3)


def test_refuses_a_vit_it_cannot_serve():
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        use_dino_pos_embed(create_backbone("vit_nano_patch4_32", depth=1))
    with pytest.raises(ValueError, match="CLS token"):
        use_dino_pos_embed(create_backbone("vit_nano_patch4_32", depth=1, dynamic_img_size=True, reg_tokens=2))
