"""EsViT's pad-then-shift windows for Swins on crops smaller than their build size."""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from mobyssl.models import BackboneError, create_backbone, patch_tokens
from mobyssl.models.swin_windows import use_esvit_windows

# Window 7 on a 14x14 first-stage map: shifted blocks (shift 3) at the build size; a 24 px crop gives a 6x6 map,
# padded to 7x7 before the shift.
SWIN = dict(img_size=56, patch_size=4, window_size=7, embed_dim=16, depths=(2, 2), num_heads=(1, 2))


def _swin(**kw):
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, strict_img_size=False, **SWIN, **kw).eval()


def _shifted_block(model):
    block = model.layers[0].blocks[1]
    assert block.shift_size == (3, 3) and block.window_size == (7, 7)
    return block


def test_at_the_build_size_esvit_windows_are_timms():
    stock, esvit = _swin(), _swin()
    assert use_esvit_windows(esvit) == 4
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(esvit.forward_features(x), stock.forward_features(x))


def test_a_smaller_map_is_padded_with_zero_tokens_before_the_shift():
    """EsViT's block on a 6x6 map = timm's block on that map zero-padded to 7x7 (no padding left for timm to do,
    so timm only shifts and masks the whole padded map), cropped back; timm's own order (shift, then pad) differs."""
    model = _swin()
    block = _shifted_block(model)
    x = torch.randn(2, 6, 6, 16)
    with torch.no_grad():
        stock = block._attn(x)
        padded_then_stock = block._attn(F.pad(x, (0, 0, 0, 1, 0, 1)))[:, :6, :6]
        use_esvit_windows(model)
        esvit = block._attn(x)
    torch.testing.assert_close(esvit, padded_then_stock, rtol=0, atol=1e-6)
    assert (esvit - stock).abs().max() > 1e-3  # the two orders really differ here


def test_whole_model_on_a_local_crop_differs_from_timm_only_through_the_windows():
    stock, esvit = _swin(), _swin()
    use_esvit_windows(esvit)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        a, b = esvit.forward_features(x), stock.forward_features(x)
    assert a.shape == b.shape == (2, 3, 3, 32)
    assert (a - b).abs().max() > 1e-3


def test_state_dict_is_timms_so_weights_load_in_a_plain_timm_swin():
    esvit = _swin()
    use_esvit_windows(esvit)
    plain = _swin()
    plain.load_state_dict(esvit.state_dict(), strict=True)
    assert set(esvit.state_dict()) == set(plain.state_dict())


def test_create_backbone_multi_size_swin_gets_esvit_windows_and_a_vit_does_not():
    swin = create_backbone("swin_mini_patch2_window4_32", multi_size=True)
    blocks = [m for m in swin.modules() if type(m).__name__ == "SwinTransformerBlock"]
    assert blocks and all(m._attn.__func__.__name__ == "_esvit_attn" for m in blocks)
    single = create_backbone("swin_mini_patch2_window4_32")
    assert all("_attn" not in vars(m) for m in single.modules())
    vit = create_backbone("vit_nano_patch4_32", multi_size=True)
    assert use_esvit_windows(vit) == 0


def test_esvit_windows_survive_a_deep_copy_and_train():
    import copy

    model = create_backbone("swin_mini_patch2_window4_32", multi_size=True, depths=(1, 1, 1, 1))
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16)
    block = [m for m in twin.modules() if type(m).__name__ == "SwinTransformerBlock"][0]
    assert block._attn.__self__ is block  # bound to the copy, not to the original
    twin(x).sum().backward()
    assert all(p.grad is not None for p in twin.parameters() if p.requires_grad)


def test_layer_norm_eps_reaches_every_layer_norm():
    model = create_backbone("swin_mini_patch2_window4_32", layer_norm_eps=1e-6)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and {m.eps for m in norms} == {1e-6}
    default = create_backbone("swin_mini_patch2_window4_32")
    assert {m.eps for m in default.modules() if isinstance(m, nn.LayerNorm)} == {1e-5}


def test_patch_tokens_in_raster_order_for_swin_vit_and_cnn_layouts():
    swin = create_backbone("swin_mini_patch2_window4_32")
    nhwc = torch.arange(2 * 2 * 3 * 4.0).view(2, 2, 3, 4)  # (B, H, W, C)
    assert torch.equal(patch_tokens(swin, nhwc)[0, 4], nhwc[0, 1, 1])  # token t = h * W + w
    vit = create_backbone("vit_nano_patch4_32")
    seq = torch.randn(2, 1 + 64, 128)
    assert torch.equal(patch_tokens(vit, seq), seq[:, 1:])
    cnn = nn.Identity()  # no output_fmt: NCHW
    nchw = torch.randn(2, 5, 3, 4)
    assert torch.equal(patch_tokens(cnn, nchw)[1, 7], nchw[1, :, 1, 3])
    with pytest.raises(BackboneError, match="no token grid"):
        patch_tokens(vit, torch.randn(2, 128))


def test_layer_norm_eps_with_a_vit():
    vit = create_backbone("vit_nano_patch4_32", layer_norm_eps=1e-5)
    assert {m.eps for m in vit.modules() if isinstance(m, nn.LayerNorm)} == {1e-5}
