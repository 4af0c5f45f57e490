"""``open_dataset``: the data source a config value names (folder, zip, bundled sample or WebDataset shards)."""

from __future__ import annotations

import os
import stat
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Optional

from PIL import Image

from .datasets import DataError, FolderDataset, ZipDataset, _ImageList, _is_image, _mib, bundled_path
from .shards import TarShards, shard_paths


def _is_single_image(path: Path) -> bool:
    if _is_image(path.name):
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path):
                return True
    except Exception:  # anything PIL cannot identify is not an image
        return False


def _expected(key: str) -> str:
    return (f"set {key} to a folder of images (an ImageFolder tree <root>/<class>/<image>, or a flat folder), "
            "a .zip of one, or WebDataset .tar shards")


def open_dataset(spec: str, transform: Optional[Callable] = None, key: str = "data.train") -> _ImageList:
    """Open a data source named by a config value (``key`` is used in error messages and kept as ``.key``)."""
    if not spec:
        raise DataError(f"{key} is empty: set it to an image folder, a .zip, or bundled:cifar10-sample-train")
    if spec.startswith("bundled:"):
        ds = ZipDataset(bundled_path(spec[len("bundled:"):]), transform)
        ds.key = key
        return ds
    try:
        shards = shard_paths(spec, key)
        if shards is not None:
            ds = TarShards(shards, transform, source=spec)
            ds.key = key
            return ds
    except DataError as e:
        msg = str(e)
        raise DataError(msg if msg.startswith(f"{key}=") else f"{key}={spec}: {msg}") from None
    path = Path(spec).expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise DataError(f"{key}={spec} is a broken symbolic link (to {os.readlink(path)}, which does not "
                            f"exist); fix the link or {_expected(key)}.") from None
        raise DataError(f"{key}={spec}: no such file or folder. Set {key}=<folder or .zip of images>.") from None
    except OSError as e:  # permission denied on a parent folder, a symlink loop, a file used as a folder
        raise DataError(f"{key}={spec} cannot be accessed ({e.strerror or e}); fix the path or the permissions "
                        "of the folders on it.") from None
    try:
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(path) as it:
                    next(it, None)
            except OSError as e:
                raise DataError(f"{key}={spec} is a folder that cannot be listed ({e.strerror or e}); fix its "
                                "permissions (e.g. chmod u+rx).") from None
            ds = FolderDataset(path, transform)
        elif stat.S_ISREG(st.st_mode):
            try:
                with open(path, "rb") as f:
                    head = f.read(4)
            except OSError as e:
                raise DataError(f"{key}={spec} cannot be read ({e.strerror or e}); fix its permissions.") from None
            if zipfile.is_zipfile(path):
                ds = ZipDataset(path, transform)
            elif head.startswith(b"PK") or path.suffix.lower() == ".zip":
                try:
                    zipfile.ZipFile(path).close()
                    reason = "unknown damage"
                except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
                    reason = str(e)
                raise DataError(f"{key}={spec} looks like a zip file but is damaged ({reason}; {_mib(st.st_size)}, "
                                "perhaps a copy or download cut short); re-create it.") from None
            elif _is_single_image(path):
                raise DataError(f"{key}={spec} is a single image, neither a folder nor a zip of images; point "
                                f"{key} at the folder that holds it ({path.parent}).") from None
            else:
                hint = ("; extract other archives first" if path.name.lower().endswith(
                    (".gz", ".7z", ".rar", ".xz", ".bz2", ".zst")) else "")
                raise DataError(f"{key}={spec} is a file ({_mib(st.st_size)}) that is neither a folder nor a zip "
                                f"file of images; {_expected(key)}{hint}.") from None
        else:
            raise DataError(f"{key}={spec} is neither a folder nor a regular file (a device, pipe or socket); "
                            f"{_expected(key)}.")
    except DataError as e:
        msg = str(e)
        raise DataError(msg if msg.startswith(f"{key}=") else f"{key}: {msg}") from None
    ds.key = key
    return ds
