import math

import pytest
import torch
from torch import nn

from mobyssl.models import DINOHead


def _gelu_exact(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _by_hand(head, x, gelu=_gelu_exact):
    """The head's output from its own weights: Linears and GELUs, row normalisation, then W_k = g_k v_k / ||v_k||."""
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        x = x @ lin.weight.t() + lin.bias
        if i < len(linears) - 1:
            x = gelu(x)
    x = x / x.norm(dim=1, keepdim=True)
    g = head.last_layer.parametrizations.weight.original0  # (out_dim, 1)
    v = head.last_layer.parametrizations.weight.original1  # (out_dim, bottleneck)
    w = g * v / v.norm(dim=1, keepdim=True)
    return x @ w.t()


def _small(**kw):
    torch.manual_seed(0)
    return DINOHead(6, out_dim=10, hidden_dim=8, bottleneck_dim=4, **kw).double()


def test_default_head_layer_shapes_and_init():
    head = DINOHead(384)
    shapes = {n: tuple(p.shape) for n, p in head.named_parameters()}
    assert shapes == {
        "mlp.0.weight": (2048, 384), "mlp.0.bias": (2048,),
        "mlp.2.weight": (2048, 2048), "mlp.2.bias": (2048,),
        "mlp.4.weight": (256, 2048), "mlp.4.bias": (256,),
        "last_layer.parametrizations.weight.original0": (65536, 1),
        "last_layer.parametrizations.weight.original1": (65536, 256),
    }
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert head.last_layer.bias is None
    # Truncated normal with std 0.02 and zero biases for the MLP.
    assert abs(head.mlp[2].weight.std().item() - 0.02) < 2e-4 and abs(head.mlp[2].weight.mean().item()) < 1e-4
    assert all(torch.count_nonzero(head.mlp[i].bias) == 0 for i in (0, 2, 4))
    # The trainer freezes the last layer by name.
    assert [n for n, _ in head.named_parameters() if "last_layer" in n] == [
        "last_layer.parametrizations.weight.original0", "last_layer.parametrizations.weight.original1"]
    assert head(torch.randn(3, 384)).shape == (3, 65536)


def test_output_equals_hand_computation_from_the_heads_weights():
    head = _small(norm_last_layer=False)
    with torch.no_grad():  # magnitudes away from 1, so that g enters the check
        head.last_layer.parametrizations.weight.original0.uniform_(0.5, 2.0)
    x = torch.randn(5, 6, dtype=torch.float64)
    out = head(x)
    assert out.shape == (5, 10)
    assert torch.allclose(out, _by_hand(head, x), rtol=0, atol=1e-12)


def test_effective_last_layer_rows_have_unit_norm_at_init():
    head = DINOHead(6, out_dim=50, hidden_dim=8, bottleneck_dim=4)
    assert torch.equal(head.last_layer.parametrizations.weight.original0, torch.ones(50, 1))
    row_norms = head.last_layer.weight.norm(dim=1)
    assert torch.allclose(row_norms, torch.ones(50), rtol=0, atol=1e-6)
    # v itself is not unit-norm, so this is the normalisation, not v's init.
    assert not torch.allclose(head.last_layer.parametrizations.weight.original1.norm(dim=1), torch.ones(50), atol=1e-2)
    # Inputs are unit vectors, so every output is a cosine: |out| <= 1.
    assert head(torch.randn(7, 6) * 100).abs().max() <= 1 + 1e-6


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_norm_last_layer_freezes_the_magnitude(norm_last_layer):
    head = _small(norm_last_layer=norm_last_layer)
    g = head.last_layer.parametrizations.weight.original0
    v = head.last_layer.parametrizations.weight.original1
    assert g.requires_grad is (not norm_last_layer)
    head(torch.randn(4, 6, dtype=torch.float64)).pow(2).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    if norm_last_layer:
        assert g.grad is None
    else:
        assert g.grad is not None and g.grad.abs().sum() > 0


def test_one_layer_is_a_single_linear_to_the_bottleneck():
    head = _small(n_layers=1)
    assert len(head.mlp) == 1 and isinstance(head.mlp[0], nn.Linear)
    assert tuple(head.mlp[0].weight.shape) == (4, 6)
    x = torch.randn(3, 6, dtype=torch.float64)
    assert torch.allclose(head(x), _by_hand(head, x), rtol=0, atol=1e-12)


def test_more_layers():
    head = _small(n_layers=4)
    assert [tuple(m.weight.shape) for m in head.mlp if isinstance(m, nn.Linear)] == [(8, 6), (8, 8), (8, 8), (4, 8)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 3
    x = torch.randn(3, 6, dtype=torch.float64)
    assert torch.allclose(head(x), _by_hand(head, x), rtol=0, atol=1e-12)


def test_zero_layers_is_refused():
    with pytest.raises(ValueError, match="n_layers"):
        DINOHead(6, n_layers=0)


def test_use_bn_puts_batchnorm_after_each_hidden_linear():
    head = _small(use_bn=True)
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear, nn.BatchNorm1d, nn.GELU,
                                           nn.Linear]
    assert [m.num_features for m in head.mlp if isinstance(m, nn.BatchNorm1d)] == [8, 8]
    # In eval mode with fresh statistics (mean 0, var 1) BatchNorm only divides by sqrt(1 + eps).
    head.eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    scale = 1 / math.sqrt(1 + 1e-5)
    assert torch.allclose(head(x), _by_hand(head, x, gelu=lambda h: _gelu_exact(h * scale)), rtol=0, atol=1e-12)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in _small().mlp)


def test_gelu_is_the_exact_one():
    head = _small()
    with torch.no_grad():  # pre-activations of order 1, where the two GELUs differ visibly
        head.mlp[0].weight.normal_(0, 1)
        head.mlp[2].weight.normal_(0, 1)
    x = torch.randn(8, 6, dtype=torch.float64)
    out = head(x)
    exact, approx = _by_hand(head, x), _by_hand(head, x, gelu=_gelu_tanh)
    assert (exact - approx).abs().max() > 1e-5  # the test can tell them apart ...
    assert torch.allclose(out, exact, rtol=0, atol=1e-12)  # ... and the head uses erf
