"""EsViT's correspondence accuracy: scoring on constructed token grids (answers known by hand, and EsViT's own
formulas), view 2, token grids of real ViT/Swin backbones, and the evaluation loop end to end."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mobyssl.data.gpu_augment import GRAY
from mobyssl.data.transforms import NORMALIZATION
from mobyssl.errors import BackboneError
from mobyssl.eval.correspondence import View2, evaluate_correspondence, make_view2, match_scores, token_grid
from mobyssl.models import create_backbone

CPU = torch.device("cpu")
MEAN, STD = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION["imagenet"])
STILL = View2(jitter_prob=0.0, grayscale=False)  # view 2 = the exact mirror
NO_HUE = View2(jitter=(0.4, 0.4, 0.2, 0.0))  # grey levels of view 2 are then an affine map of view 1's


def one_hot_grid(h, w, extra=0):
    """(1, h, w, h*w + extra): token t of the raster order is the unit vector e_t."""
    return torch.eye(h * w, h * w + extra).view(1, h, w, -1)


# --- match_scores ----------------------------------------------------------------------------------------------


def test_features_of_the_mirrored_position_match_perfectly():
    f1 = torch.randn(2, 3, 4, 16, generator=torch.Generator().manual_seed(0))
    f2 = 3.0 * f1.flip(2)  # view 2 holds view 1's token (r, c) at (r, w-1-c); cosine ignores the scale
    s = match_scores(f1, f2, top_k=5, stride=(6.0, 4.0))
    for key in ("top_k_accuracy", "all_accuracy"):
        assert torch.equal(s[key], torch.ones(2)), key
    for key in ("top_k_distance", "all_distance"):
        assert torch.equal(s[key], torch.zeros(2)), key
    assert s["top_k_tokens"].shape == (2, 5)
    # Unflipped view 2: the same features at the same place are right, the mirrored ones are not.
    assert match_scores(f1, f1, top_k=5, flipped=False)["all_accuracy"].tolist() == [1.0, 1.0]
    assert match_scores(f1, f2, top_k=5, flipped=False)["all_accuracy"].tolist() == [0.0, 0.0]


def test_features_of_the_unmirrored_position_give_the_distance_by_hand():
    # A 2x3 grid, view 2 flipped but its features still at the unmirrored place: each token is matched to its own
    # position (r, c) while the truth is (r, 2-c), so columns 0 and 2 are off by 2 columns, column 1 is right.
    f1 = one_hot_grid(2, 3)
    s = match_scores(f1, f1, top_k=6, stride=(6.0, 4.0))
    assert s["all_accuracy"].item() == pytest.approx(2 / 6)
    assert s["all_distance"].item() == pytest.approx(4 * 8.0 / 6)  # 4 tokens 2 columns * 4 px off
    assert s["top_k_distance"].item() == pytest.approx(4 * 8.0 / 6)  # top_k = all tokens


def test_rows_and_columns_use_their_own_strides():
    # 2x2 grid of one-hot tokens. View-1 token t is placed in view 2 at pos[t] (row, column):
    pos = {0: (1, 1), 1: (0, 0), 2: (1, 0), 3: (0, 1)}
    # Mirrored truths: 0 -> (0, 1), 1 -> (0, 0), 2 -> (1, 1), 3 -> (1, 0). Errors with stride (6, 4) px:
    # 0: one row (6), 1: none (hit), 2: one column (4), 3: a row and a column (sqrt(36 + 16)).
    f2 = torch.zeros(1, 2, 2, 4)
    for t, (r, c) in pos.items():
        f2[0, r, c, t] = 1.0
    s = match_scores(one_hot_grid(2, 2), f2, top_k=4, stride=(6.0, 4.0))
    assert s["all_accuracy"].item() == 0.25
    assert s["all_distance"].item() == pytest.approx((6 + 0 + 4 + math.sqrt(52)) / 4)
    s = match_scores(one_hot_grid(2, 2), f2, top_k=4, stride=4.0)  # one number: both axes
    assert s["all_distance"].item() == pytest.approx((4 + 0 + 4 + math.sqrt(32)) / 4)


def test_top_k_keeps_the_most_similar_pairs():
    # 2x3 grid; tokens 1, 3 and 4 sit at their mirrored place in view 2 with little noise (similar), tokens 0, 2
    # and 5 are put at each other's mirrored places with more noise (less similar, wrong).
    h, w = 2, 3
    noise = {1: 0.1, 3: 0.2, 4: 0.3, 0: 1.0, 2: 1.1, 5: 1.2}  # cosine = 1 / sqrt(1 + noise^2)
    placed_as = {1: 1, 3: 3, 4: 4, 0: 2, 2: 5, 5: 0}  # view-1 token -> token whose mirrored place it takes
    f2 = torch.zeros(1, h, w, h * w + 1)
    for t, target in placed_as.items():
        r, c = divmod(target, w)
        f2[0, r, w - 1 - c, t] = 1.0
        f2[0, r, w - 1 - c, -1] = noise[t]
    s = match_scores(one_hot_grid(h, w, extra=1), f2, top_k=3)
    assert s["top_k_tokens"].tolist() == [[1, 3, 4]]  # most similar first
    assert s["top_k_accuracy"].item() == 1.0 and s["top_k_distance"].item() == 0.0
    assert s["all_accuracy"].item() == pytest.approx(0.5)
    assert match_scores(one_hot_grid(h, w, extra=1), f2, top_k=4)["top_k_accuracy"].item() == 0.75


def esvit_scores(f1, f2, stride, top_k):
    """EsViT's per-image scoring as the spec describes it (one image, square grid, stride the same on both axes):
    centres at k*stride + stride/2, truth (width - x, y), pairs sorted by similarity, distance 0 = correct."""
    h, w, c = f1.shape
    centres = [(r * stride + stride / 2, col * stride + stride / 2) for r in range(h) for col in range(w)]
    sim = F.normalize(f1.reshape(-1, c), dim=1) @ F.normalize(f2.reshape(-1, c), dim=1).T
    best, match = sim.max(dim=1)
    order = sorted(range(h * w), key=lambda i: best[i].item(), reverse=True)[:top_k]
    correct = distance = 0.0
    for i in order:
        (y1, x1), (y2, x2) = centres[i], centres[match[i].item()]
        d = math.sqrt(((w * stride - x1) - x2) ** 2 + (y1 - y2) ** 2)
        distance += d
        correct += d == 0
    return correct / top_k, distance / top_k


def test_agrees_with_esvit_scoring_on_noisy_features():
    g = torch.Generator().manual_seed(1)
    f1 = torch.randn(4, 5, 5, 8, generator=g)
    f2 = f1.flip(2) + 0.9 * torch.randn(4, 5, 5, 8, generator=g)  # some tokens matched right, some wrong
    s = match_scores(f1, f2, top_k=10, stride=16.0)
    accuracy = [esvit_scores(f1[b], f2[b], 16.0, 10) for b in range(4)]
    assert s["top_k_accuracy"].tolist() == pytest.approx([a for a, _ in accuracy])
    assert s["top_k_distance"].tolist() == pytest.approx([d for _, d in accuracy], rel=1e-5)
    assert 0 < s["top_k_accuracy"].mean() < 1  # a real mixture, not a trivial case


def test_top_k_larger_than_the_grid_is_refused():
    f = torch.randn(1, 2, 2, 4)
    with pytest.raises(ValueError, match=r"correspondence\.top_k=5.*4"):
        match_scores(f, f, top_k=5)
    with pytest.raises(ValueError, match=r"correspondence\.top_k=0"):
        match_scores(f, f, top_k=0)


# --- view 2 ------------------------------------------------------------------------------------------------------


def images01(n=4, h=8, w=8, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_view2_defaults_are_esvits():
    assert View2() == View2(flip=True, jitter=(0.4, 0.4, 0.2, 0.1), jitter_prob=0.8, grayscale=True)
    assert View2(jitter=[0.1, 0.1, 0.1, 0.1]).jitter == (0.1, 0.1, 0.1, 0.1)  # a config list becomes a tuple
    with pytest.raises(ValueError, match="jitter_prob"):
        View2(jitter_prob=1.5)
    with pytest.raises(ValueError, match="jitter"):
        View2(jitter=(0.4, 0.4, 0.2))


def test_view2_flip_alone_is_an_exact_mirror():
    x = images01()
    assert torch.equal(make_view2(x, STILL, torch.Generator().manual_seed(0)), x.flip(-1))
    assert torch.equal(make_view2(x, View2(flip=False, jitter_prob=0.0, grayscale=False)), x)


def test_view2_grayscale_gives_equal_channels_of_the_grey_level():
    x = images01()
    y = make_view2(x, View2(flip=False, jitter_prob=0.0, grayscale=True))
    grey = GRAY[0] * x[:, 0] + GRAY[1] * x[:, 1] + GRAY[2] * x[:, 2]
    for ch in range(3):
        assert torch.allclose(y[:, ch], grey, atol=1e-6)


def test_view2_jitter_applies_with_its_probability():
    x = images01(n=200, h=4, w=4)
    always = make_view2(x, View2(flip=False, jitter_prob=1.0, grayscale=False), torch.Generator().manual_seed(0))
    changed = (always - x).abs().flatten(1).amax(1) > 1e-4
    assert changed.all() and always.min() >= 0 and always.max() <= 1
    usual = make_view2(x, View2(flip=False, grayscale=False), torch.Generator().manual_seed(0))
    assert 0.7 < ((usual - x).abs().flatten(1).amax(1) > 1e-4).float().mean() < 0.9  # p = 0.8


def test_view2_is_reproducible_with_the_seed():
    x = images01()

    def view(seed):
        return make_view2(x, View2(grayscale=False, jitter_prob=1.0), torch.Generator().manual_seed(seed))

    assert torch.equal(view(3), view(3))
    assert not torch.equal(view(3), view(4))


# --- token grids of real backbones -----------------------------------------------------------------------------


def test_token_grid_of_a_vit_keeps_rows_and_columns():
    vit = create_backbone("vit_nano_patch4_32", depth=1).eval()
    vit.blocks = nn.Sequential()  # no mixing between tokens: each token is a function of its own patch
    with torch.no_grad():
        vit.pos_embed.zero_()
        x = torch.zeros(2, 3, 32, 32)
        x[0, :, 4:8, 20:24] = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))  # patch row 1, col 5
        grid = token_grid(vit, x)
    assert grid.shape == (2, 8, 8, 128)
    differs = (grid[0] - grid[1]).abs().amax(-1) > 1e-5
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[1, 5] = True
    assert torch.equal(differs, expected)


def test_token_grid_of_a_non_square_vit_image():
    vit = create_backbone("vit_nano_patch4_32", depth=1, multi_size=True).eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 48)
        grid = token_grid(vit, x)
        assert grid.shape == (1, 8, 12, 128)
        assert torch.equal(grid.flatten(1, 2), vit.forward_features(x)[:, 1:])  # class token dropped, raster order


def test_token_grid_of_a_swin_is_its_final_map():
    swin = create_backbone("swin_nano_patch2_window4_32").eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        grid = token_grid(swin, x)
        assert grid.shape == (2, 2, 2, 256)
        assert torch.equal(grid, swin.forward_features(x))  # NHWC: row i, column j as the map has them


def test_a_backbone_without_a_token_grid_is_refused():
    class Pooled(nn.Module):
        def forward_features(self, x):
            return x.mean(dim=(2, 3))

    with pytest.raises(BackboneError, match="no token grid"):
        token_grid(Pooled(), torch.zeros(1, 3, 8, 8))


# --- evaluate_correspondence --------------------------------------------------------------------------------------


class PatchShape(nn.Module):
    """A 'backbone' whose token is its patch's grey levels, centred and sorted: the same for a patch after a flip,
    a brightness/contrast/saturation change or greyscale, so it finds every true correspondence of random images
    (when the hue is left alone). It un-normalises its (imagenet-normalised) input first."""

    def __init__(self, patch=4):
        super().__init__()
        self.patch = patch
        self.modes = []

    def forward_features(self, x):
        self.modes.append(self.training)
        p = self.patch
        grey = sum(g * (x[:, c] * STD[0, c] + MEAN[0, c]) for c, g in enumerate(GRAY))  # (B, H, W)
        b, h, w = grey.shape
        patches = grey.view(b, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(b, h // p, w // p, p * p)
        return (patches - patches.mean(-1, keepdim=True)).sort(-1).values.flatten(1, 2)  # (B, N, p*p)


class Position(nn.Module):
    """A 'backbone' that ignores the image: token t is the unit vector e_t, so each token matches its own place."""

    def __init__(self, h, w, patch=None):
        super().__init__()
        self.h, self.w = h, w
        if patch:
            self.patch_embed = nn.Module()
            self.patch_embed.patch_size = patch

    def forward_features(self, x):
        return torch.eye(self.h * self.w).expand(x.shape[0], -1, -1)


def normalised(n, h=32, w=32, seed=0):
    pixels = 0.25 + 0.5 * torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))  # no clipping
    return (pixels - MEAN) / STD


def test_a_jitter_invariant_backbone_finds_every_correspondence():
    images = normalised(5)
    loader = [(images[:3], torch.zeros(3)), (images[3:], torch.zeros(2))]
    backbone = PatchShape().train()
    for view2 in (NO_HUE, View2(flip=False, jitter=(0.4, 0.4, 0.2, 0.0))):
        out = evaluate_correspondence(backbone, loader, CPU, None, "imagenet", top_k=10, view2=view2)
        assert out == {"corr_top10_accuracy": 100.0, "corr_top10_distance_px": 0.0, "corr_all_accuracy": 100.0,
                       "corr_all_distance_px": 0.0}
    assert backbone.modes and not any(backbone.modes) and backbone.training  # eval mode inside, restored after


def test_distances_are_in_pixels_of_each_axis():
    # Position tokens match every view-1 token to its own place; with view 2 flipped the truth is the mirrored
    # column: on 8 columns the mean error is mean |2c - 7| = 4 columns, no row error, no hit.
    images = normalised(2, 32, 64)
    out = evaluate_correspondence(Position(8, 8, patch=(4, 8)), [(images, None)], CPU, None, "imagenet", top_k=10,
                                  view2=STILL)
    assert out["corr_all_accuracy"] == 0.0
    assert out["corr_all_distance_px"] == pytest.approx(4 * 8.0)  # 8 px per column
    # All similarities tie: token order decides, tokens 0-7 (row 0) and 8, 9 (columns 0, 1 of row 1).
    assert out["corr_top10_distance_px"] == pytest.approx((32 + 7 + 5) / 10 * 8.0)
    # Without a patch size the grid comes from the token count and the image's aspect: 8x16 on 32x64 images.
    assert token_grid(Position(8, 16), images).shape == (2, 8, 16, 128)
    out = evaluate_correspondence(Position(8, 16), [(images, None)], CPU, None, "imagenet", top_k=10, view2=STILL)
    assert out["corr_all_distance_px"] == pytest.approx(8 * 4.0)  # mean |2c - 15| = 8 columns of 4 px


def test_view2_reaches_the_backbone_made_from_pixels_and_renormalised():
    seen = []

    class Recorder(Position):
        def forward_features(self, x):
            seen.append(x)
            return super().forward_features(x)

    images = normalised(3)
    evaluate_correspondence(Recorder(8, 8), [(images, None)], CPU, None, "imagenet", view2=STILL)
    view1, view2 = seen[0].chunk(2)
    assert torch.equal(view1, images)
    assert torch.allclose(view2, images.flip(-1), atol=1e-5)
    seen.clear()
    evaluate_correspondence(Recorder(8, 8), [(images, None)], CPU, None, "imagenet",
                            view2=View2(jitter_prob=0.0))
    pixels = seen[0].chunk(2)[1] * STD + MEAN
    assert torch.allclose(pixels, pixels[:, :1].expand_as(pixels), atol=1e-5)  # grey in pixel space


def test_averages_over_images_on_a_random_vit():
    vit = create_backbone("vit_nano_patch4_32", depth=1)
    images = normalised(4, seed=1)
    loader = [(images[:3], torch.zeros(3), ("", "", "")), (images[3:], torch.zeros(1), torch.tensor([7]))]
    out = evaluate_correspondence(vit, loader, CPU, None, "imagenet", top_k=10, view2=STILL)
    assert set(out) == {"corr_top10_accuracy", "corr_top10_distance_px", "corr_all_accuracy", "corr_all_distance_px"}
    with torch.no_grad():
        vit.eval()
        s = match_scores(token_grid(vit, images), token_grid(vit, images.flip(-1)), top_k=10, stride=4.0)
    assert out["corr_top10_accuracy"] == pytest.approx(100 * s["top_k_accuracy"].mean().item(), abs=1e-4)
    assert out["corr_all_accuracy"] == pytest.approx(100 * s["all_accuracy"].mean().item(), abs=1e-4)
    assert out["corr_all_distance_px"] == pytest.approx(s["all_distance"].mean().item(), abs=1e-4)
    assert 0 < out["corr_all_accuracy"] < 100 and 0 < out["corr_top10_distance_px"] < 32 * math.sqrt(2)


def test_unreadable_images_are_left_out():
    images = normalised(3)
    images[1] = (0 - MEAN[0]) / STD[0]  # the black placeholder of an unreadable image
    failed = []
    loader = [(images, torch.zeros(3), ("", "bad.jpg", ""))]
    out = evaluate_correspondence(PatchShape(), loader, CPU, None, "imagenet", view2=NO_HUE, failed=failed)
    assert failed == ["bad.jpg"] and out["corr_all_accuracy"] == 100.0
    out = evaluate_correspondence(PatchShape(), [(images[1:2], None, ("bad.jpg",))], CPU, None, "imagenet")
    assert math.isnan(out["corr_all_accuracy"])  # nothing read


def test_a_swin_grid_smaller_than_top_k_is_refused_and_a_smaller_top_k_works():
    swin = create_backbone("swin_nano_patch2_window4_32")  # 2x2 tokens at 32 px
    loader = [(normalised(2), None)]
    with pytest.raises(ValueError, match=r"correspondence\.top_k=10.*4"):
        evaluate_correspondence(swin, loader, CPU, None, "imagenet", top_k=10)
    out = evaluate_correspondence(swin, loader, CPU, None, "imagenet", top_k=4)
    assert out["corr_top4_accuracy"] == out["corr_all_accuracy"]  # top 4 of 4 tokens = all tokens
    assert 0 <= out["corr_all_accuracy"] <= 100 and 0 <= out["corr_top4_distance_px"] <= 16 * math.sqrt(2)
