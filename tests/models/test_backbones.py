import pytest
import timm
import torch

from mobyssl.models import PRESETS, BackboneError, TokenBatchNorm, create_backbone, feature_dim


@pytest.mark.parametrize("name", ["vit_nano_patch4_32", "swin_mini_patch2_window4_32"])
def test_small_image_presets_give_pooled_features(name):
    m = create_backbone(name).eval()
    with torch.no_grad():
        y = m(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, feature_dim(m))


def test_every_preset_resolves_to_a_timm_model():
    for p in PRESETS.values():
        assert p.base in timm.list_models()


def test_bn_before_mlp_replaces_every_swin_norm2():
    m = create_backbone("swin_mini_patch2_window4_32", norm_before_mlp="bn")
    blocks = [mod for mod in m.modules() if type(mod).__name__ == "SwinTransformerBlock"]
    assert blocks and all(isinstance(b.norm2, TokenBatchNorm) for b in blocks)
    assert all(isinstance(b.norm1, torch.nn.LayerNorm) for b in blocks)
    m.train()
    y = m(torch.randn(4, 3, 32, 32))
    y.sum().backward()
    assert blocks[0].norm2.bn.weight.grad is not None


def test_token_batchnorm_normalises_channels_over_batch_and_tokens():
    bn = TokenBatchNorm(4).train()
    x = torch.randn(3, 5, 4) * 7 + 2
    y = bn(x).reshape(-1, 4)
    assert torch.allclose(y.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(y.var(0, unbiased=False), torch.ones(4), atol=1e-3)


def test_bn_variant_needs_swin():
    with pytest.raises(BackboneError, match="Swin"):
        create_backbone("vit_nano_patch4_32", norm_before_mlp="bn")


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(BackboneError, match="swin_tiny_patch4_window7_224"):
        create_backbone("swin_tiny_patch4_window7_22")


def test_drop_path_rate_reaches_the_blocks():
    m = create_backbone("vit_nano_patch4_32", drop_path_rate=0.2)
    rates = [b.drop_path1.drop_prob for b in m.blocks if hasattr(b.drop_path1, "drop_prob")]
    assert rates and max(rates) == pytest.approx(0.2)
    m0 = create_backbone("vit_nano_patch4_32", drop_path_rate=0.0)
    assert not any(hasattr(b.drop_path1, "drop_prob") for b in m0.blocks)


def test_paper_backbones_build():
    # Swin-T and DeiT-S as in the paper (224 px); forward one image to check the contract.
    for name, dim in (("swin_tiny", 768), ("deit_small", 384)):
        m = create_backbone(name).eval()
        with torch.no_grad():
            assert m(torch.randn(1, 3, 224, 224)).shape == (1, dim)


@pytest.mark.parametrize("name", ["vit_nano_patch4_32", "swin_mini_patch2_window4_32"])
def test_tokens_and_pooled_agree_with_forward(name):
    from mobyssl.models import tokens_and_pooled

    m = create_backbone(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, pooled = tokens_and_pooled(m, x)
        assert torch.allclose(pooled, m(x), atol=1e-5)
    assert tokens.ndim in (3, 4) and tokens.shape[0] == 2 and tokens.shape[-1] == feature_dim(m)


@pytest.mark.parametrize("name, dim", [("swin_small", 768), ("swin_base", 1024), ("deit_base", 768),
                                       ("vit_tiny", 192)])
def test_paper_family_aliases(name, dim):
    m = create_backbone(name, drop_path_rate=0.2)
    assert feature_dim(m) == dim
