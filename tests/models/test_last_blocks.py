"""``LastBlocksFeatures``: DINO's and EsViT's linear-probe features, the pooled outputs of the last N blocks.

The expected values come from forward hooks on the blocks during the backbone's own forward pass, pooled by hand,
so they do not share the feature module's loop.
"""

from __future__ import annotations

import pytest
import timm
import torch

from mobyssl.errors import BackboneError
from mobyssl.models import create_backbone
from mobyssl.models.last_blocks import LastBlocksFeatures, check_last_blocks, count_blocks


def block_outputs(model, blocks, x):
    """Each block's output during ``model(x)``, in order."""
    outs = []
    handles = [b.register_forward_hook(lambda _m, _i, out: outs.append(out)) for b in blocks]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return outs


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["vit_nano_patch4_32", "swin_nano_patch2_window4_32"])
def test_one_block_is_the_backbones_own_pooled_feature(name, images):
    torch.manual_seed(0)
    model = create_backbone(name, drop_path_rate=0.1).eval()
    features = LastBlocksFeatures(model, 1)
    assert features.num_features == model.num_features
    torch.testing.assert_close(features(images), model(images), rtol=0, atol=0)


@pytest.mark.parametrize("n", [2, 4])
def test_vit_concatenates_the_normed_class_tokens_of_the_last_blocks(n, images):
    torch.manual_seed(0)
    model = create_backbone("vit_nano_patch4_32").eval()  # 4 blocks
    outs = block_outputs(model, model.blocks, images)
    with torch.no_grad():
        expected = torch.cat([model.norm(o)[:, 0] for o in outs[-n:]], dim=1)
        got = LastBlocksFeatures(model, n)(images)
    assert got.shape == (3, 128 * n) and LastBlocksFeatures(model, n).num_features == 128 * n
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # The blocks differ, so a wrong block choice would show.
    assert not torch.allclose(model.norm(outs[-1])[:, 0], model.norm(outs[-2])[:, 0], atol=1e-3)


def test_vit_with_average_pooling_averages_each_blocks_patch_tokens(images):
    torch.manual_seed(0)
    model = create_backbone("vit_nano_patch4_32", global_pool="avg", fc_norm=False).eval()
    outs = block_outputs(model, model.blocks, images)
    with torch.no_grad():
        expected = torch.cat([model.norm(o)[:, 1:].mean(1) for o in outs[-2:]], dim=1)
        torch.testing.assert_close(LastBlocksFeatures(model, 2)(images), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_swin_averages_each_blocks_tokens_and_norms_only_the_last_stage(n, images):
    torch.manual_seed(0)
    model = create_backbone("swin_nano_patch2_window4_32").eval()  # depths 1-1-2-1, widths 32-64-128-256
    blocks = [b for stage in model.layers for b in stage.blocks]
    outs = block_outputs(model, blocks, images)
    with torch.no_grad():
        pooled = [o.mean(dim=(1, 2)) for o in outs[:-1]] + [model.norm(outs[-1]).mean(dim=(1, 2))]
        expected = torch.cat(pooled[-n:], dim=1)
        features = LastBlocksFeatures(model, n)
        got = features(images)
    assert features.num_features == sum([32, 64, 128, 128, 256][-n:]) == got.shape[1]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_the_papers_widths_swin_t_and_vit_s_with_four_blocks():
    # EsViT's eval_linear: the sum of the last 4 block widths of Swin-T (depths 2-2-6-2, widths 96 x 2^stage).
    widths = [96 * 2 ** i for i, d in enumerate((2, 2, 6, 2)) for _ in range(d)]
    swin = create_backbone("swin_tiny_patch4_window7_224")
    assert count_blocks(swin) == 12
    assert LastBlocksFeatures(swin, 4).num_features == sum(widths[-4:]) == 2304
    vit = create_backbone("vit_small_patch16_224")  # DINO: 4 x 384 class tokens
    assert count_blocks(vit) == 12 and LastBlocksFeatures(vit, 4).num_features == 1536


def test_too_many_blocks_names_the_key_and_the_range():
    model = create_backbone("vit_nano_patch4_32")
    with pytest.raises(BackboneError, match=r"linear\.n_last_blocks=5, but the backbone has 4 blocks.*1 to 4"):
        LastBlocksFeatures(model, 5)
    check_last_blocks(model, 4)  # the largest that fits


def test_a_backbone_without_transformer_blocks_is_refused_for_more_than_one_block():
    cnn = timm.create_model("resnet18", pretrained=False, num_classes=0)
    assert count_blocks(cnn) == 0
    check_last_blocks(cnn, 1)  # the pooled feature needs no blocks
    with pytest.raises(BackboneError, match=r"linear\.n_last_blocks=2 needs a ViT or Swin.*linear\.n_last_blocks=1"):
        check_last_blocks(cnn, 2)
