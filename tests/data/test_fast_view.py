"""The CPU views (``AugmentedView``) against the torchvision v1 pipeline they replace, and JPEG draft decoding.

Two halves make "the same augmentation": the same random choices in law (compared with torchvision's own
``get_params`` draws), and, for the same choices, the same pixels (compared with torchvision's functional ops).
"""

from __future__ import annotations

import io
import random
import statistics

import numpy as np
import pytest
import torch
from helpers import apply_with_torchvision
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from mobyssl.config import AugConfig
from mobyssl.data import transforms
from mobyssl.data.datasets import DataError, decode_image_bytes
from mobyssl.data.training import TrainingDataset
from mobyssl.data.transforms import AugmentedView, MultiCrop, moby_transform, multicrop_transform

ALL_ON = AugConfig(color_jitter_prob=0.8, grayscale_prob=0.3, blur_sigma=[0.1, 2.0])


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    return Image.fromarray(smooth).resize((w, h), Image.BICUBIC)  # texture at several scales


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("norm", ["imagenet", "cifar10"])
def test_the_same_draws_give_torchvisions_pixels_bit_for_bit(interpolation, norm):
    view = AugmentedView(24, (0.08, 1.0), ALL_ON, blur_prob=0.5, solarize_prob=0.5, norm=norm,
                         interpolation=interpolation)
    rng = random.Random(1)
    seen = {"flip": 0, "jitter": 0, "grayscale": 0, "blur": 0, "solarize": 0}
    for i in range(60):
        img = _noise(37 + i, 29 + (i * 7) % 40, seed=i)
        d = view.draw(*img.size, rng)
        ours = view(img, random.Random(0)) if i == 0 else view.apply(img, d)
        if i == 0:  # __call__ is draw + apply
            d = view.draw(*img.size, random.Random(0))
        theirs = apply_with_torchvision(view, img, d)
        assert ours.dtype == theirs.dtype == torch.float32 and torch.equal(ours, theirs), (i, d)
        seen["flip"] += d.flip
        seen["jitter"] += bool(d.jitter)
        seen["grayscale"] += d.grayscale
        seen["blur"] += d.blur_sigma is not None
        seen["solarize"] += d.solarize
    assert all(n > 5 for n in seen.values()), seen  # every op was exercised


@pytest.mark.parametrize("factor", [0.0, 0.1, -0.1, 0.5, -0.5])
def test_the_table_hue_gives_torchvisions_pixels_for_every_colour(factor):
    # Every 24-bit colour once (a 4096 x 4096 image), through our lookup tables and through torchvision's
    # adjust_hue (PIL's HSV round trip): equal everywhere, so no colour is left to chance.
    every = np.arange(1 << 24, dtype="<u4").view(np.uint8).reshape(4096, 4096, 4)[..., :3]
    img = Image.fromarray(np.ascontiguousarray(every[:, ::-1]))  # mirrored: the index is not the position
    ours = np.asarray(transforms._adjust_hue(img, factor))
    theirs = np.asarray(TF.adjust_hue(img, factor))
    assert ours.shape == theirs.shape == (4096, 4096, 3)
    assert np.array_equal(ours, theirs), f"{np.count_nonzero(np.any(ours != theirs, -1))} colours differ"


@pytest.mark.parametrize("factor", [0.0, 0.3, 0.6, 0.999, 1.0, 1.4, 2.5])
def test_the_table_contrast_gives_torchvisions_pixels(factor):
    # Every channel value at several mean greys (dark, middle, bright images): the table covers each value once.
    every = np.arange(1 << 24, dtype="<u4").view(np.uint8).reshape(4096, 4096, 4)[:256, :, :3]
    for scale, offset in ((0.2, 0), (1.0, 0), (0.3, 170)):
        img = Image.fromarray(np.ascontiguousarray((every * scale + offset).astype(np.uint8)))
        assert np.array_equal(np.asarray(transforms._adjust_contrast(img, factor)),
                              np.asarray(TF.adjust_contrast(img, factor))), (scale, offset)
    gray = _noise(24, 16).convert("L")
    assert transforms._adjust_contrast(gray, factor).tobytes() == TF.adjust_contrast(gray, factor).tobytes()


def test_the_table_hue_leaves_other_modes_to_torchvision():
    gray = _noise(24, 16).convert("L")
    assert transforms._adjust_hue(gray, 0.3).tobytes() == TF.adjust_hue(gray, 0.3).tobytes() == gray.tobytes()


def _torchvision_draws(n: int, width: int, height: int):
    torch.manual_seed(0)
    crops = [T.RandomResizedCrop.get_params(Image.new("RGB", (width, height)), [0.08, 1.0], [3 / 4, 4 / 3])
             for _ in range(n)]
    jitter = [T.ColorJitter.get_params([0.6, 1.4], [0.6, 1.4], [0.8, 1.2], [-0.1, 0.1]) for _ in range(n)]
    return crops, jitter


def _summary(crops, width, height):
    area = [h * w / (width * height) for _, _, h, w in crops]
    aspect = [np.log(w / h) for _, _, h, w in crops]
    top = [i / max(1, height - h) for i, _, h, _ in crops if height > h]
    left = [j / max(1, width - w) for _, j, _, w in crops if width > w]
    return [statistics.mean(area), statistics.pstdev(area), statistics.mean(aspect), statistics.pstdev(aspect),
            statistics.mean(top), statistics.mean(left)]


@pytest.mark.parametrize("width,height", [(500, 375), (32, 32), (60, 200)])
def test_draws_follow_torchvisions_distributions(width, height):
    n = 6000
    view = AugmentedView(224, (0.08, 1.0), AugConfig(), blur_prob=1.0, solarize_prob=0.2, norm="none")
    rng = random.Random(3)
    draws = [view.draw(width, height, rng) for _ in range(n)]
    theirs, jitter = _torchvision_draws(n, width, height)
    ours_summary = _summary([d.crop for d in draws], width, height)
    theirs_summary = _summary(theirs, width, height)
    for a, b, what in zip(ours_summary, theirs_summary, ["area", "area sd", "log aspect", "sd", "top", "left"]):
        assert abs(a - b) < 0.03, (what, a, b)
    # Rates: flip 0.5, jitter 0.8, grayscale 0.2, blur 1.0, solarize 0.2 (3.5 standard errors).
    for rate, p in ((np.mean([d.flip for d in draws]), 0.5), (np.mean([bool(d.jitter) for d in draws]), 0.8),
                    (np.mean([d.grayscale for d in draws]), 0.2), (np.mean([d.solarize for d in draws]), 0.2)):
        assert abs(rate - p) < 3.5 * (p * (1 - p) / n) ** 0.5, (rate, p)
    assert all(0.1 <= d.blur_sigma <= 2.0 for d in draws)
    assert abs(statistics.mean(d.blur_sigma for d in draws) - 1.05) < 0.02
    # The jitter: each op first equally often, factors uniform over torchvision's ranges.
    jittered = [d.jitter for d in draws if d.jitter]
    firsts = np.bincount([j[0][0] for j in jittered], minlength=4) / len(jittered)
    their_firsts = np.bincount([int(order[0]) for order, *_ in jitter], minlength=4) / n
    assert np.abs(firsts - 0.25).max() < 0.02 and np.abs(their_firsts - 0.25).max() < 0.02
    for k, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        ours_f = [f for j in jittered for op, f in j if op == k]
        theirs_f = [float(j[k + 1]) for j in jitter]
        assert len(ours_f) == len(jittered) and lo <= min(ours_f) and max(ours_f) <= hi
        assert abs(statistics.mean(ours_f) - statistics.mean(theirs_f)) < 0.01 * (hi - lo) * 3


def test_ops_with_no_effect_draw_nothing_and_the_reference_pipeline_matches_the_config():
    aug = AugConfig(color_jitter=[0.0, 0.4, 0.0, 0.0], blur_prob=[0.0, 0.0], solarize_prob=[0.0, 0.0])
    view = moby_transform(32, aug, "none").transforms[0]
    d = [view.draw(40, 40, random.Random(s)) for s in range(200)]
    assert all(op == 1 for x in d for op, _ in x.jitter) and all(x.blur_sigma is None and not x.solarize for x in d)
    ref = view.reference().transforms
    assert [type(t) for t in ref] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.RandomApply, T.RandomGrayscale,
                                      T.ToTensor, T.Normalize]
    assert ref[2].transforms[0].contrast == (0.6, 1.4) and ref[2].transforms[0].brightness is None


def test_training_samples_draw_from_their_own_generator_only(tmp_path):
    from mobyssl.data import open_dataset

    for i in range(3):
        _noise(40, 30, seed=i).save(tmp_path / f"{i}.png")
    ds = TrainingDataset(open_dataset(str(tmp_path)), moby_transform(16, AugConfig(), "none"), seed=5)
    torch.manual_seed(123)
    random.seed(123)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    a, b, c = ds[(0, 1)], ds[(0, 1)], ds[(1, 1)]
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert not torch.equal(a[0][0], c[0][0])  # another epoch, other views


def test_the_training_loader_builds_the_hue_tables_in_the_main_process_only_when_hue_is_drawn(tmp_path,
                                                                                                 monkeypatch):
    from mobyssl.build import make_loader
    from mobyssl.data import open_dataset

    _noise(40, 30).save(tmp_path / "0.png")
    images = open_dataset(str(tmp_path))
    monkeypatch.setattr(transforms._HueTables, "_tables", None)
    for aug in (AugConfig(color_jitter=[0.4, 0.4, 0.2, 0.0]), AugConfig(color_jitter_prob=0.0)):
        make_loader(TrainingDataset(images, moby_transform(16, aug, "none")), 1, 0, torch.device("cpu"))
    assert transforms._HueTables._tables is None  # no hue shift drawn: no 128 MiB of tables
    with_hue = TrainingDataset(images, moby_transform(16, AugConfig(), "none"))
    assert transforms._HueTables._tables is None  # not yet: the device pipelines never use the CPU views
    make_loader(with_hue, 1, 0, torch.device("cpu"))
    assert transforms._HueTables._tables is not None  # built before workers fork, so they share its pages


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_batch_normalised_at_once_equals_the_samples_stacked(tmp_path, workers):
    """``__getitems__`` normalises uint8 views per batch; the floats, labels and skipped files are those of the
    image-by-image ``__getitem__`` stacked by the default collate, bit for bit (DINO's multi-crop sizes too)."""
    from torch.utils.data import default_collate

    from mobyssl.build import make_loader
    from mobyssl.data import open_dataset

    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(3):
            _noise(40, 30, seed=3 * c + i).save(tmp_path / f"c{c}" / f"{i}.png")
    (tmp_path / "c1" / "bad.png").write_bytes(b"not an image")  # replaced by another image, and named
    images = open_dataset(str(tmp_path))
    spec = MultiCrop(global_size=16, local_size=8, n_local=2, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4))
    for transform in (moby_transform(16, ALL_ON, "cifar10"), multicrop_transform(spec, ALL_ON, "imagenet")):
        ds = TrainingDataset(images, transform, seed=3)
        keys = [(1, i) for i in range(len(images))]
        got = next(iter(make_loader(ds, len(keys), workers, torch.device("cpu"), sampler=keys)))
        want = default_collate([ds[k] for k in keys])
        assert len(got[0]) == len(want[0]) == len(transform.transforms)
        for a, b in zip(got[0], want[0]):
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
        assert torch.equal(got[1], want[1]) and list(got[2]) == list(want[2]) and any(want[2])


def test_a_worker_normalises_its_batch_into_shared_memory(monkeypatch):
    from mobyssl.data import training

    x = torch.zeros(2, 3, 4, 5, dtype=torch.uint8)
    assert not training._float_like(x).is_shared()
    monkeypatch.setattr(training, "get_worker_info", lambda: object())  # as in a DataLoader worker
    out = training._float_like(x)
    assert out.is_shared() and out.shape == x.shape and out.dtype == torch.float32


# -- JPEG draft decoding -----------------------------------------------------------------------------------

def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    _noise(w, h).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_the_reduction_keeps_every_crop_at_least_its_output_size():
    moby = moby_transform(224, AugConfig(), "none")
    assert moby.jpeg_reduction(500, 375) == 1  # a 0.08 crop of 500x375 is ~106 px: no room
    assert moby.jpeg_reduction(4000, 3000) == 2  # the smallest crop, ~848 px, still 424 px at 1/2
    assert moby.jpeg_reduction(8000, 6000) == 4
    dino = multicrop_transform(MultiCrop(), AugConfig(), "none")  # 96 px local crops from 0.05 of the image
    assert dino.jpeg_reduction(4000, 3000) == 4 and dino.jpeg_reduction(1000, 750) == 1
    for w, h in ((4000, 3000), (3000, 4000), (1000, 1000), (8000, 6000)):
        factor = moby.jpeg_reduction(w, h)
        view = moby.transforms[0]
        rng = random.Random(0)
        sides = [min(view.draw(w // factor, h // factor, rng).crop[2:]) for _ in range(3000)]
        assert min(sides) >= 224, (w, h, factor, min(sides))


def test_draft_decoding_shrinks_jpegs_only_and_changes_pixels_slightly():
    data = _jpeg(1600, 1200)
    full = decode_image_bytes(data, "x.jpg")
    small = decode_image_bytes(data, "x.jpg", reduce=lambda w, h: 4)
    assert full.size == (1600, 1200) and small.size == (400, 300) and small.mode == "RGB"
    png = io.BytesIO()
    full.save(png, "PNG")
    assert decode_image_bytes(png.getvalue(), "x.png", reduce=lambda w, h: 4).size == (1600, 1200)
    # The same crop, from the full and the reduced decode, resized to 96 px: close, not equal.
    view = AugmentedView(96, (0.5, 0.5), AugConfig(color_jitter_prob=0.0, grayscale_prob=0.0), 0.0, 0.0, "none")
    d = view.draw(1600, 1200, random.Random(0))
    top, left, h, w = (x // 4 * 4 for x in d.crop)
    a = view.apply(full, d.__class__(crop=(top, left, h, w), flip=False, jitter=(), grayscale=False, blur_sigma=None,
                                     solarize=False))
    b = view.apply(small, d.__class__(crop=(top // 4, left // 4, h // 4, w // 4), flip=False, jitter=(),
                                      grayscale=False, blur_sigma=None, solarize=False))
    diff = (a - b).abs()
    assert 0 < diff.mean() < 2 / 255 and diff.max() < 0.25


def test_jpeg_draft_option_reaches_the_training_dataset(tmp_path):
    from mobyssl.build import build_train_dataset
    from mobyssl.config import load_config

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "big.jpg").write_bytes(_jpeg(2400, 1800))
    seen = []
    for draft in ("false", "true"):
        cfg = load_config("moby_swin_tiny_in1k", [f"data.train={tmp_path}", "data.image_size=128",
                                                 "data.aug.crop_scale=[0.5, 1.0]", f"data.jpeg_draft={draft}"])
        ds = build_train_dataset(cfg)
        seen.append(ds.dataset.load(0, ds.reduce).size)
        views, _, failed = ds[(0, 0)]
        assert [v.shape for v in views] == [(3, 128, 128)] * 2 and failed == ""
    assert seen == [(2400, 1800), (300, 225)]  # a 0.5 crop of 2400x1800 is >= 1272 px: 159 px at 1/8


def test_a_jpeg_the_reduced_decoder_refuses_falls_back_to_the_plain_decoder(monkeypatch):
    data = _jpeg(800, 600)
    from PIL import JpegImagePlugin

    def refuse(self, mode, size):
        raise OSError("no reduced decode")

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", refuse)
    assert decode_image_bytes(data, "x.jpg", reduce=lambda w, h: 4).size == (800, 600)
    with pytest.raises(DataError, match="cannot read image x.jpg"):  # a broken file is still refused, by name
        decode_image_bytes(data[:200], "x.jpg", reduce=lambda w, h: 4)
