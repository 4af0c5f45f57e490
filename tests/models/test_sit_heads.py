"""SiT's contrastive head (mixed activations, biases) and its pixel decoder (one p x p patch per token)."""

import pytest
import torch
from torch import nn

from mobyssl.models import ReconstructionHead, SiTHead


def test_contrastive_head_layout():
    head = SiTHead(16, out_dim=8, hidden_dim=32, n_layers=3)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d"]
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 8)]
    assert all(m.bias is not None and torch.count_nonzero(m.bias) == 0 for m in linears)
    assert all(abs(m.weight.std().item() - 0.02) < 0.002 for m in linears)  # (truncated) normal, std 0.02
    assert not head.mlp[-1].affine and head.mlp[1].affine
    assert [type(m).__name__ for m in SiTHead(16, 8, 32, n_layers=4).mlp].count("GELU") == 2
    assert [type(m).__name__ for m in SiTHead(16, 8, 32, n_layers=1).mlp] == ["Linear"]
    assert head(torch.randn(5, 16)).shape == (5, 8)


def test_decoder_paints_each_tokens_own_patch():
    torch.manual_seed(0)
    dec = ReconstructionHead(dim=8, patch_size=4)
    tokens = torch.randn(2, 9, 8)  # a 3 x 3 grid
    out = dec(tokens)
    assert out.shape == (2, 3, 12, 12)
    changed = tokens.clone()
    changed[1, 5] += 1.0  # token 5 = row 1, column 2
    diff = (dec(changed) - out).abs().sum(1)  # (2, 12, 12)
    assert diff[0].max() == 0
    touched = diff[1] > 0
    assert touched[4:8, 8:12].all() and touched.sum() == 16  # exactly that token's 4 x 4 patch


def test_decoder_refuses_a_grid_that_is_not_square():
    with pytest.raises(ValueError, match="square token grid"):
        ReconstructionHead(8, 4)(torch.randn(1, 6, 8))
