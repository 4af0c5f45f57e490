"""MoCo v3's ViT changes (init, sin-cos position table, frozen patch projection) and its MLP heads."""

import math

import pytest
import torch
from torch import nn

from mobyssl.errors import BackboneError
from mobyssl.models import MoCoMLP, create_backbone
from mobyssl.models.mocov3_vit import make_mocov3_vit, sincos_position_table


def table_by_hand(h, w, dim):
    """MoCo v3's formula written out: row m of the patches has a = m // h, b = m % h."""
    quarter = dim // 4
    rows = [[0.0] * dim]
    for m in range(h * w):
        a, b = m // h, m % h
        omegas = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]
        rows.append([math.sin(a * o) for o in omegas] + [math.cos(a * o) for o in omegas]
                    + [math.sin(b * o) for o in omegas] + [math.cos(b * o) for o in omegas])
    return torch.tensor(rows)[None]


@pytest.mark.parametrize("h, w, dim", [(4, 4, 16), (2, 3, 8), (3, 2, 12)])
def test_sincos_table_by_hand(h, w, dim):
    table = sincos_position_table(h, w, dim)
    assert table.shape == (1, 1 + h * w, dim) and table.dtype == torch.float32
    torch.testing.assert_close(table, table_by_hand(h, w, dim).float(), atol=1e-6, rtol=0)


def test_sincos_rows_of_a_square_grid_follow_the_token_row_then_column():
    table = sincos_position_table(3, 3, 8)[0, 1:]
    # token 5 is row 1, column 2: its first half encodes 1 and its second half 2
    assert table[5, 0].item() == pytest.approx(math.sin(1.0), abs=1e-7)
    assert table[5, 4].item() == pytest.approx(math.sin(2.0), abs=1e-7)


def test_a_width_not_divisible_by_4_is_refused():
    with pytest.raises(BackboneError, match=r"divisible by 4.*method\.sincos_pos_embed=false"):
        sincos_position_table(2, 2, 18)


def vit(**kw):
    torch.manual_seed(0)
    return create_backbone("vit_small_patch16_224", img_size=32, patch_size=4, depth=2, **kw)


def test_the_vit_gets_the_fixed_table_and_a_frozen_patch_projection():
    model = make_mocov3_vit(vit())
    torch.testing.assert_close(model.pos_embed.data, sincos_position_table(8, 8, 384), rtol=0, atol=0)
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["patch_embed.proj.bias", "patch_embed.proj.weight", "pos_embed"]


def test_each_option_can_be_turned_off():
    learned = make_mocov3_vit(vit(), sincos_pos_embed=False, freeze_patch_embed=False)
    assert all(p.requires_grad for p in learned.parameters())
    assert not torch.allclose(learned.pos_embed, sincos_position_table(8, 8, 384))
    only_table = make_mocov3_vit(vit(), sincos_pos_embed=True, freeze_patch_embed=False)
    assert [n for n, p in only_table.named_parameters() if not p.requires_grad] == ["pos_embed"]


def test_mocov3_init():
    model = make_mocov3_vit(vit())
    dim = 384
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out_f, in_f = module.weight.shape
            bound = math.sqrt(6 / (out_f / 3 + in_f)) if name.endswith("qkv") else math.sqrt(6 / (out_f + in_f))
            w = module.weight.abs().max().item()
            assert bound * 0.98 < w <= bound, (name, w, bound)  # uniform on exactly that range
            assert torch.count_nonzero(module.bias) == 0, name
    assert model.cls_token.std().item() == pytest.approx(1e-6, rel=0.2)
    proj = model.patch_embed.proj.weight
    bound = math.sqrt(6 / (3 * 4 * 4 + dim))
    assert bound * 0.98 < proj.abs().max().item() <= bound
    assert torch.count_nonzero(model.patch_embed.proj.bias) == 0
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name


def test_a_swin_takes_the_heads_and_loss_only_with_both_vit_options_off():
    swin = create_backbone("swin_nano_patch2_window4_32")
    before = {k: v.clone() for k, v in swin.state_dict().items()}
    with pytest.raises(BackboneError, match=r"method\.sincos_pos_embed and method\.stop_grad_patch_embed.*false"):
        make_mocov3_vit(swin)
    assert make_mocov3_vit(swin, False, False) is swin
    assert all(torch.equal(v, swin.state_dict()[k]) for k, v in before.items())  # left as timm built it


@pytest.mark.parametrize("layers, last_bn", [(3, True), (2, True), (2, False), (1, True)])
def test_moco_mlp_layout(layers, last_bn):
    mlp = MoCoMLP(layers, 10, 32, 8, last_bn=last_bn)
    linears = [m for m in mlp.net if isinstance(m, nn.Linear)]
    bns = [m for m in mlp.net if isinstance(m, nn.BatchNorm1d)]
    assert len(linears) == layers and all(m.bias is None for m in linears)
    assert [m.in_features for m in linears] == [10] + [32] * (layers - 1)
    assert [m.out_features for m in linears] == [32] * (layers - 1) + [8]
    assert len(bns) == layers - 1 + last_bn
    assert all(b.affine for b in bns[:layers - 1])
    if last_bn:
        assert not bns[-1].affine and bns[-1].num_features == 8
    assert sum(isinstance(m, nn.ReLU) for m in mlp.net) == layers - 1
    out = mlp(torch.randn(6, 10))
    assert out.shape == (6, 8)
    if last_bn:  # the last BN without affine: zero mean, unit variance per feature over the batch
        torch.testing.assert_close(out.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
