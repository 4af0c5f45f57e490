"""Images that must be refused by name (oversized files, decompression bombs, pixel values without an 8-bit
meaning), pixel formats that must be converted right (16-bit, float), and data paths that must be explained
(damaged zips, single images, broken links), in every pipeline: cpu, gpu_resident and gpu_decode."""

from __future__ import annotations

import io
import os
import re
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import metrics_records
from PIL import Image

from mobyssl.data import DataError, FolderDataset, ZipDataset, open_dataset
from mobyssl.data import datasets as datasets_module
from mobyssl.data import sources as sources_module
from mobyssl.data.device_decode import EncodedDataset, collate_encoded, decode_batch, split_encoded
from mobyssl.data.resident import ResidentImages, ResidentLoader, UnreadableAtStart
from mobyssl.train.guards import BadDataMonitor

CPU = torch.device("cpu")


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _png16(width: int, height: int, color_type: int, pixel: tuple[int, ...]) -> bytes:
    """A 16-bit-per-sample PNG (color type 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA) of one repeated pixel."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + struct.pack(f">{len(pixel)}H", *pixel) * width
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b""))


def _r(v: int) -> int:
    return round(v / 257)


# name -> (encoded file, expected 8-bit RGB of every pixel, or None: refused with this message part)
FORMATS = {
    "gray16.png": (_encode(Image.fromarray(np.full((6, 5), 30000, np.uint16))), (117, 117, 117), None),
    "gray16.tif": (_encode(Image.fromarray(np.full((6, 5), 1000, np.uint16)), "TIFF"), (_r(1000),) * 3, None),
    "rgb48.png": (_png16(5, 6, 2, (30000, 1000, 65535)), (_r(30000), _r(1000), 255), None),
    "rgba64.png": (_png16(5, 6, 6, (25600, 1000, 0, 40000)), (_r(25600), _r(1000), 0), None),
    "gray_alpha32.png": (_png16(5, 6, 4, (25600, 65535)), (_r(25600),) * 3, None),
    "float01.tif": (_encode(Image.fromarray(np.full((6, 5), 0.5, np.float32)), "TIFF"), (128, 128, 128), None),
    "int32_small.tif": (_encode(Image.fromarray(np.full((6, 5), 65535, np.int32)), "TIFF"), (255, 255, 255), None),
    "float_hdr.tif": (_encode(Image.fromarray(np.linspace(0, 2, 30, dtype=np.float32).reshape(6, 5)), "TIFF"),
                      None, "float image with values in [0, 2]"),
    "int32_big.tif": (_encode(Image.fromarray(np.full((6, 5), 70000, np.int32)), "TIFF"), None,
                      "values in [70000, 70000]"),
    "palette.png": (_encode(Image.new("RGB", (5, 6), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)), (10, 200, 30), None),
    "rgb.bmp": (_encode(Image.new("RGB", (5, 6), (10, 200, 30)), "BMP"), (10, 200, 30), None),
}


def test_pillow_keeps_only_the_high_byte_of_48_bit_pngs():
    """Why ``to_rgb8`` decodes 16-bit colour PNGs itself: PIL's own 8-bit result is v >> 8, not round(v / 257)."""
    img = Image.open(io.BytesIO(FORMATS["rgb48.png"][0]))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (30000 >> 8, 1000 >> 8, 255)
    assert (1000 >> 8) != _r(1000)


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _pixel_of(t: torch.Tensor) -> tuple[int, ...]:
    assert t.dtype == torch.uint8 and t.shape[0] == 3
    colors = {tuple(int(c) for c in t[:, y, x]) for y in range(t.shape[1]) for x in range(t.shape[2])}
    assert len(colors) == 1, colors
    return colors.pop()


def test_pixel_formats_on_the_cpu_pipeline(tmp_path):
    ds = FolderDataset(_folder(tmp_path, {k: v[0] for k, v in FORMATS.items()}))
    for name, (_, expected, refused) in FORMATS.items():
        i = ds.keys.index(name)
        if refused:
            with pytest.raises(DataError, match=re.escape(refused)) as e:
                ds.load(i)
            assert name in str(e.value) and "8- or 16-bit" in str(e.value)
        else:
            img = ds.load(i)
            assert img.mode == "RGB" and img.getpixel((0, 0)) == expected, name
            assert img.getpixel((4, 5)) == expected


def test_pixel_formats_on_gpu_resident(tmp_path, capfd):
    ds = FolderDataset(_folder(tmp_path, {k: v[0] for k, v in FORMATS.items()}))
    resident = ResidentImages(ds, 4, CPU)
    refused = sorted(k for k, v in FORMATS.items() if v[2])
    assert sorted(resident.skipped_files) == refused
    for name, (_, expected, _) in FORMATS.items():
        if expected:
            assert _pixel_of(resident.images[ds.keys.index(name)]) == expected, name
    err = capfd.readouterr().err
    assert all(name in err for name in refused)


def test_pixel_formats_on_gpu_decode(tmp_path, capfd):
    ds = FolderDataset(_folder(tmp_path, {k: v[0] for k, v in FORMATS.items()}))
    batch = collate_encoded([EncodedDataset(ds)[(0, i)] for i in range(len(ds))])
    images, failed = decode_batch(split_encoded(batch[0], batch[1]), batch[3], CPU, ds.source, batch[4])
    refused = sorted(k for k, v in FORMATS.items() if v[2])
    assert sorted(failed) == refused  # a valid TIFF or BMP is decoded by PIL, not reported unreadable
    for name, (_, expected, _) in FORMATS.items():
        if expected:
            assert images[ds.keys.index(name)].shape == (3, 6, 5)
            assert _pixel_of(images[ds.keys.index(name)]) == expected, name
    err = capfd.readouterr().err
    assert "float image with values in [0, 2]" in err and "int32_big.tif" in err


def test_to_rgb8_keeps_the_8_bit_modes():
    from mobyssl.data.datasets import to_rgb8

    base = Image.new("RGB", (3, 2), (200, 30, 30))
    for mode in ("RGB", "L", "P", "RGBA", "CMYK", "LA", "1"):
        img = base.convert(mode)
        assert to_rgb8(img, "x").tobytes() == img.convert("RGB").tobytes(), mode


# --------------------------------------------------------------------------- oversized files


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def test_zip_member_above_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    small = _encode(Image.new("RGB", (4, 4), (1, 2, 3)))
    big = _encode(Image.new("RGB", (300, 300), (9, 9, 9)), "BMP")  # inflates to 270 kB, deflates to ~1 kB
    zpath = _zip(tmp_path / "z.zip", {"c/small.png": small, "c/big.bmp": big})
    monkeypatch.setattr(datasets_module, "MAX_IMAGE_BYTES", 4096)
    opened = []
    real_open = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        opened.append(getattr(name, "filename", name))
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    ds = ZipDataset(zpath)
    i = ds.keys.index("c/big.bmp")
    for read in (ds.load, ds.read_bytes):
        with pytest.raises(DataError) as e:
            read(i)
        assert "c/big.bmp" in str(e.value) and "MAX_IMAGE_BYTES" in str(e.value)
        assert f"{len(big)} bytes" in str(e.value) and "4096 bytes" in str(e.value)
    assert "c/big.bmp" not in opened  # refused from the declared size: never inflated
    assert ds.load(ds.keys.index("c/small.png")).getpixel((0, 0)) == (1, 2, 3)
    assert "c/small.png" in opened


def test_folder_file_above_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    _folder(tmp_path, {"a.png": _encode(Image.new("RGB", (4, 4))), "b.png": b"\0" * 5000})
    monkeypatch.setattr(datasets_module, "MAX_IMAGE_BYTES", 4096)
    ds = FolderDataset(tmp_path)
    with pytest.raises(DataError, match=r"'b\.png'.*5000 bytes, more than the limit of 4096 bytes"):
        ds.read_bytes(1)
    assert ds.load(0).size == (4, 4)


# --------------------------------------------------------------------------- decompression bombs


def test_decompression_bomb_is_refused_by_name_in_every_pipeline(tmp_path, monkeypatch, capfd):
    files = {"ok.png": _encode(Image.new("RGB", (10, 10), (5, 6, 7))),
             "bomb.png": _encode(Image.new("RGB", (40, 30))),         # 1200 pixels: PIL only warns
             "huge.png": _encode(Image.new("RGB", (100, 100)))}       # more than twice the limit: PIL raises
    ds = FolderDataset(_folder(tmp_path, files))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for name, mp in (("bomb.png", "0.0012 megapixels"), ("huge.png", "0.01 megapixels")):
        with pytest.raises(DataError) as e:
            ds.load(ds.keys.index(name))
        assert name in str(e.value) and mp in str(e.value) and "PIL.Image.MAX_IMAGE_PIXELS (0.001 megapixels" \
            in str(e.value)
    assert ds.load(ds.keys.index("ok.png")).size == (10, 10)

    assert sorted(ResidentImages(ds, 8, CPU).skipped_files) == ["bomb.png", "huge.png"]

    decoded = []
    import mobyssl.data.device_decode as dd

    real = dd.decode_image
    monkeypatch.setattr(dd, "decode_image", lambda t, *a, **k: decoded.append(t.numel()) or real(t, *a, **k))
    batch = collate_encoded([EncodedDataset(ds)[(0, i)] for i in range(len(ds))])
    images, failed = decode_batch(split_encoded(batch[0], batch[1]), batch[3], CPU, ds.source, batch[4])
    assert sorted(failed) == ["bomb.png", "huge.png"]
    assert decoded == [len(files["ok.png"])]  # the bombs were refused from their headers, not decoded
    err = capfd.readouterr().err
    assert "'bomb.png' in" in err and "megapixels" in err


# --------------------------------------------------------------------------- pre-training runs


def _noise_png(seed: int, size: int) -> bytes:
    rng = np.random.default_rng(seed)
    return _encode(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))


@pytest.mark.parametrize("pipeline", ["cpu", "gpu_decode", "gpu_resident"])
def test_oversized_member_and_bomb_are_skipped_and_counted_in_a_run(tmp_path, tiny_cfg, monkeypatch, capfd,
                                                                    pipeline):
    files = {f"c{i % 2}/{i}.png": _encode(Image.new("RGB", (8, 8), (5 * i, 100, 200 - 4 * i))) for i in range(46)}
    files["c0/big.png"] = _noise_png(0, 40)                               # 4.8 kB > the 2 kB limit below
    files["c1/bomb.png"] = _encode(Image.new("RGB", (200, 200), (1, 2, 3)))  # 40k pixels > 10k, < 1 kB
    zpath = _zip(tmp_path / "train.zip", files)
    monkeypatch.setattr(datasets_module, "MAX_IMAGE_BYTES", 2048)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    cfg = tiny_cfg(f"data.train={zpath}", "data.test=null", "train.batch_size=8", "method.queue_size=16",
                   "train.epochs=1", "data.max_bad_fraction=0.5", f"data.pipeline={pipeline}", "train.device=cpu")
    from mobyssl.train.trainer import pretrain

    assert pretrain(cfg)["global_step"] == 6
    err = capfd.readouterr().err
    assert "c0/big.png" in err and "MAX_IMAGE_BYTES" in err
    assert "c1/bomb.png" in err and "megapixels" in err
    skipped = metrics_records(cfg.output_dir)[-1]["skipped_images"]
    assert skipped == 2 if pipeline != "cpu" else 2 <= skipped <= 4  # cpu: a replacement may itself be bad


def _resident_folder(root: Path, n: int, bad: int) -> set[str]:
    for i in range(n - bad):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (i % 256, 50, 50)).save(root / f"c{i % 2}" / f"{i}.png")
    names = {f"c0/bad{j}.png" for j in range(bad)}
    for name in names:
        (root / name).write_bytes(b"not an image")
    return names


def test_gpu_resident_stops_before_training_past_max_bad_fraction(tmp_path, tiny_cfg):
    bad = _resident_folder(tmp_path / "imgs", 200, 4)  # 2%
    cfg = tiny_cfg(f"data.train={tmp_path / 'imgs'}", "data.test=null", "data.pipeline=gpu_resident",
                   "train.device=cpu", "data.max_bad_fraction=0.01", "train.max_steps=2")
    from mobyssl.train.trainer import pretrain

    with pytest.raises(DataError, match=r"4 of 200 images could not be read \(2\.0% > data\.max_bad_fraction=0\.01\)") \
            as e:
        pretrain(cfg)
    assert all(name in str(e.value) for name in bad)
    assert not metrics_records(cfg.output_dir)  # not a single step


def test_gpu_resident_counts_its_unreadable_images_in_the_metrics(tmp_path, tiny_cfg, capfd):
    bad = _resident_folder(tmp_path / "imgs", 200, 1)  # 0.5%
    cfg = tiny_cfg(f"data.train={tmp_path / 'imgs'}", "data.test=null", "data.pipeline=gpu_resident",
                   "train.device=cpu", "data.max_bad_fraction=0.01", "train.max_steps=3")
    from mobyssl.train.trainer import pretrain

    assert pretrain(cfg)["global_step"] == 3
    records = metrics_records(cfg.output_dir)
    assert [r["skipped_images"] for r in records] == [1, 1, 1]
    assert bad.pop() in capfd.readouterr().err


def test_resident_loader_reports_its_skipped_files_with_the_first_batch_only(tmp_path):
    from mobyssl.config import AugConfig
    from mobyssl.data.gpu_augment import BatchMoBYAugment
    from mobyssl.data.sampler import GlobalBatchSampler

    bad = _resident_folder(tmp_path, 20, 2)
    resident = ResidentImages(FolderDataset(tmp_path), 8, CPU, max_bad_fraction=0.5)
    assert sorted(resident.skipped_files) == sorted(bad) and resident.skipped == 2
    sampler = GlobalBatchSampler(20, 4, seed=0, yield_epoch=True)
    loader = ResidentLoader(resident, sampler, 4, BatchMoBYAugment(8, AugConfig(), "none"))
    failed = [f for _ in range(2) for _, _, f in loader]
    assert isinstance(failed[0], UnreadableAtStart) and failed[0].dataset_total == 20
    assert sorted(failed[0][0].split("\n")) == sorted(bad)
    assert all(f == [""] for f in failed[1:])


def test_bad_data_monitor_judges_preloaded_failures_over_the_dataset():
    ok = BadDataMonitor(0.01, "src", min_images=200)
    ok.update(32, UnreadableAtStart(["a.png"] * 5, 1000), print)  # 0.5% of the dataset: goes on
    for _ in range(10):  # 5 failures in 350 draws would be 1.4%, but they were found among 1000 images
        ok.update(32, [""], print)
    assert ok.failed == 5 and ok.files == ["a.png"] * 5
    bad = BadDataMonitor(0.01, "src", min_images=200)
    with pytest.raises(DataError, match="20 of 1000 images"):
        bad.preload([f"{i}.png" for i in range(20)], 1000)  # 2%: stops


# --------------------------------------------------------------------------- data paths


def test_damaged_zip_is_called_damaged(tmp_path):
    zpath = _zip(tmp_path / "good.zip", {f"c/{i}.png": _noise_png(i, 16) for i in range(4)})
    cut = tmp_path / "cut.zip"
    cut.write_bytes(zpath.read_bytes()[: zpath.stat().st_size // 2])
    assert not zipfile.is_zipfile(cut)
    with pytest.raises(DataError) as e:
        open_dataset(str(cut), key="data.test")
    msg = str(e.value)
    assert msg.startswith(f"data.test={cut} looks like a zip file but is damaged") and "re-create it" in msg
    assert "neither" not in msg


def test_single_image_and_other_files_are_explained(tmp_path):
    img = tmp_path / "photos" / "one.jpg"
    img.parent.mkdir()
    img.write_bytes(_encode(Image.new("RGB", (4, 4)), "JPEG"))
    with pytest.raises(DataError) as e:
        open_dataset(str(img))
    assert "is a single image" in str(e.value) and "point data.train at the folder that holds it" in str(e.value)
    assert str(img.parent) in str(e.value)
    noext = tmp_path / "image_without_extension"
    noext.write_bytes(_encode(Image.new("RGB", (4, 4))))
    with pytest.raises(DataError, match="single image"):
        open_dataset(str(noext))
    archive = tmp_path / "set.7z"
    archive.write_bytes(b"x" * 600)
    with pytest.raises(DataError) as e:
        open_dataset(str(archive), key="data.eval_train")
    assert f"data.eval_train={archive} is a file (600 bytes)" in str(e.value)
    assert "extract other archives first" in str(e.value) and "ImageFolder" in str(e.value)
    assert "WebDataset .tar shards" in str(e.value)
    tar = tmp_path / "set.tar"  # a .tar is taken for a WebDataset shard
    tar.write_bytes(b"x" * 600)
    with pytest.raises(DataError, match=rf"data.eval_train={tar}: shard .* cannot be read as a tar file"):
        open_dataset(str(tar), key="data.eval_train")


def test_broken_symlink_is_explained(tmp_path):
    link = tmp_path / "data"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(DataError, match=rf"data.train={link} is a broken symbolic link \(to {tmp_path / 'gone'}"):
        open_dataset(str(link))


def test_unlistable_and_unreadable_paths_are_explained(tmp_path, monkeypatch):
    # Tests may run as root, where chmod does not deny anything: the denials are simulated.
    root = tmp_path / "imgs"
    _folder(root, {"a/1.png": _encode(Image.new("RGB", (4, 4))), "b/2.png": _encode(Image.new("RGB", (4, 4)))})
    real_scandir = os.scandir

    def deny(target):
        def scandir(path="."):
            if Path(path) == target:
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path)
        return scandir

    monkeypatch.setattr(os, "scandir", deny(root))
    with pytest.raises(DataError, match=r"data.train=.*imgs is a folder that cannot be listed \(Permission denied\)"):
        open_dataset(str(root))
    monkeypatch.setattr(os, "scandir", deny(root / "b"))
    with pytest.raises(DataError, match=r"cannot list folder 'b' in .*imgs: Permission denied.*left out"):
        open_dataset(str(root))
    monkeypatch.setattr(os, "scandir", real_scandir)

    zpath = _zip(tmp_path / "z.zip", {"a/1.png": b"x"})

    def no_read(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(sources_module, "open", no_read, raising=False)
    with pytest.raises(DataError, match=r"data.train=.*z\.zip cannot be read \(Permission denied\)"):
        open_dataset(str(zpath))
    monkeypatch.undo()
    # A file of the dataset that cannot be read is named, like any unreadable image.
    ds = FolderDataset(root)
    monkeypatch.setattr(datasets_module, "open", no_read, raising=False)
    with pytest.raises(DataError, match=r"cannot read image 'a/1.png' in .*Permission denied"):
        ds.load(0)


def test_broken_symlink_inside_a_folder_is_listed_and_reported(tmp_path):
    _folder(tmp_path, {"c/a.png": _encode(Image.new("RGB", (4, 4)))})
    (tmp_path / "c" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    ds = FolderDataset(tmp_path)
    assert ds.keys == ["c/a.png", "c/gone.png"]
    with pytest.raises(DataError, match="'c/gone.png'.*No such file"):
        ds.load(1)
