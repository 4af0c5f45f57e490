"""Helpers shared by several test modules (importable because pytest puts tests/ on sys.path)."""

import contextlib
import io
import json
import signal
import socket
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mobyssl.data.datasets import bundled_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics_records(run, kind: str = "train") -> list[dict]:
    """Records of one type from ``run/metrics.jsonl``; a line cut short by a killed process is ignored."""
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["type"] == kind:
            out.append(record)
    return out


@contextlib.contextmanager
def deadline(seconds: float = 3.0):
    """Fail (instead of hanging) where the code under test blocks or loops for longer than ``seconds``."""

    def on_alarm(signum, frame):
        pytest.fail(f"did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class KeyedRows(torch.utils.data.Dataset):
    """``(x, y, key)`` rows as ``SkipUnreadable`` yields them: a non-empty key marks an unreadable image."""

    def __init__(self, x, y, keys):
        self.x, self.y, self.keys = x, y, keys

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i], self.keys[i]


def record_step_lrs(opt, used: list):
    """Make ``opt.step()`` first append the lr of every param group to ``used``; returns ``opt``."""
    return record_step_groups(opt, used, "lr")


def record_step_groups(opt, used: list, key: str):
    """Make ``opt.step()`` first append every param group's ``key`` (lr, weight_decay) to ``used``; returns ``opt``."""
    step = opt.step

    def recorded(*args, **kwargs):
        used.append([g[key] for g in opt.param_groups])
        return step(*args, **kwargs)

    opt.step = recorded
    return opt


def perturb(*modules, scale: float = 0.1) -> None:
    """Move every parameter (frozen ones too) so that no two copies agree any more, as after some training."""
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(scale * torch.randn_like(p))


def random_bn_stats(monkeypatch):
    """Every BatchNorm built from here on starts with its own random statistics (not 0 / 1 / 0)."""
    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.normal_()
            self.running_var.uniform_(0.5, 2.0)
            self.num_batches_tracked.random_(1, 1000)

    monkeypatch.setattr(torch.nn.modules.batchnorm._NormBase, "reset_running_stats", reset_running_stats)


def tinted_split(root: Path, per_class: int, seed: int, bad: tuple[str, ...] = ()) -> Path:
    """Classes a, b, c of ``per_class`` 8x8 images (class-tinted noise), plus corrupt files ``bad``."""
    rng = np.random.default_rng(seed)
    for c, tint in zip("abc", ((200, 20, 20), (20, 200, 20), (20, 20, 200))):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(0, 56, (8, 8, 3))
            Image.fromarray((noise + np.array(tint)).astype(np.uint8)).save(root / c / f"{i}.png")
    for name in bad:
        (root / name).write_bytes(b"\x89PNG\r\n\x1a\n but cut short")
    return root


# ---------------------------------------------------------------------------------------------------------------
# Golden trajectories (tests/methods/test_*_golden.py)

GOLDEN_TOL = 1e-10


def golden_recorder(module: str):
    """The recorder script ``tests/methods/golden/<module>.py`` whose golden files a test checks (that folder holds
    scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(module, Path(__file__).parent / "methods" / "golden" / f"{module}.py")
    recorder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recorder)
    return recorder


def golden_record(recorder, name: str) -> dict:
    """The recorded golden file ``name`` of ``recorder``."""
    return torch.load(recorder.golden_path(name), weights_only=True)


def check_golden(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = GOLDEN_TOL) -> None:
    """``|actual - expected| <= tol * max(1, |expected|)`` elementwise (absolute up to 1, relative above); integer
    tensors must be equal; dtype and shape must match."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
        f"{what}: {actual.dtype} {tuple(actual.shape)} != golden {expected.dtype} {tuple(expected.shape)}"
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: {actual} != golden {expected}"
        return
    err = (actual - expected).abs()
    bound = tol * expected.abs().clamp_min(1.0)
    assert torch.isfinite(actual).all() and (err <= bound).all(), \
        f"{what}: max |error| {err.max().item():.3g} (golden max |value| {expected.abs().max().item():.3g})"


def check_golden_dict(actual: dict, expected: dict, what: str, loose: dict[str, float] | None = None) -> None:
    """Same keys, and :func:`check_golden` for each; ``loose`` maps regular expressions of keys to a wider
    tolerance (values that are rounding noise by construction, each justified where the golden file is made)."""
    import re

    assert set(actual) == set(expected), \
        f"{what}: keys missing {sorted(set(expected) - set(actual))}, unexpected {sorted(set(actual) - set(expected))}"
    for k in expected:
        tol = max([t for pattern, t in (loose or {}).items() if re.search(pattern, k)], default=GOLDEN_TOL)
        check_golden(actual[k], expected[k], f"{what}[{k}]", tol)


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def bundled_images(n: int) -> list[tuple[str, bytes, int]]:
    """The first ``n`` images of the bundled sample: (key, JPEG bytes, class index)."""
    with zipfile.ZipFile(bundled_path("cifar10-sample-train")) as z:
        names = sorted(x for x in z.namelist() if x.endswith(".jpg"))
        classes = sorted({x.split("/")[-2] for x in names})
        step = max(1, len(names) // n)  # every class appears
        return [(x.split("/")[-2] + "_" + Path(x).stem, z.read(x), classes.index(x.split("/")[-2]))
                for x in names[::step][:n]]


def write_shards(folder: Path, counts: list[int], labels: bool = True, prefix: str = "train") -> list[Path]:
    """Shards ``<prefix>-0000.tar``, ... holding ``counts[s]`` bundled images each, WebDataset style."""
    folder.mkdir(parents=True, exist_ok=True)
    images = iter(bundled_images(sum(counts)))
    paths = []
    for s, n in enumerate(counts):
        path = folder / f"{prefix}-{s:04d}.tar"
        with tarfile.open(path, "w") as tf:
            for _ in range(n):
                key, data, label = next(images)
                add_member(tf, f"{key}.jpg", data)
                if labels:
                    add_member(tf, f"{key}.cls", str(label).encode())
        paths.append(path)
    return paths


def apply_with_torchvision(view, img, d):
    """What the research code's torchvision v1 ops compute for ``view``'s draw ``d`` (an ``AugmentedView`` and its
    ``ViewDraw``): torchvision's functional ops, one per transform, the tensor conversion and normalisation."""
    import torchvision.transforms.functional as TF
    from PIL import ImageFilter, ImageOps
    from torchvision import transforms as T

    from mobyssl.data.transforms import normalize

    top, left, h, w = d.crop
    img = TF.resized_crop(img, top, left, h, w, [view.size, view.size], T.InterpolationMode(view.interpolation))
    if d.flip:
        img = TF.hflip(img)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for k, factor in d.jitter:
        img = ops[k](img, factor)
    if d.grayscale:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if d.blur_sigma is not None:
        img = img.filter(ImageFilter.GaussianBlur(radius=d.blur_sigma))
    if d.solarize:
        img = ImageOps.solarize(img, threshold=128)
    return normalize(view.norm)(TF.to_tensor(img))
