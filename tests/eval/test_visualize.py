"""Visualisations: attention maps are the last block's softmax probabilities, DINO's threshold masks, PCA colours follow
the principal directions, and the PNG writers produce images of the documented sizes showing what they claim."""

import json

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mobyssl.errors import BackboneError, DataError
from mobyssl.eval import visualize as V
from mobyssl.models import create_backbone


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only contends with the other jobs on the machine (40x slower on a
    loaded 2-core box). The previous setting comes back after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


IMAGENET_MEAN, IMAGENET_STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def _vit(**kwargs):
    torch.manual_seed(0)
    return create_backbone("vit_nano_patch4_32", depth=2, **kwargs)


def _png(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()
        return img.convert("RGB")


def _layer_norm(norm, x):
    """``norm`` (a LayerNorm, or an Identity without qk_norm) applied in float64."""
    if isinstance(norm, nn.Identity):
        return x
    return F.layer_norm(x, norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps)


def _manual_attention(vit, images):
    """softmax(q k^T / sqrt(d)) of the last block in float64, from its input (caught here) and its weights."""
    block = vit.blocks[-1]
    caught = []
    handle = block.register_forward_pre_hook(lambda module, args: caught.append(args[0]))
    vit.eval()
    with torch.no_grad():
        vit.forward_features(images)
        handle.remove()
        x = block.norm1(caught[0]).double()
        heads = block.attn.num_heads
        head_dim = x.shape[-1] // heads
        qkv = x @ block.attn.qkv.weight.double().T + block.attn.qkv.bias.double()
        q, k = (qkv[..., i * x.shape[-1]:(i + 1) * x.shape[-1]].unflatten(-1, (heads, head_dim)).transpose(1, 2)
                for i in range(2))
        q, k = _layer_norm(block.attn.q_norm, q), _layer_norm(block.attn.k_norm, k)
        return torch.softmax(q @ k.transpose(-2, -1) / head_dim ** 0.5, dim=-1)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_maps_are_the_cls_row_of_the_last_softmax(qk_norm):
    # A 16x32 image gives a 4x8 grid: a swapped h/w or a wrong raster order would not match. Dropout in training
    # mode would change the block's input: the maps must come from eval mode, and the mode must come back.
    vit = _vit(img_size=(16, 32), qk_norm=qk_norm, pos_drop_rate=0.5)
    images = torch.randn(2, 3, 16, 32, generator=torch.Generator().manual_seed(1))
    vit.train()
    maps = V.cls_attention(vit, images)
    full = V.last_self_attention(vit, images)
    assert vit.training and not vit.blocks[-1].attn._forward_pre_hooks
    expected = _manual_attention(vit, images)
    assert maps.shape == (2, 4, 4, 8)
    torch.testing.assert_close(full.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps.double(), expected[:, :, 0, 1:].reshape(2, 4, 4, 8), atol=1e-6, rtol=1e-5)
    # Probability maps: non-negative, and with the weight the CLS query gives itself they sum to 1.
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.double().sum((-2, -1)) + expected[:, :, 0, 0], torch.ones(2, 4, dtype=torch.float64))
    assert (maps.sum((-2, -1)) < 1).all()


def test_attention_maps_need_a_vit_with_a_class_token():
    with pytest.raises(BackboneError, match="need a ViT backbone.*SwinTransformer.*PCA"):
        V.cls_attention(create_backbone("swin_nano_patch2_window4_32"), torch.zeros(1, 3, 32, 32))
    with pytest.raises(BackboneError, match="no class token"):
        V.cls_attention(_vit(class_token=False, global_pool="avg"), torch.zeros(1, 3, 32, 32))


def test_threshold_masks_by_hand():
    # Mass in sixteenths 6, 1 / 4, 5 (sum 16), given unnormalised (halved) as attention maps are. Descending:
    # 6, 5, 4, 1 with mass above them 0, 6/16, 11/16, 15/16.
    first = torch.tensor([[6.0, 1.0], [4.0, 5.0]]) / 32
    second = torch.tensor([[0.0, 1.0], [0.0, 3.0]])  # 3/4 in one patch, two empty patches
    attn = torch.stack([first, second])[None]  # (1, 2, 2, 2): batch 1, two heads
    cases = {
        0.0: ([[0, 0], [0, 0]], [[0, 0], [0, 0]]),
        0.375: ([[1, 0], [0, 0]], [[0, 0], [0, 1]]),  # 6/16 is exactly 0.375: enough
        0.5: ([[1, 0], [0, 1]], [[0, 0], [0, 1]]),
        0.8: ([[1, 0], [1, 1]], [[0, 1], [0, 1]]),
        1.0: ([[1, 1], [1, 1]], [[0, 1], [0, 1]]),  # empty patches hold nothing
    }
    for t, (mask_first, mask_second) in cases.items():
        masks = V.threshold_masks(attn, t)
        assert masks.dtype == torch.bool and masks.shape == attn.shape
        assert masks[0, 0].tolist() == [[bool(v) for v in row] for row in mask_first], t
        assert masks[0, 1].tolist() == [[bool(v) for v in row] for row in mask_second], t
    with pytest.raises(ValueError, match="fraction"):
        V.threshold_masks(attn, 1.5)


def test_threshold_masks_agree_with_the_ascending_cumulative_sum_rule():
    # The spec's wording, computed another way: sort ascending, cumulative sum of the renormalised mass, keep > 1 - t.
    attn = torch.rand(3, 2, 5, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    attn[..., 0, :5] = 0  # empty patches: never kept, even at t = 1 where rounding leaves the mass above them < 1
    for t in (0.1, 0.45, 0.6, 0.9, 1.0):
        flat = attn.flatten(-2) / attn.flatten(-2).sum(-1, keepdim=True)
        values, order = flat.sort(-1)
        keep_sorted = values.cumsum(-1) > 1 - t
        expected = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted).reshape(attn.shape)
        masks = V.threshold_masks(attn, t)
        assert torch.equal(masks, expected), t
        kept = (flat * masks.flatten(-2)).sum(-1)
        assert (kept >= t - 1e-12).all() and (kept - flat.masked_fill(~masks.flatten(-2), 2).min(-1).values < t).all()


def test_pca_colours_follow_the_principal_directions():
    # Tokens spread along three orthonormal directions with variances 100, 9 and 1, plus an offset and faint noise
    # in every direction: channel r is the min-max scaled coordinate along direction r, over the whole batch, with
    # the sign that makes the direction's largest loading positive.
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    # Coordinates that are uncorrelated in the sample itself (centred, orthogonalised), or the sample's principal
    # directions would be a rotation of the basis.
    raw = torch.randn(2 * 4 * 5, 3, generator=g, dtype=torch.float64)
    coords = torch.linalg.qr(raw - raw.mean(0))[0] * torch.tensor([10.0, 3.0, 1.0], dtype=torch.float64) * 40 ** 0.5
    tokens = coords @ basis[:, :3].T + 5.0 + 1e-4 * torch.randn(40, 6, generator=g, dtype=torch.float64)
    rgb = V.pca_rgb(tokens.float().reshape(2, 4, 5, 6))
    assert rgb.shape == (2, 4, 5, 3) and rgb.dtype == torch.float32
    signs = basis[:, :3].gather(0, basis[:, :3].abs().argmax(0, keepdim=True)).sign()
    signed = coords * signs
    expected = (signed - signed.min(0).values) / (signed.max(0).values - signed.min(0).values)
    torch.testing.assert_close(rgb.reshape(40, 3).double(), expected, atol=2e-3, rtol=0)
    assert rgb.min() == 0 and rgb.max() == 1
    flat = rgb.reshape(40, 3)
    assert (flat.min(0).values == 0).all() and (flat.max(0).values == 1).all()


def test_pca_without_three_components_leaves_the_missing_channels_black():
    two_channels = V.pca_rgb(torch.randn(1, 3, 3, 2, generator=torch.Generator().manual_seed(0)))
    assert two_channels[..., :2].amax((0, 1, 2)).tolist() == [1, 1] and (two_channels[..., 2] == 0).all()
    assert (V.pca_rgb(torch.full((2, 3, 3, 8), 0.7)) == 0).all()
    g = torch.Generator().manual_seed(0)
    rank_two = torch.randn(30, 2, generator=g) @ torch.randn(2, 8, generator=g) + 0.3  # float32 rounding off the plane
    rgb = V.pca_rgb(rank_two.reshape(2, 3, 5, 8))
    assert (rgb[..., 2] == 0).all() and rgb[..., :2].amax((0, 1, 2)).tolist() == [1, 1]


def test_feature_grid_of_a_vit_and_a_swin():
    vit = _vit(img_size=(16, 32), pos_drop_rate=0.5).train()  # dropout would make training-mode tokens differ
    images = torch.randn(2, 3, 16, 32, generator=torch.Generator().manual_seed(0))
    grid = V.feature_grid(vit, images)
    assert vit.training
    with torch.no_grad():
        tokens = vit.eval().forward_features(images)
    assert grid.shape == (2, 4, 8, 128)
    torch.testing.assert_close(grid, tokens[:, 1:].reshape(2, 4, 8, 128))
    swin = create_backbone("swin_nano_patch2_window4_32").train()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    grid = V.feature_grid(swin, images)
    assert swin.training
    with torch.no_grad():
        torch.testing.assert_close(grid, swin.eval().forward_features(images))
    assert grid.shape == (2, 2, 2, 256)


def test_overlay_puts_each_patch_as_a_solid_square_of_the_colour_map():
    image = torch.full((3, 8, 8), 0.5)
    heat = torch.tensor([[0.0, 3.0], [1.0, 0.0]])  # min-max: 0, 1, 1/3, 0
    img = np.asarray(V.overlay(image, heat, alpha=0.75, cmap="viridis", min_side=32)).astype(float)
    assert img.shape == (32, 32, 3)  # 8 px enlarged 4 times
    colour = matplotlib.colormaps["viridis"]
    for (row, col), unit in {(0, 0): 0.0, (0, 1): 1.0, (1, 0): 1 / 3, (1, 1): 0.0}.items():
        expected = (0.25 * 0.5 + 0.75 * np.array(colour(unit)[:3])) * 255
        block = img[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16]
        assert np.abs(block - expected).max() <= 1, (row, col)


def test_tiles_are_enlarged_by_the_smallest_whole_factor_reaching_min_side():
    assert [V.upscale_factor(side, 128) for side in (32, 40, 127, 128, 200)] == [4, 4, 2, 1, 1]
    assert V.overlay(torch.zeros(3, 40, 30), torch.zeros(5, 5), min_side=96).size == (120, 160)  # 30 px: 4 times


def _normalised(images01):
    return (images01 - IMAGENET_MEAN.view(3, 1, 1)) / IMAGENET_STD.view(3, 1, 1)


def test_attention_pngs_show_each_head_and_its_mask(tmp_path):
    vit = _vit()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    written = V.save_attention_pngs(vit, images, tmp_path / "out", names=["cat", "dog"], threshold=0.6)
    heads = range(4)
    expected = {f"{n}_{kind}.png" for n in ("cat", "dog") for kind in
                ["image", "attn", *(f"attn_head{j}" for j in heads), *(f"mask_head{j}" for j in heads)]}
    assert {p.name for p in written} == expected == {p.name for p in (tmp_path / "out").iterdir()}
    for name in expected:
        size = (5 * 128 + 4 * V.GAP, 128) if name.endswith("_attn.png") else (128, 128)
        assert _png(tmp_path / "out" / name).size == size, name

    # On a uniform image the brightness of each 16x16 block follows the head's attention (inferno is monotonic in
    # brightness) and the undimmed blocks of the mask PNG are the threshold mask.
    grey = _normalised(torch.full((1, 3, 32, 32), 0.5))
    V.save_attention_pngs(vit, grey, tmp_path / "grey", names=["g"], threshold=0.6)
    maps = V.cls_attention(vit, grey)[0]
    masks = V.threshold_masks(maps, 0.6)
    for j in heads:
        heat = np.asarray(_png(tmp_path / "grey" / f"g_attn_head{j}.png")).astype(float).sum(-1)
        blocks = heat.reshape(8, 16, 8, 16).transpose(0, 2, 1, 3).reshape(8, 8, 256)
        assert (blocks.std(-1) == 0).all()
        assert np.argsort(blocks[..., 0].ravel()).tolist()[-3:] == maps[j].flatten().argsort().tolist()[-3:]
        dimmed = np.asarray(_png(tmp_path / "grey" / f"g_mask_head{j}.png")).astype(float)[8::16, 8::16, 0]
        assert ((dimmed > 100) == masks[j].numpy()).all() and 0 < masks[j].sum() < 64


def test_pca_png_of_a_swin_shows_image_and_components(tmp_path):
    swin = create_backbone("swin_nano_patch2_window4_32")
    images01 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images = _normalised(images01)
    written = V.save_pca_pngs(swin, images, tmp_path, names=["a", "b"])
    assert [p.name for p in written] == ["a_pca.png", "b_pca.png"]
    rgb = V.pca_rgb(V.feature_grid(swin, images))
    for i, path in enumerate(written):
        img = np.asarray(_png(path)).astype(float)
        assert img.shape == (128, 3 * 128 + 2 * V.GAP, 3)
        shown = images01[i].permute(1, 2, 0).repeat_interleave(4, 0).repeat_interleave(4, 1).numpy() * 255
        assert np.abs(img[:, :128] - shown).max() <= 1  # the image, un-normalised and enlarged 4 times
        components = img[:, 128 + V.GAP:256 + V.GAP]
        for row in range(2):  # the 2x2 last-stage grid: 64 px squares of the PCA colour
            for col in range(2):
                block = components[row * 64:(row + 1) * 64, col * 64:(col + 1) * 64]
                assert np.abs(block - rgb[i, row, col].numpy() * 255).max() <= 1


def test_nearest_neighbours_rank_by_cosine_similarity():
    bank = torch.tensor([[1.0, 0.0], [3.0, 3.0], [0.0, 5.0], [-2.0, 0.0]])
    query = torch.tensor([[2.0, 1.0]])  # cosines .894, .949, .447, -.894 (dot products would rank row 2 second)
    sims, idx = V.nearest_neighbours(query, bank, k=3)
    assert idx.tolist() == [[1, 0, 2]]
    torch.testing.assert_close(sims, torch.tensor([[9 / (18 * 5) ** 0.5, 2 / 5 ** 0.5, 1 / 5 ** 0.5]]))
    _, idx = V.nearest_neighbours(bank[1:2], bank, k=2, exclude=torch.tensor([1]))
    assert idx.tolist() == [[0, 2]]
    with pytest.raises(ValueError, match="k=4"):
        V.nearest_neighbours(query, bank, k=4, exclude=torch.tensor([0]))


def test_retrieval_grid_frames_matches_and_captions_every_tile(tmp_path):
    queries = _normalised(torch.full((2, 3, 32, 32), 0.5))
    neighbours = _normalised(torch.full((2, 3, 3, 32, 32), 0.5))
    path = V.save_retrieval_grid(queries, neighbours, torch.tensor([0, 1]), torch.tensor([[0, 2, -1], [1, 1, 0]]),
                                 ["cat", "dog", "ship"], tmp_path / "grid.png", similarities=torch.rand(2, 3))
    img = np.asarray(_png(path))
    tile, row_h = 96, 96 + V.CAPTION_HEIGHT + V.GAP  # 32 px enlarged 3 times to reach min_side=96
    assert img.shape == (2 * (96 + V.CAPTION_HEIGHT) + V.GAP, 4 * tile + 3 * V.GAP, 3)
    frames = [[V.QUERY_COLOUR, V.MATCH_COLOUR, V.MISMATCH_COLOUR, V.UNKNOWN_COLOUR],
              [V.QUERY_COLOUR, V.MATCH_COLOUR, V.MATCH_COLOUR, V.MISMATCH_COLOUR]]
    for row, colours in enumerate(frames):
        for col, colour in enumerate(colours):
            x, y = col * (tile + V.GAP), row * row_h
            assert tuple(img[y + 1, x + 1]) == colour, (row, col)
            assert tuple(img[y + 48, x + 48]) == (128, 128, 128)  # the grey image inside the frame
            caption = img[y + tile:y + tile + V.CAPTION_HEIGHT, x:x + tile]
            assert (caption != 255).any(), (row, col)


def _write_metrics(path, knn=True):
    lines = [{"type": "train", "step": s, "time": 0.0, "epoch": s / 10, "lr": s / 1000, "loss": 9.0 - s / 10}
             for s in (0, 10, 20, 30)]
    lines.append({"type": "train", "step": 20, "time": 1.0, "lr": 0.02, "loss": 5.0})  # resumed: step 20 again
    lines.append({"type": "train", "step": 25, "time": 1.0, "lr": 0.025, "loss": 5.5})  # logged after step 30
    lines.append({"type": "train", "step": 40, "time": 1.0, "lr": 0.04, "loss": "nan"})
    if knn:
        lines += [{"type": "knn", "step": 20, "epoch": 2, "knn_top1_k20": 30.0, "knn_top1_k200": 25.0},
                  {"type": "knn", "step": 40, "epoch": 4, "knn_top1_k20": 40.0, "knn_top1_k200": 35.0}]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"type": "train", "ste')  # cut short by a kill


def test_training_curves_plot_loss_lr_and_knn(tmp_path):
    _write_metrics(tmp_path / "run" / "metrics.jsonl")
    fig = V.plot_training_curves(tmp_path / "run")
    assert [ax.get_title() for ax in fig.axes] == ["loss", "learning rate", "k-NN top-1 (%)"]
    loss = fig.axes[0].lines[0].get_xydata()
    assert loss[:, 0].tolist() == [0, 10, 20, 25, 30, 40]  # by step
    assert loss[:5, 1].tolist() == [9.0, 8.0, 5.0, 5.5, 6.0] and np.isnan(loss[5, 1])  # the resumed step 20 wins
    assert fig.axes[1].lines[0].get_xydata()[:, 1].tolist() == [0.0, 0.01, 0.02, 0.025, 0.03, 0.04]
    knn = {line.get_label(): line.get_xydata().tolist() for line in fig.axes[2].lines}
    assert knn == {"knn_top1_k20": [[20, 30.0], [40, 40.0]], "knn_top1_k200": [[20, 25.0], [40, 35.0]]}
    out = V.save_training_curves(tmp_path / "run" / "metrics.jsonl", tmp_path / "plots" / "curves.png")
    assert _png(out).size == (1200, 300)

    _write_metrics(tmp_path / "early" / "metrics.jsonl", knn=False)
    assert _png(V.save_training_curves(tmp_path / "early", tmp_path / "early.png")).size == (800, 300)


def test_training_curves_name_the_file_they_cannot_use(tmp_path):
    with pytest.raises(DataError, match=r"cannot read the training metrics .*nowhere[/\\]metrics\.jsonl"):
        V.save_training_curves(tmp_path / "nowhere", tmp_path / "c.png")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"type": "knn", "step": 5, "knn_top1_k20": 10.0}) + "\n")
    with pytest.raises(DataError, match=r"metrics\.jsonl has no train records"):
        V.save_training_curves(tmp_path / "metrics.jsonl", tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
