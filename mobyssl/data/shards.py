"""WebDataset tar shards: one ``.tar`` file, a brace pattern (``train-{0000..0127}.tar``) or a folder of them.

A shard holds each sample as consecutive members sharing a key (``<key>.jpg`` and ``<key>.cls``, the class
index in ASCII): the WebDataset convention. ``TarShards`` reads every member's header once (no image is
read; ``.cls`` members are) and then reads an image by seeking to its bytes, so shards serve every command:

* evaluation, linear probing and fine-tuning read all shards, in their fixed order;
* pre-training reads them as a stream (``ShardStreamSampler``): each process opens only its own shards
  (shard ``i`` goes to process ``i % world``, for every epoch), reads them front to back in an order shuffled
  per epoch, and shuffles samples within a window of ``data.shuffle_buffer`` samples. No process needs the
  other processes' shards, so multi-node runs need no shared file system.

The stream's order is a function of (seed, epoch, rank, the shards): a resumed run (same number of processes)
sees the same batches as an uninterrupted one, whatever ``data.num_workers``.

Python's ``tarfile`` reads the format: it is exact, needs no extra dependency, and seeking past images we do
not need (a resumed epoch, another worker's batch) is free, which the ``webdataset`` package's pipe-based
reader cannot do.
"""

from __future__ import annotations

import os
import posixpath
import random
import re
import stat
import tarfile
from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Sampler

from ..errors import DataError
from . import datasets
from .datasets import IMAGE_EXTENSIONS, _ImageList, _too_big

SHARD_SUFFIX = ".tar"
LABEL_EXTENSION = "cls"
_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # preference order when a sample has several
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
MAX_OPEN_SHARDS = 8  # file handles kept open per process (the stream reads one or two shards at a time)


def expand_braces(pattern: str, key: str = "data.train") -> list[str]:
    """``a-{00..02}.tar`` -> ``[a-00.tar, a-01.tar, a-02.tar]``; ``{x,y}`` lists; several braces multiply.

    A range is zero-padded to the width of its bounds when either bound starts with 0 (``{0000..0127}``).
    """
    m = _BRACE.search(pattern)
    if m is None:
        if "{" in pattern or "}" in pattern:
            raise DataError(f"{key}={pattern}: unbalanced braces; write a range as {{0000..0127}} or a list as "
                            "{a,b}.")
        return [pattern]
    body = m.group(1)
    r = _RANGE.fullmatch(body)
    if r:
        a, b = r.groups()
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (a, b))
        width = max(len(a), len(b)) if padded else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        raise DataError(f"{key}={pattern}: '{{{body}}}' is neither a range like {{0000..0127}} nor a list like "
                        "{a,b}.")
    head = pattern[:m.start()]
    return [head + item + rest for item in items for rest in expand_braces(pattern[m.end():], key)]


def _is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIX)


def shard_paths(spec: str, key: str = "data.train") -> Optional[list[Path]]:
    """The shards ``spec`` names, or None when it names no shards (an image folder, a zip, ...).

    Shards are: a brace pattern, a ``.tar`` file, or a folder whose top level holds ``.tar`` files and neither
    images nor sub-folders. Raises ``DataError`` naming the missing files when a pattern matches nothing.
    """
    if "{" in spec or "}" in spec:
        paths = [Path(p).expanduser() for p in expand_braces(spec, key)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            what = "none" if len(missing) == len(paths) else f"{len(missing)}"
            raise DataError(f"{key}={spec}: {what} of the {len(paths)} shards it names exist"
                            f"{'s' if what == '1' else ''} as files (first missing: {missing[0]}); fix the "
                            "pattern or the folder.")
        return paths
    path = Path(spec).expanduser()
    if path.name.lower().endswith(_COMPRESSED) and path.is_file():
        raise DataError(f"{key}={spec} is a compressed tar file: shards are read by seeking, which compression "
                        "prevents. Write uncompressed .tar shards (WebDataset's default; JPEGs do not compress "
                        "further), or extract it into a folder.")
    try:
        st = path.stat()
    except OSError:
        return None  # open_dataset explains a missing path
    if stat.S_ISREG(st.st_mode):
        return [path] if _is_shard_name(path.name) else None
    if not stat.S_ISDIR(st.st_mode):
        return None
    try:
        with os.scandir(path) as it:
            entries = [e for e in it if not e.name.startswith(".")]
    except OSError:
        return None
    tars = sorted(e.name for e in entries if _is_shard_name(e.name) and e.is_file())
    if not tars or any(e.is_dir() for e in entries) or any(e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries):
        return None
    return [path / t for t in tars]


def _split_member(name: str) -> tuple[str, str] | None:
    """``dir/abc.seg.png`` -> ``('dir/abc', 'seg.png')``: the WebDataset key and extension."""
    base = posixpath.basename(name)
    dot = base.find(".")
    if dot <= 0:
        return None
    return name[: len(name) - len(base) + dot], base[dot + 1:].lower()


class TarShards(_ImageList):
    """The samples of WebDataset shards that hold an image, readable in any order.

    ``keys[i]`` is the sample's key; ``labels[i]`` its ``.cls`` class index (-1 without one). Classes are named
    by their index (``'0'``, ``'1'``, ...), as the shards carry no names. ``shard_sizes[s]`` counts the samples
    of shard ``s``; samples are numbered shard by shard, in member order.
    """

    named_classes = False

    def __init__(self, paths: list[Path], transform: Optional[Callable] = None, source: Optional[str] = None):
        self.paths = [Path(p) for p in paths]
        keys: list[str] = []
        labels: list[int] = []
        self._where: list[tuple[int, int, int]] = []  # (shard, byte offset of the image, its size)
        self.shard_sizes: list[int] = []
        for s, path in enumerate(self.paths):
            before = len(keys)
            for k, label, offset, size in _index_shard(path):
                keys.append(k)
                labels.append(label)
                self._where.append((s, offset, size))
            self.shard_sizes.append(len(keys) - before)
        if not keys:
            where = str(self.paths[0]) if len(self.paths) == 1 else f"{len(self.paths)} shards ({self.paths[0]}, ...)"
            raise DataError(f"{where}: no sample holds an image (looked for members named <key>.{{{','.join(_IMAGE_EXTS)}}}); "
                            "write the shards in the WebDataset layout (<key>.jpg and <key>.cls per sample).")
        known = [x for x in labels if x >= 0]
        classes = [str(i) for i in range(max(known) + 1)] if known and len(known) == len(labels) else []
        super().__init__(source or (str(self.paths[0]) if len(self.paths) == 1 else f"{len(self.paths)} shards"),
                         keys, labels if classes else [-1] * len(keys), classes, transform)
        self._files: dict[int, object] = {}
        self._pid: Optional[int] = None

    share = ""  # which part of the shards this process reads, when it reads a part

    def summary(self) -> str:
        n = len(self.paths)
        return f"{len(self)} images in {n} shard{'s' if n != 1 else ''}{self.share}"

    def describe(self, index: int) -> str:
        return f"'{self.keys[index]}' in {self.paths[self._where[index][0]]}"

    def _file(self, shard: int):
        if self._pid != os.getpid():  # a DataLoader worker: its own handles
            self._files, self._pid = {}, os.getpid()
        f = self._files.pop(shard, None)
        if f is None:
            if len(self._files) >= MAX_OPEN_SHARDS:
                oldest = next(iter(self._files))
                self._files.pop(oldest).close()
            f = open(self.paths[shard], "rb")
        self._files[shard] = f  # most recently used last
        return f

    def read_bytes(self, index: int) -> bytes:
        shard, offset, size = self._where[index]
        if size > datasets.MAX_IMAGE_BYTES:  # read here, so that a library user's override applies
            raise _too_big(self.describe(index), size)
        try:
            f = self._file(shard)
            f.seek(offset)
            data = f.read(size)
        except OSError as e:
            raise DataError(f"cannot read image {self.describe(index)}: {e.strerror or e}. Fix the file's permissions "
                            "or re-create the shard.") from None
        if len(data) != size:
            raise DataError(f"cannot read image {self.describe(index)}: the shard ends {size - len(data)} bytes into "
                            "it (cut short by a copy or download?); re-create the shard.")
        return data

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = {}, None
        return state


def _index_shard(path: Path):
    """Yields ``(key, label, image offset, image size)`` per sample of one shard that holds an image."""
    try:
        tf = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"shard {path} cannot be read as a tar file ({getattr(e, 'strerror', None) or e}); "
                        "re-create it (an uncompressed tar in the WebDataset layout), or fix its permissions.") from None
    count = 0
    with tf:
        current, image, label = None, None, -1
        try:
            while True:
                member = tf.next()
                if member is None:
                    break
                count += 1
                tf.members.clear()  # the index below is all we keep
                parts = _split_member(member.name) if member.isfile() else None
                if parts is None:
                    continue
                k, ext = parts
                if k != current:
                    if image is not None:
                        yield current, label, image[0], image[1]
                    current, image, label = k, None, -1
                if ext in _IMAGE_EXTS and (image is None or _IMAGE_EXTS.index(ext) < image[2]):
                    image = (member.offset_data, member.size, _IMAGE_EXTS.index(ext))
                elif ext == LABEL_EXTENSION:
                    label = _read_label(tf, member, path)
            # tarfile ends a listing quietly at a header it cannot parse: what follows must be the end-of-archive zeros.
            tf.fileobj.seek(tf.offset)
            if tf.fileobj.read(1 << 16).strip(b"\0"):
                raise tarfile.ReadError(f"a header at byte {tf.offset} cannot be parsed; the members after it are "
                                        "unreadable")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"shard {path} is damaged after {count} members ({e}); re-create it.") from None
        if image is not None:
            yield current, label, image[0], image[1]


def _read_label(tf: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> int:
    raw = tf.extractfile(member).read(64) if member.size <= 64 else b"?"
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        label = -2
    if label < 0:
        raise DataError(f"member '{member.name}' of shard {path} holds {raw[:20]!r}, not a class index (a "
                        "non-negative integer in ASCII); fix the shard, or leave out the .cls members of unlabeled "
                        "data.")
    return label


def open_stream_shards(spec: str, rank: int = 0, world: int = 1, transform: Optional[Callable] = None,
                       key: str = "data.train") -> Optional[TarShards]:
    """This process's shards of ``spec`` for pre-training (shard ``i`` to process ``i % world``), or None when
    ``spec`` names no shards. Only these shards are opened."""
    paths = shard_paths(spec, key)
    if paths is None:
        return None
    if len(paths) < world:
        raise DataError(f"{key}={spec} has {len(paths)} shard{'s' if len(paths) != 1 else ''} for {world} "
                        "processes: every process reads its own shards. Write at least as many shards as processes "
                        "(many more is better: each epoch lasts as long as the process with the fewest images has "
                        "data).")
    mine = paths[rank::world]
    try:
        ds = TarShards(mine, transform, source=spec)
    except DataError as e:
        raise DataError(f"{key}={spec}: {e}") from None
    ds.key = key
    if world > 1:
        ds.share = f" (process {rank} of {world}: its own {len(mine)} of {len(paths)} shards)"
    return ds


class ShardStreamSampler(Sampler):
    """This process's sample order, as a stream of its shards reads it; yields ``(epoch, index)`` keys.

    Epoch ``e``: the shards in an order shuffled with (seed, e, rank), each read front to back, through a
    shuffle buffer of ``buffer`` samples (1: no shuffling within shards); the first ``steps_per_epoch *
    batch_size`` samples are used (``steps_per_epoch`` is the same on every process: that of the process with
    the fewest samples). ``set_epoch(e, start_step)`` resumes mid-epoch exactly.
    """

    def __init__(self, shard_sizes: list[int], batch_size: int, steps_per_epoch: int, seed: int = 0, rank: int = 0,
                 buffer: int = 1000):
        self.shard_sizes, self.batch_size, self.steps_per_epoch = list(shard_sizes), batch_size, steps_per_epoch
        self.seed, self.rank, self.buffer = seed, rank, max(1, buffer)
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.batch_size

    def order(self, epoch: int) -> list[int]:
        """The epoch's sample indices, in stream order (all of them, before cutting to whole batches)."""
        rng = random.Random((self.seed * 1_000_003 + epoch) * 10_007 + self.rank)
        starts = [0]
        for n in self.shard_sizes:
            starts.append(starts[-1] + n)
        shards = list(range(len(self.shard_sizes)))
        rng.shuffle(shards)
        out: list[int] = []
        window: list[int] = []
        for s in shards:
            for i in range(starts[s], starts[s + 1]):
                if len(window) < self.buffer:
                    window.append(i)
                    continue
                j = rng.randrange(self.buffer)
                out.append(window[j])
                window[j] = i
        rng.shuffle(window)
        out.extend(window)
        return out

    def __iter__(self):
        used = self.order(self.epoch)[: self.steps_per_epoch * self.batch_size]
        return iter([(self.epoch, i) for i in used[self.start_step * self.batch_size:]])
