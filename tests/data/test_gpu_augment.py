"""The batched (GPU) augmentations against torchvision's CPU ones: same ops, same parameter distributions."""

import math

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from mobyssl.config import AugConfig
from mobyssl.data.gpu_augment import (
    BatchMoBYAugment,
    _adjust,
    color_jitter,
    gaussian_blur,
    hsv_to_rgb,
    jitter_factors,
    resized_crops,
    rgb_to_hsv,
    sample_crop_boxes,
)


@pytest.mark.parametrize("hw", [(32, 32), (375, 500), (40, 200)])
def test_crop_parameters_follow_torchvision(hw):
    n = 4000
    g = torch.Generator().manual_seed(0)
    h, w = hw
    boxes = sample_crop_boxes(torch.full((n,), h), torch.full((n,), w), (0.08, 1.0), generator=g)
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h).all()
    ours_area = (bw * bh / (h * w)).double()
    ours_ratio = (bw / bh).double().log()

    torch.manual_seed(0)
    ref = [T.RandomResizedCrop.get_params(torch.empty(3, h, w), (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]
    ref_area = torch.tensor([rh * rw / (h * w) for _, _, rh, rw in ref], dtype=torch.float64)
    ref_ratio = torch.tensor([math.log(rw / rh) for _, _, rh, rw in ref], dtype=torch.float64)
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(ours_area.quantile(q) - ref_area.quantile(q)) < 0.03, q
        assert abs(ours_ratio.quantile(q) - ref_ratio.quantile(q)) < 0.04, q
    # Crop centres spread over the image the same way.
    cy = ((boxes[:, 1] + boxes[:, 3]) / 2 / h).double()
    ref_cy = torch.tensor([(i + rh / 2) / h for i, _, rh, _ in ref], dtype=torch.float64)
    assert abs(cy.mean() - ref_cy.mean()) < 0.02 and abs(cy.std() - ref_cy.std()) < 0.02


def test_resized_crop_of_the_whole_image_is_a_resize():
    x = torch.rand(2, 3, 16, 16)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2)
    assert torch.allclose(resized_crops(x, boxes, 16), x, atol=1e-5)
    half = resized_crops(x, boxes, 8)  # 2x2 averages
    assert torch.allclose(half, torch.nn.functional.avg_pool2d(x, 2), atol=1e-5)


@pytest.mark.parametrize("op, fn, factor", [
    (0, TF.adjust_brightness, 1.3), (1, TF.adjust_contrast, 0.7), (2, TF.adjust_saturation, 1.2),
    (3, TF.adjust_hue, 0.08), (3, TF.adjust_hue, -0.1),
])
def test_colour_ops_match_torchvision(op, fn, factor):
    torch.manual_seed(0)
    x = torch.rand(4, 3, 12, 12)
    ours = _adjust(x, op, torch.full((4,), factor))
    ref = torch.stack([fn(img, factor) for img in x])
    assert torch.allclose(ours, ref, atol=2e-3)


def test_colour_jitter_applies_each_samples_ops_in_its_own_order():
    """Replays the draws and applies torchvision's ops one sample at a time, in that sample's order."""
    n, strengths = 48, (0.4, 0.4, 0.4, 0.1)
    torch.manual_seed(1)
    x = torch.rand(n, 3, 10, 10)
    apply = torch.rand(n) < 0.75
    out = color_jitter(x, strengths, apply, torch.Generator().manual_seed(5))
    factors, order = jitter_factors(n, strengths, torch.Generator().manual_seed(5))
    assert len({tuple(o) for o in order[apply].tolist()}) > 10 and not apply.all()
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(n):
        ref = x[i]
        for op in order[i].tolist() if apply[i] else ():
            ref = fns[op](ref, factors[i, op].item())
        assert torch.allclose(out[i], ref, atol=2e-3), (i, order[i].tolist(), apply[i].item())


def test_hsv_round_trip():
    x = torch.rand(3, 3, 9, 9)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)


def test_blur_matches_torchvision_gaussian_blur():
    x = torch.rand(3, 3, 24, 24)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    ours = gaussian_blur(x, sigma, max_sigma=2.0)
    for i, s in enumerate(sigma.tolist()):
        ref = TF.gaussian_blur(x[i], kernel_size=13, sigma=s)
        assert torch.allclose(ours[i], ref, atol=1e-5)


def test_probabilities_of_each_op():
    aug = AugConfig(color_jitter_prob=0.0, blur_prob=[0.0, 0.0], solarize_prob=[0.0, 0.2], crop_scale=[1.0, 1.0])
    n = 4000
    # A left-dark/right-bright colour image: a flip, grayscale and solarize are each recognisable.
    img = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
    img[:, 0, :, 4:] = 250
    img[:, 1, :, 4:] = 10
    t = BatchMoBYAugment(8, aug, norm="none")
    g = torch.Generator().manual_seed(0)
    v1 = t.view(img, 1, g)
    flipped = v1[:, 0, 4, 0] > v1[:, 0, 4, 7]
    gray = (v1[:, 0] - v1[:, 1]).abs().amax(dim=(1, 2)) < 1e-4
    assert abs(flipped.float().mean() - 0.5) < 0.03
    assert abs(gray.float().mean() - 0.2) < 0.025
    # A flat light grey image (200): flips and grayscale leave it as it is, solarize turns it to 55.
    light = torch.full((n, 3, 8, 8), 200, dtype=torch.uint8)
    solarized = t.view(light, 1, g).mean(dim=(1, 2, 3)) < 0.5
    assert abs(solarized.float().mean() - 0.2) < 0.025
    assert (t.view(light, 0, g).mean(dim=(1, 2, 3)) > 0.5).all()  # view 1 never solarizes


def test_two_views_shapes_and_reproducibility():
    imgs = torch.randint(0, 256, (6, 3, 40, 50), dtype=torch.uint8)
    t = BatchMoBYAugment(32, AugConfig(), norm="imagenet")
    a = t(imgs, torch.Generator().manual_seed(3))
    b = t(imgs, torch.Generator().manual_seed(3))
    c = t(imgs, torch.Generator().manual_seed(4))
    assert len(a) == 2 and a[0].shape == (6, 3, 32, 32) and a[0].dtype == torch.float32
    assert all(torch.isfinite(v).all() for v in a)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # the two views differ


def _multicrop_augment():
    from mobyssl.config import load_config
    from mobyssl.methods.dino import DINO

    return DINO.device_transform(load_config("dino_quickstart", ["method.local_crops_number=4"]))


@pytest.mark.parametrize("make", [lambda: BatchMoBYAugment(24, AugConfig(blur_prob=[1.0, 0.1], solarize_prob=[0.0, 0.2]),
                                                           "imagenet"), _multicrop_augment])
def test_the_per_pixel_ops_trace_into_one_graph(make, monkeypatch):
    """``compile()`` hands torch.compile a pure function: one graph (no break), the same views as eager."""
    import mobyssl.data.gpu_augment as gpu_augment

    eager, traced = make(), make()
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: torch._dynamo.optimize("eager", nopython=True)(fn))
    torch._dynamo.reset()
    traced.compile()
    assert traced._apply is not gpu_augment.apply_photometric
    imgs = torch.randint(0, 256, (5, 3, 40, 36), dtype=torch.uint8)
    for a, b in zip(eager(imgs, torch.Generator().manual_seed(2)), traced(imgs, torch.Generator().manual_seed(2))):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.gpu
def test_compiled_augmentation_matches_eager_on_cuda():
    imgs = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, device="cuda")
    eager, compiled = (BatchMoBYAugment(32, AugConfig(), "cifar10") for _ in range(2))
    compiled.compile()
    for a, b in zip(eager(imgs, torch.Generator(device="cuda").manual_seed(0)),
                    compiled(imgs, torch.Generator(device="cuda").manual_seed(0))):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.gpu
def test_runs_on_cuda():
    imgs = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    views = BatchMoBYAugment(32, AugConfig(), "cifar10")(imgs, torch.Generator(device="cuda").manual_seed(0))
    assert views[0].device.type == "cuda" and torch.isfinite(views[1]).all()


@pytest.mark.parametrize("pipeline,shards", [("gpu_resident", False), ("gpu_decode", False), ("gpu_decode", True)])
def test_pretrain_with_a_device_pipeline_runs_and_resumes_exactly(tiny_cfg, tmp_path, pipeline, shards):
    from helpers import write_shards

    from mobyssl.train.checkpoint import load_checkpoint
    from mobyssl.train.trainer import pretrain

    common = [f"data.pipeline={pipeline}", "train.knn_every=-1", "train.log_every=1", "data.num_workers=1"]
    if shards:  # WebDataset shards, streamed
        write_shards(tmp_path / "shards", [40, 50])
        common.append(f"data.train={tmp_path / 'shards'}")
    ref = tiny_cfg(*common, "train.max_steps=4", "output_dir=" + str(tiny_cfg().output_dir) + "_ref")
    pretrain(ref)
    pretrain(tiny_cfg(*common, "train.max_steps=2"))
    assert pretrain(tiny_cfg(*common, "train.max_steps=4"), resume=True)["global_step"] == 4
    a = load_checkpoint(ref.output_dir + "/checkpoint.pth")["method"]
    b = load_checkpoint(tiny_cfg().output_dir + "/checkpoint.pth")["method"]
    assert torch.equal(a["encoder.cls_token"], b["encoder.cls_token"])
    assert torch.equal(a["criterion.queue_1.queue"], b["criterion.queue_1.queue"])


def _encoded(img, fmt):
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def test_decode_batch_handles_formats_and_bad_files(capfd):
    from PIL import Image

    from mobyssl.data.device_decode import decode_batch

    rgb = Image.new("RGB", (20, 10), (200, 40, 10))
    data = [_encoded(rgb, "JPEG"), _encoded(rgb, "PNG"), _encoded(rgb.convert("L"), "JPEG"),
            _encoded(rgb.convert("CMYK"), "JPEG"), torch.tensor([0xFF, 0xD8, 1, 2, 3], dtype=torch.uint8),
            torch.empty(0, dtype=torch.uint8)]
    keys = ["a.jpg", "b.png", "gray.jpg", "cmyk.jpg", "corrupt.jpg", "empty.png"]
    images, failed = decode_batch(data, keys, torch.device("cpu"), "test-source")
    assert failed == ["corrupt.jpg", "empty.png"]
    assert all(im.shape == (3, 10, 20) and im.dtype == torch.uint8 for im in images)
    assert abs(int(images[0][0].float().mean()) - 200) < 8 and abs(int(images[1][0].float().mean()) - 200) < 2
    err = capfd.readouterr().err
    assert "corrupt.jpg" in err and "empty.png" in err and "test-source" in err


def test_crops_of_images_of_different_sizes():
    t = BatchMoBYAugment(16, AugConfig(crop_scale=[1.0, 1.0]), norm="none")
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((16, 16), (30, 40), (64, 20))]
    out = t.crops(images, torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 16, 16) and 0 <= out.min() and out.max() <= 1
    # A 16x16 image cropped whole at scale 1 and resized to 16 is itself.
    assert torch.allclose(out[0], images[0].float() / 255, atol=1e-5)
    views = t(images, torch.Generator().manual_seed(0))
    assert views[0].shape == (3, 3, 16, 16)
