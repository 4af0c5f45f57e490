"""Image sources: ImageFolder trees, flat folders of unlabeled images, zips of either, bundled samples (and,
through ``shards``, WebDataset tar shards).

Every dataset yields ``(transform(image), label)`` with ``label = -1`` for unlabeled images.

Reading an image is guarded, and every refusal is a ``DataError`` naming the file and the fix (the
training and evaluation pipelines then skip, count and list the file):

* a file or zip member larger than ``MAX_IMAGE_BYTES`` is not read at all (a zip member's declared size
  is checked before inflating it);
* an image with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (a decompression bomb) is refused from
  its header, before decoding;
* ``to_rgb8`` turns every pixel format into 8-bit RGB: 16-bit images are scaled (``round(v / 257)``),
  float images in [0, 1] are scaled by 255, and images whose values have no 8-bit meaning are refused.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
import zipfile
import zlib
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
BUNDLED = {
    "cifar10-sample-train": "cifar10-sample-train.zip",
    "cifar10-sample-test": "cifar10-sample-test.zip",
}

MAX_IMAGE_BYTES = 256 * 2**20
"""The largest encoded image file, or zip member once inflated, that is read (bytes; default 256 MiB).

A bigger file is refused unread, as an unreadable image: a zip member that inflates to gigabytes would
otherwise be held in memory by every DataLoader worker. Library users may change it before loading:
``mobyssl.data.datasets.MAX_IMAGE_BYTES = 2**30``.
"""

# What decoding a damaged file can raise (PIL, zlib, zipfile); anything else is a bug and propagates.
_DECODE_ERRORS = (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError,
                  EOFError, zipfile.BadZipFile, zlib.error, struct.error, NotImplementedError)
_PNG16_COLOR = ("RGB;16B", "RGBA;16B", "LA;16B")  # PIL keeps only the high byte of these


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(name).startswith(".")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _too_big(name: str, size: int) -> DataError:
    return DataError(f"cannot read image {name}: it is {_mib(size)}, more than the limit of {_mib(MAX_IMAGE_BYTES)} "
                     "(mobyssl.data.datasets.MAX_IMAGE_BYTES); it was not read. Remove the file, or raise the limit "
                     "from Python if the image is genuine.")


def _bomb(name: str, pixels: int, size: tuple[int, int] | None = None) -> DataError:
    limit = Image.MAX_IMAGE_PIXELS
    dims = f"{size[0]}x{size[1]} pixels, " if size else ""
    return DataError(f"cannot read image {name}: it is {dims}{pixels / 1e6:.4g} megapixels, more than "
                     f"PIL.Image.MAX_IMAGE_PIXELS ({limit / 1e6:.4g} megapixels, a guard against decompression "
                     "bombs); it was not decoded. Remove or shrink the file, or raise PIL.Image.MAX_IMAGE_PIXELS "
                     "(None: no limit) from Python if the image is genuine.")


def check_pixels(width: int, height: int, name: str) -> None:
    """Refuse (``DataError`` naming ``name``) an image larger than ``PIL.Image.MAX_IMAGE_PIXELS``."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise _bomb(name, width * height, (width, height))


def open_image(data: bytes, name: str) -> Image.Image:
    """Open encoded image bytes with PIL, reading only the header; refuses decompression bombs.

    ``name`` (the file, as it should appear in messages) is named in the ``DataError`` of any failure.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by name
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # more than twice the limit: PIL refuses it itself
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise _bomb(name, int(m.group(1)) if m else 0) from None
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {name}: not an image PIL can identify (damaged, empty or of an "
                        "unsupported format). Remove or replace the file.") from None
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot read image {name}: {e}. Remove or replace the file.") from None
    check_pixels(*img.size, name)
    return img


def uint16_to_uint8(t: torch.Tensor) -> torch.Tensor:
    """16-bit samples to 8 bits, ``round(v / 257)`` (65535 -> 255), for tensors (e.g. torchvision's decoders)."""
    return ((t.to(torch.int32) + 128) // 257).to(torch.uint8)


def _is_png16_color(img: Image.Image) -> bool:
    if img.format != "PNG" or img.mode not in ("RGB", "RGBA"):
        return False
    return any(len(t) > 3 and t[3] in _PNG16_COLOR for t in (img.tile or ()))


def _png16_to_rgb8(data: bytes) -> Image.Image:
    from torchvision.io import ImageReadMode, decode_png

    try:
        t = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise OSError(str(e).splitlines()[-1][:200]) from None
    if t.dtype == torch.uint16:
        t = uint16_to_uint8(t)
    return Image.fromarray(t.permute(1, 2, 0).contiguous().numpy())


def to_rgb8(img: Image.Image, name: str, data: bytes | None = None) -> Image.Image:
    """Any PIL image as 8-bit RGB, converting every pixel format to what it means; ``DataError`` otherwise.

    * 16-bit (``I;16``, ``I;16B``, ``I;16L``) and 32-bit integer ``I`` images with values in [0, 65535]:
      ``round(v / 257)``; ``I`` images with values outside [0, 65535] are refused;
    * 48/64-bit PNGs (16-bit RGB, RGBA, gray+alpha), of which PIL keeps only the high byte, are decoded
      again at full precision (from ``data``, the encoded file, or the image's open file) and rounded alike;
    * float ``F`` images with every value in [0, 1]: ``round(255 v)``; others are refused;
    * everything else (L, P, 1, CMYK, RGBA, LA, ...): ``img.convert("RGB")``.

    ``img`` should not be loaded yet (16-bit PNGs are recognised from the header). ``name`` is named in the
    ``DataError`` raised for refused and undecodable images.
    """
    try:
        mode = img.mode
        if _is_png16_color(img):
            if data is None and getattr(img, "fp", None) is not None:
                img.fp.seek(0)
                data = img.fp.read()
            if data is not None:
                return _png16_to_rgb8(data)
        if mode == "I" or mode.startswith("I;16"):
            a = np.asarray(img)
            if mode == "I" and a.size:
                lo, hi = int(a.min()), int(a.max())
                if lo < 0 or hi > 65535:
                    raise DataError(f"cannot read image {name}: 32-bit integer image with values in [{lo}, {hi}], "
                                    "outside the 16-bit range [0, 65535]; save it as 8- or 16-bit.")
            return Image.fromarray(((a.astype(np.int64) + 128) // 257).astype(np.uint8)).convert("RGB")
        if mode == "F":
            a = np.asarray(img, dtype=np.float64)
            finite = np.isfinite(a)
            if not finite.all():
                raise DataError(f"cannot read image {name}: float image with NaN or infinite values; save it as "
                                "8- or 16-bit.")
            lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
            if lo < 0 or hi > 1:
                raise DataError(f"cannot read image {name}: float image with values in [{lo:g}, {hi:g}], not "
                                "[0, 1]; save it as 8- or 16-bit.")
            return Image.fromarray(np.floor(a * 255 + 0.5).astype(np.uint8)).convert("RGB")
        return img.convert("RGB")  # L, P, 1, CMYK, RGBA, LA, YCbCr ...
    except DataError:
        raise
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot read image {name}: {e}. Remove or replace the file.") from None


def decode_image_bytes(data: bytes, name: str, reduce: Optional[Callable[[int, int], int]] = None) -> Image.Image:
    """Encoded image bytes -> 8-bit RGB PIL image (``open_image`` + ``to_rgb8``); ``DataError`` naming ``name``.

    ``reduce(width, height)``, for JPEGs: a factor (1, 2, 4 or 8) by which the decoder may shrink the image (PIL's
    draft mode: the JPEG's own reduced-size decoding, far cheaper than decoding everything and resizing).
    """
    img = open_image(data, name)
    if reduce is not None and img.format == "JPEG":
        factor = reduce(*img.size)
        if factor > 1:
            try:
                img.draft("RGB", (img.width // factor, img.height // factor))
                return to_rgb8(img, name, data)
            except (DataError, *_DECODE_ERRORS):
                img = open_image(data, name)  # the reduced decode failed: the plain decoder decides
    return to_rgb8(img, name, data)


def _labels_from_paths(rel_paths: list[str]) -> tuple[list[int], list[str]]:
    """Class = first folder of each relative path; no folders at all means unlabeled."""
    if all("/" not in p for p in rel_paths):
        return [-1] * len(rel_paths), []
    tops = [p.split("/", 1)[0] if "/" in p else "" for p in rel_paths]
    classes = sorted({t for t in tops if t})
    index = {c: i for i, c in enumerate(classes)}
    return [index.get(t, -1) for t in tops], classes


def _strip_common_root(names: list[str]) -> list[str]:
    """``train/cat/1.jpg, train/dog/2.jpg`` -> ``cat/1.jpg, dog/2.jpg`` (zips often wrap one folder)."""
    while names and all("/" in n for n in names):
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or not all(n.count("/") >= 2 for n in names):
            break
        names = [n.split("/", 1)[1] for n in names]
    return names


class _ImageList(Dataset):
    """Images named by ``keys``; ``key`` is the config key it was opened for (``data.test``), when known.

    ``unreadable`` collects the keys an evaluation found unreadable, so that each is reported once.
    """

    def __init__(self, source: str, keys: list[str], labels: list[int], classes: list[str],
                 transform: Optional[Callable] = None):
        self.source = source
        self.keys = keys
        self.labels = labels
        self.classes = classes
        self.transform = transform
        self.key: Optional[str] = None
        self.unreadable: set[str] = set()

    named_classes = True
    """Whether ``classes`` are names (class folders); shards name their classes by index."""

    def summary(self) -> str:
        return f"{len(self)} images"

    @property
    def has_labels(self) -> bool:
        return bool(self.classes) and all(label >= 0 for label in self.labels)

    def __len__(self) -> int:
        return len(self.keys)

    def describe(self, index: int) -> str:
        """Image ``index`` as named in messages: ``'cat/1.png' in /data/train.zip``."""
        return f"'{self.keys[index]}' in {self.source}"

    def read_bytes(self, index: int) -> bytes:
        """The encoded file of image ``index`` (for decoding elsewhere, e.g. on a GPU).

        Raises ``DataError`` naming the file when it cannot be read or is larger than ``MAX_IMAGE_BYTES``.
        """
        raise NotImplementedError

    def load(self, index: int, reduce: Optional[Callable[[int, int], int]] = None) -> Image.Image:
        """Image ``index`` as 8-bit RGB (see ``to_rgb8``); ``DataError`` naming the file if it cannot be used.
        ``reduce``: see ``decode_image_bytes``."""
        return decode_image_bytes(self.read_bytes(index), self.describe(index), reduce)

    def __getitem__(self, index: int):
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[index]


def _scan_folder(root: Path) -> tuple[list[str], list[tuple[str, OSError]]]:
    """Image files below ``root`` (relative, ``/``-separated), hidden entries and symlinked folders skipped,
    and the folders that could not be listed. A broken symlink with an image name is listed (it is reported
    as unreadable when loaded, not silently dropped)."""
    found, errors, stack = [], [], [""]
    while stack:
        sub = stack.pop()
        try:
            with os.scandir(root / sub if sub else root) as it:
                entries = list(it)
        except OSError as e:
            errors.append((sub or ".", e))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = f"{sub}/{entry.name}" if sub else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(rel)
                elif _is_image(entry.name) and (entry.is_file() or (entry.is_symlink()
                                                                      and not os.path.exists(entry.path))):
                    found.append(rel)
            except OSError:
                found.append(rel)  # cannot even be stat'ed: reported when loaded
    return sorted(found), errors


class FolderDataset(_ImageList):
    """An ImageFolder tree (``root/<class>/<image>``) or a flat folder of unlabeled images.

    Images are found recursively; the first folder below ``root`` is the class. A sub-folder that cannot
    be listed is an error (its images would be missing without a word).
    """

    def __init__(self, root: str | os.PathLike, transform: Optional[Callable] = None):
        root = Path(root).expanduser()
        rel, errors = _scan_folder(root)
        if errors:
            where, e = errors[0]
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise DataError(f"cannot list folder '{where}' in {root}{more}: {e.strerror or e}. Fix its permissions "
                            f"(its images would be left out), or move it out of {root}.")
        if not rel:
            raise DataError(
                f"no images found in folder {root} (looked for {', '.join(IMAGE_EXTENSIONS)} files, "
                "recursively). Point the path at a folder of images or an ImageFolder tree."
            )
        labels, classes = _labels_from_paths(rel)
        super().__init__(str(root), rel, labels, classes, transform)
        self.root = root

    def read_bytes(self, index: int) -> bytes:
        limit = MAX_IMAGE_BYTES
        try:
            with open(os.path.join(self.source, self.keys[index]), "rb") as f:  # str join: cheaper than Path's
                size = os.fstat(f.fileno()).st_size
                if size > limit:
                    raise _too_big(self.describe(index), size)
                data = f.read(size + 1)  # not read(limit + 1): that allocates the whole limit first
                if len(data) > size:  # grew since the stat
                    data += f.read(limit + 1 - len(data))
        except OSError as e:
            raise DataError(f"cannot read image {self.describe(index)}: {e.strerror or e}. Remove or replace the "
                            "file, or fix its permissions.") from None
        if len(data) > limit:
            raise _too_big(self.describe(index), len(data))
        return data


class ZipDataset(_ImageList):
    """A zip of an ImageFolder tree or of flat images, read with random access (no extraction).

    The archive is opened lazily in each DataLoader worker, so the dataset pickles cheaply. A member is
    inflated only if its declared size (which ``zipfile`` never reads past) is within ``MAX_IMAGE_BYTES``.
    """

    def __init__(self, path: str | os.PathLike, transform: Optional[Callable] = None):
        path = Path(path).expanduser()
        try:
            with zipfile.ZipFile(path) as z:
                names = sorted(n for n in z.namelist() if not n.endswith("/") and _is_image(n))
        except zipfile.BadZipFile as e:
            raise DataError(f"{path} looks like a zip file but is damaged ({e}); re-create it.") from None
        except OSError as e:
            raise DataError(f"{path} cannot be read as a zip file ({e.strerror or e}); fix its permissions or "
                            "re-create it.") from None
        if not names:
            raise DataError(f"zip file {path} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}); point the "
                            "key at a zip of images or of an ImageFolder tree.")
        rel = _strip_common_root(names)
        labels, classes = _labels_from_paths(rel)
        super().__init__(str(path), names, labels, classes, transform)
        self.path = path
        self._zip: Optional[zipfile.ZipFile] = None
        self._pid: Optional[int] = None

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._zip

    def read_bytes(self, index: int) -> bytes:
        try:
            archive = self._archive()
            info = archive.getinfo(self.keys[index])
            if info.file_size > MAX_IMAGE_BYTES:
                raise _too_big(self.describe(index), info.file_size)
            return archive.read(info)
        except DataError:
            raise
        except (OSError, zipfile.BadZipFile, zlib.error, EOFError, KeyError, ValueError, NotImplementedError,
                RuntimeError) as e:  # RuntimeError: an encrypted member
            raise DataError(f"cannot read image {self.describe(index)}: {e}. Remove or replace the file, or "
                            "re-create the zip.") from None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_zip"] = None
        return state


def check_labelled_splits(train: _ImageList, train_key: str, test: _ImageList, purpose: str) -> None:
    """Both splits carry labels of the same classes, or a ``DataError`` says which key to fix.

    ``purpose`` completes "... so it cannot be used for <purpose>". Classes are compared by name, or by count
    where a split names them by index (WebDataset shards).
    """
    for key, ds in ((train_key, train), ("data.test", test)):
        if not ds.has_labels:
            raise DataError(
                f"{key}={ds.source} has no class folders (or .cls labels, for shards), so it cannot be used for "
                f"{purpose}. Point {key} at an ImageFolder tree (<root>/<class>/<image>) or labelled shards"
                + (" or set data.eval_train to a labelled split" if key == "data.train" else "") + "."
            )
    same = (train.classes == test.classes if train.named_classes and test.named_classes
            else len(train.classes) == len(test.classes))
    if not same:
        raise DataError(f"{train_key} and data.test have different classes ({len(train.classes)} vs "
                        f"{len(test.classes)}: {train.classes[:5]} vs {test.classes[:5]}); point both at splits of "
                        "the same dataset, with the same class folders.")


def bundled_path(name: str) -> Path:
    if name not in BUNDLED:
        raise DataError(f"unknown bundled dataset 'bundled:{name}'; available: "
                        + ", ".join(f"bundled:{n}" for n in BUNDLED))
    return Path(str(resources.files("mobyssl.data") / "bundled" / BUNDLED[name]))
