"""Image sources: ImageFolder trees, flat folders, zips, bundled samples, and their errors."""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mobyssl.data import DataError, FolderDataset, ZipDataset, open_dataset
from mobyssl.data.datasets import bundled_path

SHARED_CIFAR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _color(i: int) -> tuple[int, int, int]:
    return (10 * i % 256, 255 - 10 * i % 256, 37 * i % 256)


def _png_bytes(color, size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _save(path: Path, color, size=(8, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(color, size))


def _pixel(ds, i):
    img, label = ds[i]
    return img.getpixel((0, 0)), label


def _make_tree(root: Path) -> dict[str, tuple]:
    """dog/ (2 images), cat/ (1), bird/ (3): written out of order; returns rel path -> colour."""
    files = {"dog/b.png": _color(1), "dog/a.png": _color(2), "cat/x.png": _color(3),
             "bird/1.png": _color(4), "bird/2.png": _color(5), "bird/3.png": _color(6)}
    for rel, c in files.items():
        _save(root / rel, c)
    return files


# --------------------------------------------------------------------------- folders


def test_imagefolder_tree_labels_from_sorted_class_folders(tmp_path):
    files = _make_tree(tmp_path)
    ds = FolderDataset(tmp_path)
    assert len(ds) == 6
    assert ds.classes == ["bird", "cat", "dog"]
    assert ds.has_labels
    assert Counter(ds.labels) == {0: 3, 1: 1, 2: 2}
    for i, key in enumerate(ds.keys):
        cls = key.split("/")[0]
        assert ds.labels[i] == ds.classes.index(cls)
        color, label = _pixel(ds, i)
        assert color == files[key]           # the label goes with the right image
        assert label == ds.classes.index(cls)
    img, _ = ds[0]
    assert img.mode == "RGB" and img.size == (8, 6)


def test_grayscale_and_rgba_images_are_converted_to_rgb(tmp_path):
    (tmp_path / "c").mkdir()
    Image.new("L", (5, 5), 77).save(tmp_path / "c" / "g.png")
    Image.new("RGBA", (5, 5), (1, 2, 3, 4)).save(tmp_path / "c" / "rgba.png")
    ds = FolderDataset(tmp_path)
    assert [ds[i][0].mode for i in range(len(ds))] == ["RGB", "RGB"]
    assert ds[0][0].getpixel((0, 0)) == (77, 77, 77)


def test_transform_is_applied(tmp_path):
    _make_tree(tmp_path)
    ds = FolderDataset(tmp_path, transform=lambda img: img.size)
    assert ds[0] == ((8, 6), 0)


def test_flat_folder_is_unlabeled(tmp_path):
    for i in range(4):
        _save(tmp_path / f"img{i}.png", _color(i))
    ds = open_dataset(str(tmp_path))
    assert isinstance(ds, FolderDataset)
    assert len(ds) == 4
    assert ds.labels == [-1] * 4
    assert ds.classes == []
    assert not ds.has_labels
    assert [ds[i][1] for i in range(4)] == [-1] * 4
    assert ds[2][0].getpixel((0, 0)) == _color(2)


def test_recursive_discovery_first_folder_is_class(tmp_path):
    _save(tmp_path / "cat" / "deep" / "er" / "a.png", _color(1))
    _save(tmp_path / "cat" / "b.jpeg", _color(2))
    _save(tmp_path / "dog" / "x" / "c.PNG", _color(3))  # upper-case extension counts
    ds = FolderDataset(tmp_path)
    assert len(ds) == 3
    assert ds.classes == ["cat", "dog"]
    assert sorted(zip(ds.keys, ds.labels)) == [("cat/b.jpeg", 0), ("cat/deep/er/a.png", 0), ("dog/x/c.PNG", 1)]
    assert ds.has_labels


def test_mixed_root_and_class_images_are_not_fully_labeled(tmp_path):
    _save(tmp_path / "cat" / "a.png", _color(1))
    _save(tmp_path / "stray.png", _color(2))
    ds = FolderDataset(tmp_path)
    assert ds.classes == ["cat"]
    assert sorted(ds.labels) == [-1, 0]
    assert not ds.has_labels  # one image has no class: cannot be used for evaluation


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    _make_tree(tmp_path)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / "labels.csv").write_text("a,b\n")
    _save(tmp_path / "dog" / ".hidden.png", _color(9))
    (tmp_path / "cat" / "._x.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS resource fork
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "emptyclass").mkdir()
    (tmp_path / "textonly").mkdir()
    (tmp_path / "textonly" / "readme.md").write_text("hi")
    ds = FolderDataset(tmp_path)
    assert len(ds) == 6
    assert ds.classes == ["bird", "cat", "dog"]  # folders without images are no classes
    assert not any(Path(k).name.startswith(".") for k in ds.keys)
    for i in range(len(ds)):
        ds[i]  # every listed file is readable


def test_folder_dataset_pickles(tmp_path):
    _make_tree(tmp_path)
    ds = FolderDataset(tmp_path)
    ds2 = pickle.loads(pickle.dumps(ds))
    assert len(ds2) == len(ds) and ds2.classes == ds.classes
    assert _pixel(ds2, 4) == _pixel(ds, 4)


# --------------------------------------------------------------------------- zips


def _write_zip(path: Path, files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for d in dirs:
            z.writestr(d, b"")  # explicit directory entries, as `zip -r` writes them
        for name, data in files.items():
            z.writestr(name, data)
    return path


def _tree_files(prefix: str = "") -> dict[str, tuple]:
    return {f"{prefix}dog/b.png": _color(1), f"{prefix}dog/a.png": _color(2), f"{prefix}cat/x.png": _color(3),
            f"{prefix}bird/1.png": _color(4), f"{prefix}bird/2.png": _color(5), f"{prefix}bird/3.png": _color(6)}


@pytest.mark.parametrize("prefix", ["", "train/", "data/cifar/"])
def test_zip_imagefolder_with_and_without_wrapping_root(tmp_path, prefix):
    colors = _tree_files(prefix)
    dirs = tuple(prefix[: i + 1] for i in range(len(prefix)) if prefix[i] == "/")
    extra = {f"{prefix}README.txt": b"hello", f"{prefix}dog/.hidden.png": _png_bytes((0, 0, 0))}
    zpath = _write_zip(tmp_path / "set.zip", {**{k: _png_bytes(c) for k, c in colors.items()}, **extra}, dirs)
    ds = open_dataset(str(zpath))
    assert isinstance(ds, ZipDataset)
    assert len(ds) == 6
    assert ds.classes == ["bird", "cat", "dog"]
    assert ds.has_labels
    assert Counter(ds.labels) == {0: 3, 1: 1, 2: 2}
    # Random access, out of order, each image with its own label.
    for i in (5, 0, 3, 3, 1):
        color, label = _pixel(ds, i)
        assert color == colors[ds.keys[i]]
        assert ds.classes[label] == ds.keys[i][len(prefix):].split("/")[0]


def test_flat_zip_is_unlabeled(tmp_path):
    zpath = _write_zip(tmp_path / "flat.zip", {f"{i}.png": _png_bytes(_color(i)) for i in range(5)})
    ds = ZipDataset(zpath)
    assert len(ds) == 5 and ds.labels == [-1] * 5 and not ds.has_labels
    assert ds[4] == (ds.load(4), -1)
    assert ds[4][0].getpixel((0, 0)) == _color(4)


def test_zip_dataset_pickles_after_being_read(tmp_path):
    zpath = _write_zip(tmp_path / "set.zip", {k: _png_bytes(c) for k, c in _tree_files("root/").items()})
    ds = ZipDataset(zpath)
    before = [_pixel(ds, i) for i in range(len(ds))]  # opens the archive handle
    ds2 = pickle.loads(pickle.dumps(ds))
    assert [_pixel(ds2, i) for i in range(len(ds2))] == before
    img, label = pickle.loads(pickle.dumps(ds))[3]
    assert (img.getpixel((0, 0)), label) == before[3]


def test_zip_not_a_zip_and_zip_without_images(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataError, match="bad.zip"):
        ZipDataset(bad)
    empty = _write_zip(tmp_path / "docs.zip", {"a.txt": b"x", "b/c.csv": b"y"})
    with pytest.raises(DataError, match="holds no images"):
        open_dataset(str(empty), key="data.test")


# --------------------------------------------------------------------------- bundled


def test_bundled_train_sample():
    ds = open_dataset("bundled:cifar10-sample-train")
    assert len(ds) == 1000
    assert ds.classes == CIFAR_CLASSES
    assert Counter(ds.labels) == {c: 100 for c in range(10)}
    assert ds.has_labels
    img, label = ds[999]
    assert img.size == (32, 32) and img.mode == "RGB"
    assert label == 9


def test_bundled_test_sample():
    ds = open_dataset("bundled:cifar10-sample-test")
    assert len(ds) == 500
    assert ds.classes == CIFAR_CLASSES
    assert Counter(ds.labels) == {c: 50 for c in range(10)}


def test_bundled_train_and_test_are_disjoint_files():
    train = open_dataset("bundled:cifar10-sample-train")
    test = open_dataset("bundled:cifar10-sample-test")
    a = {train.load(i).tobytes() for i in range(0, 1000, 10)}
    b = {test.load(i).tobytes() for i in range(0, 500, 5)}
    assert not a & b


def test_unknown_bundled_name():
    with pytest.raises(DataError, match="bundled:cifar10-sample-train"):
        open_dataset("bundled:cifar100")


@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason="../shared/data/cifar10 not present")
@pytest.mark.parametrize("split", ["train", "test"])
def test_bundled_zips_match_shared_data(split):
    shared = SHARED_CIFAR / f"sample-{split}.zip"
    assert shared.is_file()
    assert bundled_path(f"cifar10-sample-{split}").read_bytes() == shared.read_bytes()


@pytest.mark.skipif(not (SHARED_CIFAR / "classes.txt").is_file(), reason="../shared/data/cifar10 not present")
def test_bundled_classes_match_shared_class_list():
    assert open_dataset("bundled:cifar10-sample-train").classes == (SHARED_CIFAR / "classes.txt").read_text().split()


# --------------------------------------------------------------------------- open_dataset errors


def test_empty_spec_names_key():
    with pytest.raises(DataError, match="data.test is empty"):
        open_dataset("", key="data.test")


def test_missing_path_names_key_and_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as ei:
        open_dataset(str(missing), key="data.eval_train")
    assert "data.eval_train" in str(ei.value) and str(missing) in str(ei.value)


def test_empty_folder(tmp_path):
    with pytest.raises(DataError) as ei:
        open_dataset(str(tmp_path))
    assert "data.train" in str(ei.value) and "no images" in str(ei.value)


def test_folder_without_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("text")
    (tmp_path / "b.json").write_text("{}")
    _save(tmp_path / "a" / ".hidden.png", _color(1))
    with pytest.raises(DataError, match=r"data\.train: no images found"):
        open_dataset(str(tmp_path))


def test_file_that_is_neither_folder_nor_zip(tmp_path):
    f = tmp_path / "images.bin"
    f.write_bytes(b"not an archive" * 10)
    with pytest.raises(DataError, match="neither a folder nor a zip"):
        open_dataset(str(f))
    # A single image file is not a data source either.
    img = tmp_path / "one.png"
    _save(img, _color(1))
    with pytest.raises(DataError, match="neither a folder nor a zip"):
        open_dataset(str(img))


def test_corrupt_image_in_folder_names_the_file(tmp_path):
    _make_tree(tmp_path)
    (tmp_path / "cat" / "broken.png").write_bytes(b"this is not a png")
    ds = FolderDataset(tmp_path)
    i = ds.keys.index("cat/broken.png")
    with pytest.raises(DataError) as ei:
        ds[i]
    assert "cat/broken.png" in str(ei.value)
    ds[(i + 1) % len(ds)]  # the others still load


def test_truncated_image_in_zip_names_the_file(tmp_path):
    good = _png_bytes(_color(1), size=(64, 64))
    zpath = _write_zip(tmp_path / "t.zip", {"c/good.png": good, "c/trunc.png": good[: len(good) // 2]})
    ds = open_dataset(str(zpath))
    i = ds.keys.index("c/trunc.png")
    with pytest.raises(DataError, match="c/trunc.png"):
        ds[i]
    assert ds[1 - i][0].size == (64, 64)
