"""The CPU data pipeline against the 2021 research code's: image pairs per second, per core and with 2 workers.

The reference is written here the way MoBY's (and BYOL-era) research code does it: ``torchvision.datasets.
ImageFolder`` on PIL images, ``torchvision.transforms`` (v1) composing the same two-view augmentation (random
resized crop, flip, colour jitter, grayscale, PIL Gaussian blur, solarize, to tensor, normalise) with the values of
the mobyssl recipe, the default collate. Against it, in the same interleaved run:

* ``mobyssl cpu``: ``data.pipeline=cpu`` as the trainer builds it (per-sample seeded augmentation, resumable
  sampler, bad-image guards);
* ``mobyssl cpu + jpeg_draft``: the same with ``data.jpeg_draft=true`` (JPEGs decoded at a reduced size that still
  covers every crop);
* ``gpu_decode on a CPU device``: ``data.pipeline=gpu_decode`` with the CPU as the training device (batched
  decoding and augmentation in the main process, workers reading bytes);
* ``gpu_decode (CPU side)``: the workers of ``data.pipeline=gpu_decode`` alone, which only read bytes (on a GPU
  machine, decoding and augmenting then happen on the GPU, not timed here).

Three image sets, made from the bundled CIFAR-10 sample: 500×375 JPEGs (upscaled, quality 90) cropped to 224 px,
the 32 px images themselves at 32 px, and 4000×3000 JPEGs (12 megapixels, phone photos) cropped to 224 px.
Each cell: image pairs per second, median and range of ``--repeats`` runs; "per core" is ``num_workers=0`` with
one torch thread.

    python benchmarks/cpu_pipeline.py --repeats 3
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from mobyssl.build import build_train_dataset, build_train_sampler, device_loader, make_loader
from mobyssl.config import load_config
from mobyssl.data.datasets import bundled_path
from mobyssl.data.device_decode import EncodedDataset, collate_encoded
from mobyssl.data.transforms import NORMALIZATION

# -- the reference: research-code style ----------------------------------------------------------------------

class GaussianBlur:
    def __init__(self, sigma):
        self.sigma = sigma

    def __call__(self, x):
        return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class Solarization:
    def __call__(self, x):
        return ImageOps.solarize(x)


class TwoCrops:
    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, x):
        return [self.first(x), self.second(x)]


def reference_transform(cfg) -> TwoCrops:
    aug, (mean, std) = cfg.data.aug, NORMALIZATION[cfg.data.normalization]

    def view(i):
        ops = [T.RandomResizedCrop(cfg.data.image_size, scale=tuple(aug.crop_scale)),
               T.RandomHorizontalFlip(aug.flip_prob),
               T.RandomApply([T.ColorJitter(*aug.color_jitter)], p=aug.color_jitter_prob),
               T.RandomGrayscale(p=aug.grayscale_prob)]
        if aug.blur_prob[i] > 0:
            ops.append(T.RandomApply([GaussianBlur(aug.blur_sigma)], p=aug.blur_prob[i]))
        if aug.solarize_prob[i] > 0:
            ops.append(T.RandomApply([Solarization()], p=aug.solarize_prob[i]))
        return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])

    return TwoCrops(view(0), view(1))


# -- image sets ----------------------------------------------------------------------------------------------

def make_sets(root: Path, mid: int, big: int) -> dict[str, tuple[Path, str, int]]:
    """name -> (ImageFolder root, recipe, crop size)."""
    with zipfile.ZipFile(bundled_path("cifar10-sample-train")) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
        sets = {"224 px from 500×375": ("mid", (500, 375), mid), "32 px from 32×32": ("small", None, len(names)),
                "224 px from 12 MP (4000×3000)": ("big", (4000, 3000), big)}
        for folder, size, n in sets.values():
            for i, name in enumerate(names[:: max(1, len(names) // n)][:n]):
                out = root / folder / name.split("/")[-2] / f"{i:05d}.jpg"
                out.parent.mkdir(parents=True, exist_ok=True)
                data = z.read(name)
                if size is None:
                    out.write_bytes(data)
                else:
                    Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.BICUBIC).save(out, quality=90)
    return {"224 px from 500×375": (root / "mid", "moby_swin_tiny_in1k", 224),
            "32 px from 32×32": (root / "small", "quickstart", 32),
            "224 px from 12 MP (4000×3000)": (root / "big", "moby_swin_tiny_in1k", 224)}


# -- timing --------------------------------------------------------------------------------------------------

def pairs_per_second(loader, batches: int) -> float:
    it = iter(loader)
    next(it)  # workers started, first batch out: not timed
    n, t = 0, time.perf_counter()
    for _ in range(batches):
        n += len(next(it)[1])  # the labels, or gpu_decode's byte lengths: one per image
    return n / (time.perf_counter() - t)


def loaders(folder: Path, recipe: str, size: int, workers: int, batch: int):
    overrides = [f"data.train={folder}", f"data.image_size={size}", f"data.num_workers={workers}",
                 f"train.batch_size={batch}"]
    cfg = load_config(recipe, overrides)
    ref = datasets.ImageFolder(str(folder), transform=reference_transform(cfg))
    out = {"reference (torchvision v1, PIL, ImageFolder)": DataLoader(
        ref, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0)}
    for name, extra in (("mobyssl cpu", []), ("mobyssl cpu + jpeg_draft", ["data.jpeg_draft=true"])):
        c = load_config(recipe, overrides + extra)
        ds = build_train_dataset(c)
        sampler = build_train_sampler(c, ds, batch)
        out[name] = make_loader(ds, batch, workers, torch.device("cpu"), drop_last=True, sampler=sampler,
                                generator=torch.Generator().manual_seed(0))
    ds = build_train_dataset(cfg)
    c = load_config(recipe, overrides + ["data.pipeline=gpu_decode"])
    out["gpu_decode on a CPU device (decode + batched augmentation here)"] = device_loader(
        c, ds.dataset, build_train_sampler(c, ds, batch), batch, torch.device("cpu"))
    out["gpu_decode (CPU side: bytes only)"] = make_loader(
        EncodedDataset(ds.dataset), batch, workers, torch.device("cpu"), drop_last=True,
        sampler=build_train_sampler(cfg, ds, batch), collate_fn=collate_encoded)
    return out


def breakdown(folder: Path, reps: int = 200) -> None:
    """Milliseconds per call of each step of a 224 px view (mobyssl's ``AugmentedView``), on the first image."""
    from PIL import ImageEnhance

    from mobyssl.data.datasets import decode_image_bytes
    from mobyssl.data.transforms import _adjust_contrast, _adjust_hue, to_normalized_tensor

    path = sorted(folder.rglob("*.jpg"))[0]
    data = path.read_bytes()
    img = decode_image_bytes(data, path.name)
    pair = build_train_dataset(load_config("moby_swin_tiny_in1k", [f"data.train={folder}"])).transform
    view = pair.transforms[0]
    crop = img.crop((50, 20, 350, 320)).resize((224, 224), Image.BILINEAR)
    steps = {
        "decode (500×375 JPEG)": lambda: decode_image_bytes(data, path.name),
        "crop + resize to 224": lambda: img.crop((50, 20, 350, 320)).resize((224, 224), Image.BILINEAR),
        "flip": lambda: crop.transpose(Image.FLIP_LEFT_RIGHT),
        "brightness": lambda: ImageEnhance.Brightness(crop).enhance(1.2),
        "contrast (PIL's ImageEnhance)": lambda: ImageEnhance.Contrast(crop).enhance(1.2),
        "contrast (mobyssl: a table, same pixels)": lambda: _adjust_contrast(crop, 1.2),
        "saturation": lambda: ImageEnhance.Color(crop).enhance(1.1),
        "hue (torchvision: PIL's HSV round trip)": lambda: T.functional.adjust_hue(crop, 0.05),
        "hue (mobyssl: lookup tables, same pixels)": lambda: _adjust_hue(crop, 0.05),
        "grayscale": lambda: crop.convert("L").convert("RGB"),
        "Gaussian blur (PIL)": lambda: crop.filter(ImageFilter.GaussianBlur(radius=1.0)),
        "solarize": lambda: ImageOps.solarize(crop, 128),
        "to normalised tensor": lambda: to_normalized_tensor(crop, view._mean, view._std),
        "both views of the pair, decoded image given": lambda: pair(img, random),
    }
    print(f"\n| step of a 224 px view | ms per call (median of 5 × {reps}) |\n|---|---|")
    for name, fn in steps.items():
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - t) / reps * 1e3)
        print(f"| {name} | {statistics.median(times):.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--mid", type=int, default=256, help="500×375 images")
    ap.add_argument("--big", type=int, default=40, help="12-megapixel images")
    ap.add_argument("--only", default=None, help="run only the image sets whose name contains this")
    ap.add_argument("--breakdown", action="store_true", help="also time each step of a 224 px view")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        sets = make_sets(Path(tmp), args.mid, args.big)
        if args.breakdown:
            breakdown(sets["224 px from 500×375"][0])
        rows = []
        for set_name, (folder, recipe, size) in sets.items():
            if args.only and args.only not in set_name:
                continue
            n = sum(1 for _ in folder.rglob("*.jpg"))
            batch = 64 if n >= 320 else 8
            for workers in args.workers:
                pipes = loaders(folder, recipe, size, workers, batch)
                batches = max(2, min(8, n // batch - 1))
                results: dict[str, list[float]] = {k: [] for k in pipes}
                for _ in range(args.repeats):  # interleaved
                    for name, loader in pipes.items():
                        results[name].append(pairs_per_second(loader, batches))
                ref = statistics.median(results["reference (torchvision v1, PIL, ImageFolder)"])
                for name, values in results.items():
                    med = statistics.median(values)
                    rows.append(f"| {set_name} | {'per core (0 workers)' if workers == 0 else f'{workers} workers'} | "
                                f"{name} | {med:,.1f} ({min(values):,.1f}–{max(values):,.1f}) | {med / ref:.2f}× |")
                print("\n".join(rows[-len(results):]), flush=True)
        print(f"\n{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, batch 64 (8 for 12 MP), "
              f"median (range) of {args.repeats} interleaved runs, image pairs/s")
        print("| images | workers | pipeline | pairs/s | vs reference |\n|---|---|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
