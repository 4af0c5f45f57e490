"""Image sources: ImageFolder trees, flat folders of unlabeled images, zips of either, bundled samples.

Every dataset yields ``(transform(image), label)`` with ``label = -1`` for unlabeled images.
"""

from __future__ import annotations

import io
import os
import zipfile
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
BUNDLED = {
    "cifar10-sample-train": "cifar10-sample-train.zip",
    "cifar10-sample-test": "cifar10-sample-test.zip",
}


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(name).startswith(".")


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
    def __init__(self, source: str, keys: list[str], labels: list[int], classes: list[str],
                 transform: Optional[Callable] = None):
        self.source = source
        self.keys = keys
        self.labels = labels
        self.classes = classes
        self.transform = transform

    @property
    def has_labels(self) -> bool:
        return bool(self.classes) and all(label >= 0 for label in self.labels)

    def __len__(self) -> int:
        return len(self.keys)

    def _open(self, key: str) -> Image.Image:
        raise NotImplementedError

    def read_bytes(self, index: int) -> bytes:
        """The encoded file of image ``index`` (for decoding elsewhere, e.g. on a GPU)."""
        raise NotImplementedError

    def load(self, index: int) -> Image.Image:
        key = self.keys[index]
        try:
            return self._open(key).convert("RGB")  # L, P, CMYK, RGBA, I;16 ... all become RGB
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError, EOFError,
                zipfile.BadZipFile) as e:
            raise DataError(f"cannot read image '{key}' in {self.source}: {e}. Remove or replace the file.") from e

    def __getitem__(self, index: int):
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[index]


class FolderDataset(_ImageList):
    """An ImageFolder tree (``root/<class>/<image>``) or a flat folder of unlabeled images.

    Images are found recursively; the first folder below ``root`` is the class.
    """

    def __init__(self, root: str | os.PathLike, transform: Optional[Callable] = None):
        root = Path(root).expanduser()
        rel = sorted(
            str(p.relative_to(root)).replace(os.sep, "/")
            for p in root.rglob("*")
            if p.is_file() and _is_image(p.name)
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not rel:
            raise DataError(
                f"no images found in folder {root} (looked for {', '.join(IMAGE_EXTENSIONS)} files, "
                "recursively). Point the path at a folder of images or an ImageFolder tree."
            )
        labels, classes = _labels_from_paths(rel)
        super().__init__(str(root), rel, labels, classes, transform)
        self.root = root

    def _open(self, key: str) -> Image.Image:
        return Image.open(self.root / key)

    def read_bytes(self, index: int) -> bytes:
        return (self.root / self.keys[index]).read_bytes()


class ZipDataset(_ImageList):
    """A zip of an ImageFolder tree or of flat images, read with random access (no extraction).

    The archive is opened lazily in each DataLoader worker, so the dataset pickles cheaply.
    """

    def __init__(self, path: str | os.PathLike, transform: Optional[Callable] = None):
        path = Path(path).expanduser()
        try:
            with zipfile.ZipFile(path) as z:
                names = sorted(n for n in z.namelist() if not n.endswith("/") and _is_image(n))
        except zipfile.BadZipFile as e:
            raise DataError(f"{path} is not a readable zip file ({e}).") from None
        if not names:
            raise DataError(f"zip file {path} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}).")
        rel = _strip_common_root(names)
        labels, classes = _labels_from_paths(rel)
        super().__init__(str(path), names, labels, classes, transform)
        self.path = path
        self._zip: Optional[zipfile.ZipFile] = None
        self._pid: Optional[int] = None

    def _read(self, key: str) -> bytes:
        if self._zip is None or self._pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._zip.read(key)

    def _open(self, key: str) -> Image.Image:
        return Image.open(io.BytesIO(self._read(key)))

    def read_bytes(self, index: int) -> bytes:
        return self._read(self.keys[index])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_zip"] = None
        return state


def bundled_path(name: str) -> Path:
    if name not in BUNDLED:
        raise DataError(f"unknown bundled dataset 'bundled:{name}'; available: "
                        + ", ".join(f"bundled:{n}" for n in BUNDLED))
    return Path(str(resources.files("mobyssl.data") / "bundled" / BUNDLED[name]))


def open_dataset(spec: str, transform: Optional[Callable] = None, key: str = "data.train") -> _ImageList:
    """Open a data source named by a config value (``key`` is used in error messages)."""
    if not spec:
        raise DataError(f"{key} is empty: set it to an image folder, a .zip, or bundled:cifar10-sample-train")
    if spec.startswith("bundled:"):
        return ZipDataset(bundled_path(spec[len("bundled:"):]), transform)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"{key}={spec}: no such file or folder. Set {key}=<folder or .zip of images>.")
    try:
        if path.is_dir():
            return FolderDataset(path, transform)
        if zipfile.is_zipfile(path):
            return ZipDataset(path, transform)
    except DataError as e:
        raise DataError(f"{key}: {e}") from None
    raise DataError(f"{key}={spec} is neither a folder nor a zip file of images.")
