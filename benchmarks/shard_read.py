"""Reading WebDataset shards: mobyssl's reader (``tarfile`` + seeking) against the ``webdataset`` package.

Writes shards from a zip of images (default: CIFAR-10's 10,000 test images, 32 px; ``--upscale 500x375``
re-encodes a subset at ImageNet-like sizes, JPEG quality 90), then times, interleaved, median and range of
``--repeats`` runs, in one process:

* ``mobyssl index``: ``TarShards`` reading every header (and every ``.cls``), once per run;
* ``mobyssl stream``: the bytes of every image, in the pre-training stream's order (shards shuffled, a window of
  1,000 samples), through ``TarShards.read_bytes``;
* ``webdataset``: ``wds.WebDataset(shards, shardshuffle=False).shuffle(1000)``, every sample's raw bytes;
* ``zip, random order``: the same images from the zip with ``ZipDataset.read_bytes`` in a random order (what
  the other data sources do).

Decoding and augmentation are left out: they cost the same whatever reads the bytes. Needs ``pip install
webdataset`` (not a dependency of mobyssl).

    python benchmarks/shard_read.py --zip ../shared/data/cifar10/test.zip
    python benchmarks/shard_read.py --zip ../shared/data/cifar10/test.zip --limit 2000 --upscale 500x375
"""

from __future__ import annotations

import argparse
import io
import statistics
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from PIL import Image

from mobyssl.data import open_dataset
from mobyssl.data.shards import ShardStreamSampler


def write_shards(zip_path: str, folder: Path, per_shard: int, limit: int, upscale: tuple[int, int] | None):
    with zipfile.ZipFile(zip_path) as z:
        names = sorted(n for n in z.namelist() if n.lower().endswith(".jpg"))[:limit]
        classes = sorted({n.split("/")[-2] for n in names})
        paths, tf = [], None
        for i, name in enumerate(names):
            if i % per_shard == 0:
                if tf:
                    tf.close()
                paths.append(folder / f"shard-{len(paths):04d}.tar")
                tf = tarfile.open(paths[-1], "w")
            data = z.read(name)
            if upscale:
                buf = io.BytesIO()
                Image.open(io.BytesIO(data)).convert("RGB").resize(upscale, Image.BICUBIC).save(buf, "JPEG", quality=90)
                data = buf.getvalue()
            key = f"{i:07d}"
            for ext, payload in (("jpg", data), ("cls", str(classes.index(name.split("/")[-2])).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
        tf.close()
    return paths, names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zip", required=True, help="a zip of JPEGs (an ImageFolder tree)")
    ap.add_argument("--limit", type=int, default=10_000, help="images used")
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--upscale", default=None, help="WxH: re-encode each image at this size (JPEG quality 90)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import webdataset as wds

    upscale = tuple(int(x) for x in args.upscale.split("x")) if args.upscale else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths, names = write_shards(args.zip, folder, args.per_shard, args.limit, upscale)
        zpath = folder / "images.zip"
        with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED) as out:
            for p in paths:
                with tarfile.open(p) as tf:
                    for m in tf:
                        if m.name.endswith(".jpg"):
                            out.writestr(m.name, tf.extractfile(m).read())
        n = len(names)
        mib = sum(p.stat().st_size for p in paths) / 2**20

        def index():
            return open_dataset(f"{folder}/shard-{{0000..{len(paths) - 1:04d}}}.tar")

        shards = index()

        def stream():
            order = ShardStreamSampler(shards.shard_sizes, 1, n, seed=0, buffer=1000).order(0)
            return sum(len(shards.read_bytes(i)) for i in order)

        def webdataset():
            ds = wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False).shuffle(1000)
            return sum(len(s["jpg"]) for s in ds)

        zipped = open_dataset(str(zpath))

        def zip_random():
            return sum(len(zipped.read_bytes(i)) for i in torch.randperm(len(zipped)).tolist())

        cases = {"mobyssl index (headers and .cls)": index, "mobyssl stream (index built)": stream,
                 "webdataset (shuffle 1000)": webdataset, "zip, random order": zip_random}
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.repeats):  # interleaved
            for name, fn in cases.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        size = f"{upscale[0]}x{upscale[1]}" if upscale else "as stored"
        print(f"{n} images ({size}), {len(paths)} shards, {mib:.1f} MiB; median (min-max) of {args.repeats} runs, "
              f"torch {torch.__version__}, webdataset {wds.__version__}")
        print("| reader | seconds | images/s |\n|---|---|---|")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"| {name} | {med:.3f} ({min(ts):.3f}-{max(ts):.3f}) | {n / med:,.0f} |")


if __name__ == "__main__":
    main()
