"""A hostile but realistic user: ~160 bad inputs and faults against the real ``mobyssl`` command line.

Every case runs ``python -m mobyssl ...`` as subprocesses (cwd: a fresh folder per case, OMP_NUM_THREADS=1,
the tiny 2-block ViT of tests/conftest.py, 2 steps) and classifies the outcome:

* **ok**: a bad input is refused with exit code 2 and ONE line on stderr starting ``mobyssl <cmd>: error:``
  (an argparse ``usage:`` block before it is tolerated) that names the key, file or flag involved, with no
  traceback; or a legitimate input succeeds (exit 0) with the right result. In both cases the case's harm
  checks pass.
* **unclear**: a traceback, a refusal with another exit code, several error lines, a message that does not
  name the key/file, a legitimate input that fails, or a command that hangs.
* **harm**: a case-specific post-condition fails: the user's file changed or deleted, something written
  although the command refused, a checkpoint that no longer loads or resumes, non-finite weights, exit 0
  with a message naming a file that does not exist, two runs' records in one metrics.jsonl, training on
  images decoded as garbage, ...
* **skipped**: the case needs something this machine lacks (e.g. ``mount``); the reason is printed.

Generic harm checks, applied to every case: a snapshot (type, size, sha1) of the case folder is taken
around each command; a refusal may not create, change or delete anything there (a run directory's own
``.mobyssl.lock`` marker may be rewritten); a success may not change or delete anything the user had
unless the case allows it (a resumed run may change its own run directory); and a command that exits 0
while its ``done: ...`` / ``wrote ...`` line names a .pth/.json file that does not exist is harm.

    python benchmarks/hostile_probe.py                      # all cases, 2 at a time (about 9 minutes on 2 cores)
    python benchmarks/hostile_probe.py --only resume        # cases whose name contains "resume"
    python benchmarks/hostile_probe.py --json probe.json --jobs 1 --keep
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

TINY = [
    "data.num_workers=0", "model.backbone=vit_nano_patch4_32", "model.kwargs={depth: 2}",
    "method.proj_hidden_dim=64", "method.pred_hidden_dim=64", "method.proj_dim=32", "method.queue_size=128",
    "train.batch_size=32", "train.epochs=2", "train.warmup_epochs=1", "train.log_every=1", "knn.batch_size=128",
]
FAST = TINY + ["train.max_steps=2", "train.knn_every=-1"]
STEP2 = "checkpoint_step00000002.pth"
STEP3 = "checkpoint_step00000003.pth"
ALWAYS_MAY_CHANGE = ("*.mobyssl.lock",)  # a run directory's own lock marker (holder info is rewritten)


# =============================================================================== processes


@dataclass
class Result:
    argv: list[str]
    rc: int | None
    out: str
    err: str
    wall: float
    maxrss_mb: float
    timed_out: bool = False
    new: list[str] = field(default_factory=list)  # snapshot differences around the command
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.out + "\n" + self.err

    def lines(self, stream: str = "err") -> list[str]:
        return [ln for ln in getattr(self, stream).splitlines() if ln.strip()]


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
    env.pop("PYTHONUNBUFFERED", None)
    return env


def _vm_hwm_kb(pid: int) -> int:
    """The peak resident set size of process ``pid`` so far (``VmHWM`` in /proc; 0 where unavailable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class Proc:
    """``python -m mobyssl ARGS`` in its own session, stdout/stderr to files; rusage of this child alone."""

    def __init__(self, args: list[str], cwd: Path, logs: Path, stdout=None):
        self.argv = ["mobyssl", *args]
        logs.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=logs, suffix=".log")
        os.close(fd)
        self.out_path, self.err_path = Path(name + ".out"), Path(name + ".err")
        self._out = stdout if stdout is not None else open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.t0 = time.monotonic()
        self.p = subprocess.Popen([PY, "-m", "mobyssl", *args], cwd=cwd, env=_env(), stdin=subprocess.DEVNULL,
                                  stdout=self._out, stderr=self._err, start_new_session=True)
        self.result: Result | None = None

    def stdout_so_far(self) -> str:
        try:
            return self.out_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.result is None:
            os.kill(self.p.pid, sig)

    def wait(self, timeout: float) -> Result:
        if self.result is not None:
            return self.result
        deadline = time.monotonic() + timeout
        timed_out = False
        hwm_kb = 0
        while True:
            hwm_kb = max(hwm_kb, _vm_hwm_kb(self.p.pid))
            pid, status, ru = os.wait4(self.p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                timed_out = True
                try:
                    os.killpg(self.p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                pid, status, ru = os.wait4(self.p.pid, 0)
                break
            time.sleep(0.05)
        rc = os.waitstatus_to_exitcode(status)
        self.p.returncode = rc
        for f in (self._out, self._err):
            f.close()
        read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
        # Peak RSS: the child's own high-water mark, sampled while it runs (ru_maxrss of a child can start at the
        # RSS of this process, from which it was spawned); ru_maxrss where no sample was taken.
        self.result = Result(self.argv, rc, read(self.out_path), read(self.err_path), time.monotonic() - self.t0,
                             (hwm_kb or ru.ru_maxrss) / 1024, timed_out)
        return self.result

    def kill(self) -> None:
        if self.result is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait(30)


# =============================================================================== snapshots and checks


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry below ``root`` (symlinks not followed): kind and content signature."""
    snap: dict[str, tuple] = {}
    if not root.exists():
        return snap
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            try:
                if p.is_symlink():
                    snap[rel] = ("link", os.readlink(p))
                elif p.is_dir():
                    snap[rel] = ("dir",)
                elif p.is_file():
                    h = hashlib.sha1()
                    with open(p, "rb") as f:
                        for chunk in iter(lambda: f.read(1 << 20), b""):
                            h.update(chunk)
                    snap[rel] = ("file", p.stat().st_size, h.hexdigest())
                else:
                    snap[rel] = ("other",)
            except OSError as e:
                snap[rel] = ("error", str(e))
    return snap


def sha1(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def _matches(rel: str, patterns) -> bool:
    return any(fnmatch.fnmatch(rel, pat) for pat in patterns)


def load_ckpt(path: Path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def nonfinite(obj, prefix: str = "") -> list[str]:
    """Names of floating tensors in ``obj`` (nested dicts/lists) with NaN or Inf values."""
    import torch

    bad = []
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.numel() and not bool(torch.isfinite(obj).all()):
            bad.append(prefix or "<tensor>")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            bad += nonfinite(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad += nonfinite(v, f"{prefix}[{i}]")
    return bad


def metrics(run: Path, kind: str | None = "train") -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and (kind is None or rec.get("type") == kind):
            out.append(rec)
    return out


def strip_usage(lines: list[str]) -> list[str]:
    """stderr lines without an argparse ``usage:`` block (its first line and indented continuations)."""
    out, in_usage = [], False
    for ln in lines:
        if ln.startswith("usage:"):
            in_usage = True
            continue
        if in_usage and ln.startswith(" "):
            continue
        in_usage = False
        out.append(ln)
    return out


_HINT = re.compile(r"\b(use|set|pass|choose|remove|lower|raise|point|give|omit|create|re-create|fix|check|add|"
                   r"start|resume|wait|delete|rename|replace|must|should|expected|allowed|try|move|extract|"
                   r"did you mean|available|valid|one of|at least|at most|instead|needs?|expects?)\b", re.I)
_CLAIM = re.compile(r"^(?:done:.*?checkpoint|wrote(?: \d+ tensors to)?)\s+(\S+?\.(?:pth|json))\b", re.M)


# =============================================================================== cases


class Skip(Exception):
    pass


@dataclass
class Case:
    name: str
    what: str
    fn: Callable
    serial: bool = False


CASES: list[Case] = []


def case(name: str, what: str, serial: bool = False):
    def deco(fn):
        CASES.append(Case(name, what, fn, serial))
        return fn
    return deco


class Ctx:
    """One case: its folder (the cwd of its commands), its findings and its main result."""

    def __init__(self, probe: "Probe", case_: Case):
        self.probe = probe
        self.case = case_
        self.dir = probe.work / case_.name
        self.dir.mkdir(parents=True)
        self.harms: list[str] = []
        self.unclears: list[str] = []
        self.notes: list[str] = []  # shown with an ok verdict; they do not change it
        self.primary: Result | None = None
        self.exit_text: str | None = None
        self.results: list[Result] = []
        self.mounts: list[Path] = []
        self.procs: list[Proc] = []

    # ---------------------------------------------------------------- files

    def p(self, rel: str) -> Path:
        return self.dir / rel

    def write(self, rel: str, data: str | bytes) -> Path:
        path = self.p(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
        return path

    def copy_run(self, which: str = "base", rel: str = "run") -> Path:
        dst = self.p(rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.probe.fixture(which), dst, symlinks=True)
        return dst

    def mount_tmpfs(self, rel: str, size: str, ro: bool = False) -> Path:
        path = self.p(rel)
        path.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            raise Skip(f"cannot mount a tmpfs here ({(r.stderr or r.stdout).strip()[:120]})")
        self.mounts.append(path)
        return path

    # ---------------------------------------------------------------- commands

    def start(self, *args: str, cwd: Path | None = None) -> Proc:
        proc = Proc(list(args), cwd or self.dir, self.probe.work / ".logs" / self.case.name)
        self.procs.append(proc)
        return proc

    def mob(self, *args: str, timeout: float = 240, cwd: Path | None = None, snap: bool = True) -> Result:
        before = snapshot(self.dir) if snap else {}
        r = self.start(*args, cwd=cwd).wait(timeout)
        if snap:
            after = snapshot(self.dir)
            r.new = sorted(set(after) - set(before))
            r.deleted = sorted(set(before) - set(after))
            r.changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
        self.track(r, cwd or self.dir)
        return r

    def track(self, r: Result, cwd: Path) -> None:
        """Generic checks for every command: a hang; exit 0 while naming a written file that does not exist."""
        self.results.append(r)
        if r.timed_out:
            self.unclears.append(f"`{' '.join(r.argv[:2])}` hung (killed after {r.wall:.0f} s)")
        if r.rc == 0:
            for m in _CLAIM.finditer(r.out + "\n" + r.err):
                path = Path(m.group(1))
                path = path if path.is_absolute() else cwd / path
                if not path.exists():
                    self.harms.append(f"exit 0 but the message names {m.group(1)}, which does not exist")
                elif path.suffix == ".pth":
                    self.ckpt_ok(path, "the file it reports writing")

    # ---------------------------------------------------------------- verdicts

    def harm(self, msg: str) -> None:
        self.harms.append(msg)

    def check(self, cond, msg: str) -> bool:
        if not cond:
            self.harms.append(msg)
        return bool(cond)

    def unclear(self, msg: str) -> None:
        self.unclears.append(msg)

    def _nowrite(self, r: Result, allow=()) -> None:
        allow = tuple(allow) + ALWAYS_MAY_CHANGE
        new = [x for x in r.new if not _matches(x, allow)]
        changed = [x for x in r.changed if not _matches(x, allow)]
        deleted = [x for x in r.deleted if not _matches(x, allow)]
        if new:
            self.harm(f"refused but created {', '.join(new[:4])}{' ...' if len(new) > 4 else ''}")
        if changed:
            self.harm(f"refused but changed {', '.join(changed[:4])}")
        if deleted:
            self.harm(f"refused but deleted {', '.join(deleted[:4])}")

    def _keep_user_files(self, r: Result, allow=()) -> None:
        allow = tuple(allow) + ALWAYS_MAY_CHANGE
        changed = [x for x in r.changed if not _matches(x, allow)]
        deleted = [x for x in r.deleted if not _matches(x, allow)]
        if changed:
            self.harm(f"changed the user's {', '.join(changed[:4])}")
        if deleted:
            self.harm(f"deleted the user's {', '.join(deleted[:4])}")

    def error_line(self, r: Result, cmd: str) -> str | None:
        prefix = f"mobyssl {cmd}: error:" if cmd else "mobyssl: error:"
        found = [ln for ln in r.lines("err") if ln.startswith(prefix)]
        return found[-1] if found else None

    def refused(self, r: Result, cmd: str, names=(), nowrite: bool = True, allow=(), quiet: bool = True,
                primary: bool = True, before_work: bool = False) -> bool:
        """Expect a refusal: exit 2, one ``mobyssl CMD: error:`` line naming every entry of ``names``
        (a tuple entry: any of its strings), no traceback. ``quiet``: nothing else on stderr (an argparse usage
        block aside). ``nowrite``: nothing created/changed/deleted in the case folder. ``before_work``: no
        training step or evaluation was started."""
        if primary:
            self.primary = r
        if r.rc == 0:  # accepted: not a refusal; whether that did harm is for the case's own checks
            self.unclear("accepted (exit 0) where a refusal was expected")
            return False
        ok = True
        if "Traceback" in r.text:
            self.unclear("traceback")
            ok = False
        if r.rc != 2:
            self.unclear(f"exit {r.rc}, not 2")
            ok = False
        prefix = f"mobyssl {cmd}: error:" if cmd else "mobyssl: error:"
        errs = [ln for ln in r.lines("err") if ln.startswith(prefix)]
        if len(errs) != 1:
            other = [ln for ln in r.lines("err") if re.match(r"mobyssl( \S+)?: error:", ln)]
            if other and not errs:
                self.unclear(f"the error line starts '{other[0].split(':')[0]}:', not 'mobyssl {cmd}:'")
            elif r.rc != 0 or errs:
                self.unclear(f"{len(errs)} '{prefix}' lines")
            ok = False
        else:
            line = errs[0]
            missing = [n if isinstance(n, str) else " or ".join(n) for n in names
                       if not (line.count(n) if isinstance(n, str) else any(x in line for x in n))]
            if missing:
                self.unclear(f"message does not name {', '.join(missing)}")
                ok = False
            elif not _HINT.search(line):
                self.notes.append("the message gives no hint of what to do")
            if quiet:
                others = [ln for ln in strip_usage(r.lines("err")) if ln != line]
                if others:
                    self.unclear(f"{len(others)} more stderr line(s): {others[0][:60]!r}")
                    ok = False
        if before_work and (re.search(r"^\[step \d", r.out, re.M) or "evaluating" in r.out):
            self.unclear("refused only after work had started")
            ok = False
        if nowrite:
            self._nowrite(r, allow)
        return ok

    def succeeded(self, r: Result, allow=(), primary: bool = True) -> bool:
        """Expect success: exit 0, no traceback, the user's files unchanged (except ``allow``)."""
        if primary:
            self.primary = r
        ok = r.rc == 0 and "Traceback" not in r.text
        if r.rc != 0:
            line = self.error_line(r, r.argv[1] if len(r.argv) > 1 else "") or (r.lines("err") or ["?"])[-1]
            self.unclear(f"legitimate input failed (exit {r.rc}): {line[:100]}")
        elif "Traceback" in r.text:
            self.unclear("traceback printed although it succeeded")
        self._keep_user_files(r, allow)
        return ok

    def either(self, r: Result, cmd: str, names=(), allow=(), quiet: bool = True) -> str:
        """Either a clean refusal naming ``names`` or a success; returns 'refused', 'succeeded' or 'bad'."""
        if r.rc == 0:
            return "succeeded" if self.succeeded(r, allow) else "bad"
        return "refused" if self.refused(r, cmd, names, quiet=quiet) else "bad"

    def ckpt_ok(self, path: Path, what: str = "checkpoint", step: int | None = None) -> dict | None:
        """Harm unless ``path`` loads and has only finite tensors (and is at ``step``)."""
        try:
            state = load_ckpt(path)
        except Exception as e:  # noqa: BLE001 - any failure to load is the harm
            self.harm(f"{what} {Path(path).name} does not load ({type(e).__name__}: {str(e)[:80]})")
            return None
        bad = nonfinite(state)
        if bad:
            self.harm(f"{what} {Path(path).name} has non-finite tensors ({bad[0]})")
        if step is not None and isinstance(state, dict) and state.get("global_step") != step:
            self.harm(f"{what} {Path(path).name} is at step {state.get('global_step')}, expected {step}")
        return state

    def resumes(self, run: Path, to_step: int, what: str = "the run") -> bool:
        """Harm unless ``pretrain --resume`` of ``run`` trains to ``to_step`` and leaves a finite checkpoint."""
        r = self.mob("pretrain", f"output_dir={run}", "--resume", f"train.max_steps={to_step}", snap=False)
        if r.rc != 0:
            line = self.error_line(r, "pretrain") or (r.lines("err") or ["?"])[-1]
            self.harm(f"{what} no longer resumes (exit {r.rc}: {line[:90]})")
            return False
        steps = [m["step"] for m in metrics(run)]
        self.check(to_step in steps, f"resumed {what} did not reach step {to_step} (metrics steps {steps[-3:]})")
        self.ckpt_ok(run / "checkpoint.pth", "resumed checkpoint", step=to_step)
        return True

    def cleanup(self) -> None:
        for proc in self.procs:
            proc.kill()
        for m in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(m)], capture_output=True)


# =============================================================================== data helpers


def rgb_array(i: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(i)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.kron(small, np.ones((size // 4, size // 4, 1), dtype=np.uint8))


def jpeg_bytes(i: int, size: int = 32, mode: str = "RGB") -> bytes:
    img = Image.fromarray(rgb_array(i, size))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def image_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def make_folder(root: Path, n: int, start: int = 0, classes: list[str] | None = None, ext: str = ".jpg") -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        sub = root / classes[i % len(classes)] if classes else root
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img_{i:04d}{ext}"
        path.write_bytes(jpeg_bytes(i))
        paths.append(path)
    return paths


def corrupt_bytes(i: int) -> bytes:
    kind = i % 3
    if kind == 0:
        return jpeg_bytes(i)[:60]  # truncated
    if kind == 1:
        return b""  # empty
    return bytes(random.Random(i).getrandbits(8) for _ in range(300))  # noise


def png_bomb(path: Path, side: int = 20000) -> None:
    """A valid one-colour 8-bit grayscale PNG of side x side pixels (a few hundred KB on disk)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    parts = [comp.compress(row * 1000) for _ in range(side // 1000)] + [comp.flush()]
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def bundled_zip(name: str) -> Path:
    return REPO / "mobyssl" / "data" / "bundled" / f"cifar10-sample-{name}.zip"


def wait_for(cond: Callable[[], bool], timeout: float, proc: Proc | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc is not None and proc.p.poll() is not None:
            return cond()
        time.sleep(0.1)
    return False


def max_step(run: Path) -> int:
    steps = [m.get("step", 0) for m in metrics(run)]
    return max(steps) if steps else 0


# =============================================================================== 1. config values


def pretrain_refusal(name: str, override: str | list[str], names, what: str | None = None, extra=()):
    overrides = [override] if isinstance(override, str) else list(override)

    @case(f"cfg.{name}", what or f"pretrain {' '.join(overrides)}")
    def _(c: Ctx):
        r = c.mob("pretrain", *FAST, *extra, "output_dir=out", *overrides)
        c.refused(r, "pretrain", names, before_work=True)


for _name, _ov, _names in [
    ("lr_inf", "train.lr=inf", ["train.lr"]),
    ("weight_decay_inf", "train.weight_decay=inf", ["train.weight_decay"]),
    ("lr_nan", "train.lr=nan", ["train.lr"]),
    ("min_lr_negative", "train.min_lr=-0.5", ["train.min_lr"]),
    ("warmup_lr_negative", "train.warmup_lr=-1", ["train.warmup_lr"]),
    ("proj_dim_0", "method.proj_dim=0", ["method.proj_dim"]),
    ("queue_not_multiple_of_batch", "method.queue_size=100", ["method.queue_size"]),
    ("batch_size_0", "train.batch_size=0", ["train.batch_size"]),
    ("batch_size_float", "train.batch_size=32.5", ["train.batch_size"]),
    ("epochs_0", "train.epochs=0", ["train.epochs"]),
    ("epochs_1e30", "train.epochs=1e30", ["train.epochs"]),
    ("epochs_word", "train.epochs=ten", ["train.epochs"]),
    ("betas_one_value", "train.betas=[0.9]", ["train.betas"]),
    ("betas_above_1", "train.betas=[0.9,1.5]", ["train.betas"]),
    ("warmup_longer_than_epochs", "train.warmup_epochs=5", ["train.warmup_epochs"]),
    ("seed_negative", "train.seed=-1", ["train.seed"]),
    ("seed_1e20", "train.seed=1e20", ["train.seed"]),
    ("device_cuda7", "train.device=cuda:7", ["train.device"]),
    ("device_gpu", "train.device=gpu", ["train.device"]),
    ("image_size_4", "data.image_size=4", ["data.image_size"]),
    ("image_size_33_patch4", "data.image_size=33", ["data.image_size"]),
    ("num_workers_negative", "data.num_workers=-1", ["data.num_workers"]),
    ("crop_scale_reversed", "data.aug.crop_scale=[0.5,0.1]", ["data.aug.crop_scale"]),
    ("drop_path_1_5", "model.drop_path_rate=1.5", ["model.drop_path_rate"]),
    ("backbone_nonexistent", "model.backbone=nonexistent", [("model.backbone", "nonexistent")]),
    ("kwargs_depth_negative", "model.kwargs={depth: -1}", ["model.kwargs"]),
    ("kwargs_scalar", "model.kwargs=3", ["model.kwargs"]),
    ("unknown_key_suggests", "train.epoch=3", ["train.epoch", "train.epochs"]),
    ("unknown_method_key_suggests", "method.queu_size=128", ["method.queu_size", "method.queue_size"]),
    ("method_name_typo", "method.name=mobi", ["method.name", "moby"]),
    ("value_used_as_section", "train.epochs.x=3", ["train.epochs"]),
    ("output_dir_empty", "output_dir=", ["output_dir"]),
    ("data_train_empty", "data.train=", ["data.train"]),
    ("override_without_equals", "train.lr", ["train.lr"]),
    ("max_bad_fraction_2", "data.max_bad_fraction=2", ["data.max_bad_fraction"]),
    ("normalization_typo", "data.normalization=imagenett", ["data.normalization"]),
    ("pipeline_typo", "data.pipeline=gpu", ["data.pipeline"]),
    ("keep_last_0", "train.keep_last=0", ["train.keep_last"]),
    ("accum_not_dividing_batch", "train.accum_steps=5", [("train.accum_steps", "train.batch_size")]),
    ("clip_grad_negative", "train.clip_grad=-1", ["train.clip_grad"]),
]:
    pretrain_refusal(_name, _ov, _names)

pretrain_refusal("data_test_none_string", ["data.test=none", "train.knn_every=0"], ["data.test"],
                 "pretrain data.test=none (the string, not null) with k-NN at the end")


@case("cfg.amp_fp16_on_cpu", "pretrain train.amp=fp16 train.device=cpu (refuse naming train.amp, or train finitely)")
def _(c: Ctx):
    r = c.mob("pretrain", *FAST, "output_dir=out", "train.amp=fp16", "train.device=cpu")
    if c.either(r, "pretrain", ["train.amp"]) == "succeeded":
        c.ckpt_ok(c.p("out/checkpoint.pth"), step=2)


def eval_refusal(name: str, cmd: str, override: str, names):
    @case(f"cfg.{name}", f"{cmd} --random-init {override}")
    def _(c: Ctx):
        r = c.mob(cmd, "--random-init", *TINY, override, "--output", "res.json")
        c.refused(r, cmd, names, before_work=True)


eval_refusal("knn_batch_size_0", "knn", "knn.batch_size=0", ["knn.batch_size"])
eval_refusal("knn_k_0", "knn", "knn.k=[0]", ["knn.k"])
eval_refusal("knn_k_empty", "knn", "knn.k=[]", ["knn.k"])
eval_refusal("linear_lr_ref_batch_0", "linear", "linear.lr_ref_batch=0", ["linear.lr_ref_batch"])


@case("cfg.print_config_bad_value", "pretrain --config quickstart --print-config train.lr=abc")
def _(c: Ctx):
    c.refused(c.mob("pretrain", "--config", "quickstart", "--print-config", "train.lr=abc"), "pretrain", ["train.lr"])


@case("cfg.config_missing_file", "pretrain --config missing.yaml")
def _(c: Ctx):
    c.refused(c.mob("pretrain", "--config", "missing.yaml", *FAST, "output_dir=out"), "pretrain", ["missing.yaml"])


@case("cfg.config_is_folder", "pretrain --config recipes/ (a folder)")
def _(c: Ctx):
    c.p("recipes").mkdir()
    c.refused(c.mob("pretrain", "--config", "recipes", *FAST, "output_dir=out"), "pretrain", ["recipes"])


@case("cfg.recipe_name_typo", "pretrain --config quickstrat (suggests quickstart)")
def _(c: Ctx):
    c.refused(c.mob("pretrain", "--config", "quickstrat", *FAST, "output_dir=out"), "pretrain",
              ["quickstrat", "quickstart"])


@case("cfg.recipe_invalid_yaml", "pretrain --config bad.yaml holding 'train: {lr: [1, 2'")
def _(c: Ctx):
    c.write("bad.yaml", "base: quickstart\ntrain: {lr: [1, 2\n")
    c.refused(c.mob("pretrain", "--config", "bad.yaml", *FAST, "output_dir=out"), "pretrain", ["bad.yaml"])


@case("cfg.recipe_base_itself", "pretrain --config loop.yaml whose base: is loop.yaml")
def _(c: Ctx):
    c.write("loop.yaml", "base: loop.yaml\ntrain: {epochs: 3}\n")
    c.refused(c.mob("pretrain", "--config", "loop.yaml", *FAST, "output_dir=out"), "pretrain", ["loop.yaml"])


@case("cfg.recipe_is_list", "pretrain --config list.yaml holding a YAML list")
def _(c: Ctx):
    c.write("list.yaml", "- train.lr=1e-3\n- train.epochs=3\n")
    c.refused(c.mob("pretrain", "--config", "list.yaml", *FAST, "output_dir=out"), "pretrain", ["list.yaml"])


@case("cfg.recipe_binary_garbage", "pretrain --config garbage.yaml (random bytes)")
def _(c: Ctx):
    c.write("garbage.yaml", bytes(random.Random(1).getrandbits(8) for _ in range(2000)))
    c.refused(c.mob("pretrain", "--config", "garbage.yaml", *FAST, "output_dir=out"), "pretrain", ["garbage.yaml"])


@case("cfg.recipe_unknown_key", "pretrain --config mine.yaml with 'train: {epoch: 3}'")
def _(c: Ctx):
    c.write("mine.yaml", "base: quickstart\ntrain:\n  epoch: 3\n")
    c.refused(c.mob("pretrain", "--config", "mine.yaml", *FAST, "output_dir=out"), "pretrain", ["train.epoch"])


@case("cfg.print_config_roundtrip", "pretrain --print-config > my.yaml; --config my.yaml --print-config: same output")
def _(c: Ctx):
    r1 = c.mob("pretrain", "--print-config", *TINY, "train.lr=2e-3")
    if c.succeeded(r1):
        c.write("my.yaml", r1.out)
        r2 = c.mob("pretrain", "--config", "my.yaml", "--print-config")
        if c.succeeded(r2) and r2.out != r1.out:
            c.harm("a printed config loaded back gives another config")


@case("cfg.dry_run_writes_nothing", "pretrain --dry-run (legitimate): checks, writes nothing")
def _(c: Ctx):
    r = c.mob("pretrain", *FAST, "output_dir=out", "--dry-run")
    c.succeeded(r)
    c.check(not c.p("out").exists(), "--dry-run created output_dir")


# =============================================================================== 2. run directories


@case("dir.dot_holding_user_config", "pretrain output_dir=. in a folder holding the user's config.yaml")
def _(c: Ctx):
    c.write("config.yaml", "my: precious config\n")
    c.refused(c.mob("pretrain", *FAST, "output_dir=."), "pretrain", [("output_dir", "config.yaml")])


@case("dir.output_is_file", "pretrain output_dir=notes.txt (an existing file)")
def _(c: Ctx):
    c.write("notes.txt", "my notes\n")
    c.refused(c.mob("pretrain", *FAST, "output_dir=notes.txt"), "pretrain", ["notes.txt"])


@case("dir.output_nonempty", "pretrain output_dir=mystuff (a folder of the user's files)")
def _(c: Ctx):
    c.write("mystuff/thesis.tex", "\\documentclass{article}\n")
    c.write("mystuff/metrics.jsonl", "{\"mine\": 1}\n")
    c.refused(c.mob("pretrain", *FAST, "output_dir=mystuff"), "pretrain", ["mystuff"])


@case("dir.read_only", "pretrain output_dir=ro/run on a read-only mount")
def _(c: Ctx):
    c.mount_tmpfs("ro", "1m", ro=True)
    c.refused(c.mob("pretrain", *FAST, "output_dir=ro/run"), "pretrain", ["ro/run"], before_work=True)


@case("dir.read_only_empty_folder", "pretrain output_dir=ro (an empty read-only mount point)")
def _(c: Ctx):
    c.mount_tmpfs("ro", "1m", ro=True)
    c.refused(c.mob("pretrain", *FAST, "output_dir=ro"), "pretrain", ["ro"], before_work=True)


@case("dir.parent_is_file", "pretrain output_dir=notes.txt/run (a parent is a file)")
def _(c: Ctx):
    c.write("notes.txt", "my notes\n")
    c.refused(c.mob("pretrain", *FAST, "output_dir=notes.txt/run"), "pretrain", ["notes.txt"])


@case("dir.finished_run_fresh_start", "pretrain into a folder holding a finished run (no --resume)")
def _(c: Ctx):
    c.copy_run("finished")
    c.refused(c.mob("pretrain", *FAST, "output_dir=run"), "pretrain", ["run", "--resume"])


@case("dir.symlinked_output_dir", "pretrain output_dir=link -> real/ (legitimate)")
def _(c: Ctx):
    c.p("real").mkdir()
    os.symlink("real", c.p("link"))
    r = c.mob("pretrain", *FAST, "output_dir=link")
    if c.succeeded(r):
        c.check(c.p("link").is_symlink(), "the output_dir symlink was replaced")
        c.ckpt_ok(c.p("real/checkpoint.pth"), step=2)


@case("dir.unicode_and_spaces", "pretrain with data.train and output_dir holding spaces and unicode (legitimate)")
def _(c: Ctx):
    make_folder(c.p("my données/été 2024"), 64)
    r = c.mob("pretrain", *FAST, "data.test=null", "data.train=my données/été 2024", "output_dir=runs/essai n°1")
    if c.succeeded(r):
        c.ckpt_ok(c.p("runs/essai n°1/checkpoint.pth"), step=2)


@case("dir.empty_existing_folder", "pretrain output_dir=empty/ (an existing empty folder: legitimate)")
def _(c: Ctx):
    c.p("empty").mkdir()
    if c.succeeded(c.mob("pretrain", *FAST, "output_dir=empty")):
        c.ckpt_ok(c.p("empty/checkpoint.pth"), step=2)


# =============================================================================== 3. resume


@case("resume.changed_lr", "pretrain --resume train.lr=2e-3 (run made with the default lr)")
def _(c: Ctx):
    c.copy_run()
    c.refused(c.mob("pretrain", "output_dir=run", "--resume", "train.lr=2e-3"), "pretrain", ["train.lr"])


@case("resume.accept_more_epochs", "pretrain --resume --accept-changes train.epochs=3 train.max_steps=3")
def _(c: Ctx):
    run = c.copy_run()
    r = c.mob("pretrain", "output_dir=run", "--resume", "--accept-changes", "train.epochs=3", "train.max_steps=3")
    if c.succeeded(r, allow=["run/*"]):
        c.check(3 in [m["step"] for m in metrics(run)], "did not continue to step 3")
        state = c.ckpt_ok(run / "checkpoint.pth", step=3)
        if state is not None:
            c.check(state.get("config", {}).get("train", {}).get("epochs") == 3,
                    "the new checkpoint stores the old train.epochs: a later --resume would silently go back")
        c.check(metrics(run)[0]["step"] == 1, "metrics.jsonl lost the first records")


@case("resume.architecture_change", "pretrain --resume --accept-changes model.kwargs={depth: 3}")
def _(c: Ctx):
    c.copy_run()
    r = c.mob("pretrain", "output_dir=run", "--resume", "--accept-changes", "model.kwargs={depth: 3}")
    c.refused(r, "pretrain", ["model.kwargs"])
    c.check("blocks.2" not in r.err, "the message lists tensor names instead of config keys")


@case("resume.finished_run", "pretrain --resume of a finished run (nothing to train, exit 0, no 'done')")
def _(c: Ctx):
    run = c.copy_run("finished")
    before = {p.name: sha1(p) for p in run.glob("checkpoint*.pth")}
    r = c.mob("pretrain", "output_dir=run", "--resume")
    if c.succeeded(r, allow=["run/metrics.jsonl", "run/tensorboard*"]):
        c.check("nothing to train" in r.text, "does not say that there is nothing to train")
        c.check(not re.search(r"^done:", r.out, re.M), "claims 'done' although nothing was trained")
        after = {p.name: sha1(p) for p in run.glob("checkpoint*.pth")}
        c.check(after == before, "checkpoints were added or rewritten although nothing was trained")


@case("resume.empty_folder", "pretrain output_dir=empty --resume (no checkpoint there)")
def _(c: Ctx):
    c.p("empty").mkdir()
    c.refused(c.mob("pretrain", "output_dir=empty", "--resume"), "pretrain", ["empty"])


@case("resume.missing_folder", "pretrain output_dir=nothere --resume")
def _(c: Ctx):
    c.refused(c.mob("pretrain", "output_dir=nothere", "--resume"), "pretrain", ["nothere"])


@case("resume.safe_change", "pretrain --resume knn.k=[10] train.log_every=2 train.max_steps=3 (safe keys)")
def _(c: Ctx):
    run = c.copy_run()
    r = c.mob("pretrain", "output_dir=run", "--resume", "knn.k=[10]", "train.log_every=2", "train.max_steps=3")
    if c.succeeded(r, allow=["run/*"]):
        c.ckpt_ok(run / "checkpoint.pth", step=3)


@case("resume.max_steps_below_current", "pretrain --resume train.max_steps=1 of a run at step 2")
def _(c: Ctx):
    run = c.copy_run()
    before = {p.name: sha1(p) for p in run.glob("checkpoint*.pth")}
    r = c.mob("pretrain", "output_dir=run", "--resume", "train.max_steps=1")
    if r.rc == 0:
        c.succeeded(r, allow=["run/metrics.jsonl", "run/tensorboard*", "run/config.yaml"])
        c.check("nothing to train" in r.text, "does not say that there is nothing to train")
        c.check(not re.search(r"^done:", r.out, re.M), "claims 'done' although nothing was trained")
    else:
        c.refused(r, "pretrain", ["train.max_steps"])
    after = {p.name: sha1(p) for p in run.glob("checkpoint*.pth")}
    c.check(after == before, "checkpoints changed although the run was already past train.max_steps")


@case("resume.truncated_newest", "pretrain --resume when the newest checkpoint is cut in half (falls back)")
def _(c: Ctx):
    run = c.copy_run("three")
    newest = run / STEP3
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    r = c.mob("pretrain", "output_dir=run", "--resume", "train.max_steps=4")
    if c.succeeded(r, allow=["run/*"]):
        c.check(STEP3 in r.text, "the truncated checkpoint is not named")
        c.check(re.search(r"resumed from \S*" + STEP2, r.text), "did not resume from the previous checkpoint")
        c.ckpt_ok(run / "checkpoint.pth", step=4)


@case("resume.dangling_latest_link", "pretrain --resume after the user deleted the newest step file")
def _(c: Ctx):
    run = c.copy_run("three")
    (run / STEP3).unlink()
    r = c.mob("pretrain", "output_dir=run", "--resume", "train.max_steps=4")
    if c.succeeded(r, allow=["run/*"]):
        c.ckpt_ok(run / "checkpoint.pth", step=4)


@case("resume.garbage_file", "pretrain output_dir=run --resume garbage.pth (random bytes)")
def _(c: Ctx):
    c.copy_run()
    c.write("garbage.pth", os.urandom(5000))
    c.refused(c.mob("pretrain", "output_dir=run", "--resume", "garbage.pth"), "pretrain", ["garbage.pth"])


@case("resume.missing_file", "pretrain output_dir=run --resume nothere.pth")
def _(c: Ctx):
    c.copy_run()
    c.refused(c.mob("pretrain", "output_dir=run", "--resume", "nothere.pth"), "pretrain", ["nothere.pth"])


@case("resume.exported_backbone", "pretrain output_dir=run --resume backbone.pth (an exported backbone)")
def _(c: Ctx):
    c.copy_run()
    shutil.copy(c.probe.fixture("export"), c.p("backbone.pth"))
    c.refused(c.mob("pretrain", "output_dir=run", "--resume", "backbone.pth"), "pretrain", ["backbone.pth"])


@case("resume.without_config", "pretrain output_dir=run --resume train.max_steps=3 (uses the checkpoint's config)")
def _(c: Ctx):
    run = c.copy_run()
    cfg_before = (run / "config.yaml").read_text()
    r = c.mob("pretrain", "output_dir=run", "--resume", "train.max_steps=3")
    if c.succeeded(r, allow=["run/*"]):
        state = c.ckpt_ok(run / "checkpoint.pth", step=3)
        if state is not None:
            model = state.get("config", {}).get("model", {})
            c.check(model.get("kwargs") == {"depth": 2} and model.get("backbone") == "vit_nano_patch4_32",
                    f"resumed with another model config: {model}")
        c.check("depth: 2" in (run / "config.yaml").read_text() or cfg_before == (run / "config.yaml").read_text(),
                "config.yaml lost the run's model settings")


@case("resume.same_recipe_again", "pretrain --config quickstart <same overrides> --resume train.max_steps=3")
def _(c: Ctx):
    run = c.copy_run()
    r = c.mob("pretrain", "--config", "quickstart", *TINY, "train.knn_every=-1", "train.max_steps=3",
              "output_dir=run", "--resume")
    if c.succeeded(r, allow=["run/*"]):
        c.ckpt_ok(run / "checkpoint.pth", step=3)


@case("resume.override_after_flag", "pretrain --resume train.epochs=3 (default output_dir runs/quickstart)")
def _(c: Ctx):
    c.copy_run(rel="runs/quickstart")
    c.refused(c.mob("pretrain", "--resume", "train.epochs=3"), "pretrain", ["train.epochs", "--accept-changes"])


@case("resume.accept_changes_alone", "pretrain --accept-changes without --resume")
def _(c: Ctx):
    c.refused(c.mob("pretrain", *FAST, "output_dir=out", "--accept-changes"), "pretrain", ["--accept-changes"])


@case("resume.nan_checkpoint", "pretrain output_dir=new --resume nan.pth train.max_steps=3 (weights all NaN)")
def _(c: Ctx):
    nan_checkpoint(c, c.p("nan.pth"))
    r = c.mob("pretrain", "output_dir=new", "--resume", "nan.pth", "train.max_steps=3")
    c.refused(r, "pretrain", ["nan.pth"], quiet=False)
    if r.rc == 0:
        c.harm("continued training from NaN weights and exited 0")
    elif re.search(r"disk space|no space", c.error_line(r, "pretrain") or "", re.I):
        c.unclear("the error blames disk space, but the disk is not full")


def nan_checkpoint(c: Ctx, dst: Path) -> None:
    import torch

    state = load_ckpt(c.probe.fixture("base") / STEP2)
    for k, v in state["method"].items():
        if k.startswith("encoder.") and v.is_floating_point():
            v.fill_(float("nan"))
    torch.save(state, dst)


# =============================================================================== 4. exports


@case("export.over_latest_link", "export --output run/checkpoint.pth (then the run must still resume)")
def _(c: Ctx):
    run = c.copy_run()
    r = c.mob("export", "--checkpoint", "run/checkpoint.pth", "--output", "run/checkpoint.pth", "--overwrite")
    c.refused(r, "export", ["run/checkpoint.pth"])
    c.resumes(run, 3)


@case("export.over_step_file", "export --output run/checkpoint_step00000002.pth")
def _(c: Ctx):
    run = c.copy_run()
    c.refused(c.mob("export", "--checkpoint", "run/checkpoint.pth", "--output", f"run/{STEP2}"), "export", [STEP2])
    c.resumes(run, 3)


@case("export.over_other_runs_checkpoint", "export --output other/checkpoint_step00000002.pth --overwrite")
def _(c: Ctx):
    c.copy_run()
    c.copy_run(rel="other")
    r = c.mob("export", "--checkpoint", "run/checkpoint.pth", "--output", f"other/{STEP2}", "--overwrite")
    c.refused(r, "export", [STEP2])


@case("export.existing_file_no_overwrite", "export --output notes.txt (the user's file, no --overwrite)")
def _(c: Ctx):
    c.copy_run()
    c.write("notes.txt", "my notes\n")
    c.refused(c.mob("export", "--checkpoint", "run/checkpoint.pth", "--output", "notes.txt"), "export",
              ["notes.txt", "--overwrite"])


@case("export.existing_file_overwrite", "export --output old.pth --overwrite (legitimate: replaced)")
def _(c: Ctx):
    c.copy_run()
    c.write("old.pth", "old export\n")
    r = c.mob("export", "--checkpoint", "run/checkpoint.pth", "--output", "old.pth", "--overwrite")
    if c.succeeded(r, allow=["old.pth"]):
        check_export(c, c.p("old.pth"))


def check_export(c: Ctx, path: Path) -> None:
    """Harm unless ``path`` is a finite state dict that the backbone loads strictly (timm key layout)."""
    try:
        sd = load_ckpt(path)
    except Exception as e:  # noqa: BLE001
        c.harm(f"the export does not load ({type(e).__name__})")
        return
    if not isinstance(sd, dict) or not sd:
        c.harm("the export is not a state dict")
        return
    bad = nonfinite(sd)
    c.check(not bad, f"the export has non-finite tensors ({bad[:1]})")
    try:
        from mobyssl.models import create_backbone

        create_backbone("vit_nano_patch4_32", img_size=32, depth=2).load_state_dict(sd)
    except Exception as e:  # noqa: BLE001
        c.harm(f"the export does not load into the backbone: {str(e).splitlines()[0][:100]}")


@case("export.ok", "export --output backbone.pth (legitimate)")
def _(c: Ctx):
    c.copy_run()
    if c.succeeded(c.mob("export", "--checkpoint", "run/checkpoint.pth", "--output", "backbone.pth")):
        check_export(c, c.p("backbone.pth"))


@case("export.output_is_folder", "export --output exports/ (an existing folder)")
def _(c: Ctx):
    c.copy_run()
    c.p("exports").mkdir()
    r = c.mob("export", "--checkpoint", "run/checkpoint.pth", "--output", "exports")
    if c.either(r, "export", ["exports"]) == "succeeded":
        files = list(c.p("exports").iterdir())
        if c.check(len(files) == 1, "exit 0 but nothing was written into the folder"):
            check_export(c, files[0])


@case("export.output_missing_folder", "export --output nodir/backbone.pth")
def _(c: Ctx):
    c.copy_run()
    r = c.mob("export", "--checkpoint", "run/checkpoint.pth", "--output", "nodir/backbone.pth")
    if c.either(r, "export", ["nodir"]) == "succeeded":
        check_export(c, c.p("nodir/backbone.pth"))


@case("export.checkpoint_garbage", "export --checkpoint garbage.pth (random bytes)")
def _(c: Ctx):
    c.write("garbage.pth", os.urandom(5000))
    c.refused(c.mob("export", "--checkpoint", "garbage.pth", "--output", "b.pth"), "export", ["garbage.pth"])


@case("export.checkpoint_truncated", "export --checkpoint half.pth (a checkpoint cut in half)")
def _(c: Ctx):
    data = (c.probe.fixture("base") / STEP2).read_bytes()
    c.write("half.pth", data[: len(data) // 2])
    c.refused(c.mob("export", "--checkpoint", "half.pth", "--output", "b.pth"), "export", ["half.pth"])


@case("export.checkpoint_is_folder", "export --checkpoint somefolder/")
def _(c: Ctx):
    c.p("somefolder").mkdir()
    c.refused(c.mob("export", "--checkpoint", "somefolder", "--output", "b.pth"), "export", ["somefolder"])


@case("export.checkpoint_missing", "export --checkpoint nothere.pth")
def _(c: Ctx):
    c.refused(c.mob("export", "--checkpoint", "nothere.pth", "--output", "b.pth"), "export", ["nothere.pth"])


@case("export.checkpoint_is_run_folder", "export --checkpoint run (the run folder)")
def _(c: Ctx):
    c.copy_run()
    r = c.mob("export", "--checkpoint", "run", "--output", "b.pth")
    if c.either(r, "export", ["run"]) == "succeeded":
        check_export(c, c.p("b.pth"))


@case("export.onto_itself", "export --checkpoint backbone.pth --output backbone.pth --overwrite")
def _(c: Ctx):
    shutil.copy(c.probe.fixture("export"), c.p("backbone.pth"))
    r = c.mob("export", "--checkpoint", "backbone.pth", "--output", "backbone.pth", "--overwrite")
    c.either(r, "export", ["backbone.pth"], allow=["backbone.pth"])
    check_export(c, c.p("backbone.pth"))


# =============================================================================== 5. evaluation


def knn_ok(c: Ctx, r: Result, out: Path | None = None, cmd: str = "knn") -> None:
    """A finished evaluation says which model it evaluated, and its --output JSON has a 'model' key."""
    c.check(re.search(r"^evaluating \S", r.out, re.M), "no 'evaluating ...' line naming the model")
    vals = re.findall(r"^\w*top1\w*: ([\d.]+)", r.out, re.M)
    c.check(vals, "no top-1 accuracy printed")
    c.check(all(0 <= float(v) <= 100 for v in vals), f"accuracies out of range: {vals}")
    if out is not None:
        try:
            data = json.loads(out.read_text())
        except (OSError, ValueError) as e:
            c.harm(f"--output {out.name} unreadable: {e}")
            return
        c.check(isinstance(data, dict) and data.get("model"), f"--output {out.name} has no 'model' key")


@case("eval.checkpoint_and_random_init", "knn --checkpoint run/checkpoint.pth --random-init")
def _(c: Ctx):
    c.copy_run()
    r = c.mob("knn", "--checkpoint", "run/checkpoint.pth", "--random-init")
    c.refused(r, "knn", [("--random-init", "--checkpoint")])


@case("eval.no_checkpoint", "knn (neither --checkpoint nor --random-init)")
def _(c: Ctx):
    c.refused(c.mob("knn", *TINY), "knn", ["--checkpoint"])


@case("eval.depth_mismatch", "knn --checkpoint depth-2 run model.kwargs={depth: 3}")
def _(c: Ctx):
    c.copy_run()
    r = c.mob("knn", "--checkpoint", "run/checkpoint.pth", "model.kwargs={depth: 3}")
    c.refused(r, "knn", ["model.kwargs"], before_work=True)
    c.check("blocks.2" not in r.err, "the message lists tensor names instead of config keys")


@case("eval.output_in_missing_folder", "knn --output nodir/res.json (must fail before evaluating)")
def _(c: Ctx):
    c.copy_run()
    r = c.mob("knn", "--checkpoint", "run/checkpoint.pth", "--output", "nodir/res.json")
    c.refused(r, "knn", ["nodir"], before_work=True)


@case("eval.output_is_folder", "knn --output results/ (an existing folder)")
def _(c: Ctx):
    c.copy_run()
    c.p("results").mkdir()
    r = c.mob("knn", "--checkpoint", "run/checkpoint.pth", "--output", "results")
    c.refused(r, "knn", ["results"], before_work=True)


@case("eval.output_over_user_text", "knn --output notes.txt (the user's text file)")
def _(c: Ctx):
    c.copy_run()
    c.write("notes.txt", "my notes\n")
    r = c.mob("knn", "--checkpoint", "run/checkpoint.pth", "--output", "notes.txt")
    c.refused(r, "knn", ["notes.txt"], before_work=True)


@case("eval.output_over_checkpoint", "knn --output run/checkpoint.pth")
def _(c: Ctx):
    run = c.copy_run()
    r = c.mob("knn", "--checkpoint", "run/checkpoint.pth", "--output", "run/checkpoint.pth")
    c.refused(r, "knn", ["checkpoint.pth"], before_work=True)
    c.ckpt_ok(run / "checkpoint.pth", step=2)


@case("eval.output_replaces_previous_results", "knn --output res.json twice (legitimate: replaced)")
def _(c: Ctx):
    c.copy_run()
    c.mob("knn", "--checkpoint", "run/checkpoint.pth", "--output", "res.json")
    r = c.mob("knn", "--checkpoint", "run/checkpoint.pth", "--output", "res.json", "knn.k=[10]")
    if c.succeeded(r, allow=["res.json"]):
        knn_ok(c, r, c.p("res.json"))
        c.check("k10" in c.p("res.json").read_text(), "res.json was not replaced by the second evaluation")


@case("eval.knn_ok_with_output", "knn --checkpoint run/checkpoint.pth --output res.json (legitimate)")
def _(c: Ctx):
    c.copy_run()
    r = c.mob("knn", "--checkpoint", "run/checkpoint.pth", "--output", "res.json")
    if c.succeeded(r):
        knn_ok(c, r, c.p("res.json"))
        c.check("run/checkpoint.pth" in r.out, "the 'evaluating' line does not name the checkpoint file")


@case("eval.random_init", "knn --random-init (legitimate baseline)")
def _(c: Ctx):
    r = c.mob("knn", "--random-init", *TINY, "--output", "res.json")
    if c.succeeded(r):
        knn_ok(c, r, c.p("res.json"))
        c.check("random" in r.out, "the report does not say the model is randomly initialised")


@case("eval.checkpoint_is_run_folder", "knn --checkpoint run (the run folder)")
def _(c: Ctx):
    c.copy_run()
    r = c.mob("knn", "--checkpoint", "run")
    if c.either(r, "knn", ["run"]) == "succeeded":
        knn_ok(c, r)
        c.check("checkpoint" in r.out, "the 'evaluating' line does not name which checkpoint was used")


@case("eval.exported_backbone_no_config", "knn --checkpoint backbone.pth (an export: no stored config)")
def _(c: Ctx):
    shutil.copy(c.probe.fixture("export"), c.p("backbone.pth"))
    c.refused(c.mob("knn", "--checkpoint", "backbone.pth"), "knn", ["backbone.pth", "--config"])


@case("eval.exported_backbone_with_config", "knn --checkpoint backbone.pth --config quickstart <tiny> (legitimate)")
def _(c: Ctx):
    shutil.copy(c.probe.fixture("export"), c.p("backbone.pth"))
    r = c.mob("knn", "--checkpoint", "backbone.pth", "--config", "quickstart", *TINY)
    if c.succeeded(r):
        knn_ok(c, r)


@case("eval.nan_checkpoint", "knn --checkpoint nan.pth (backbone weights all NaN)")
def _(c: Ctx):
    nan_checkpoint(c, c.p("nan.pth"))
    r = c.mob("knn", "--checkpoint", "nan.pth")
    c.refused(r, "knn", ["nan.pth"])
    if r.rc == 0:
        c.harm("exit 0 with an accuracy computed from NaN weights")


@case("eval.dangling_checkpoint_link", "knn --checkpoint run/checkpoint.pth whose target was deleted")
def _(c: Ctx):
    run = c.copy_run()
    (run / STEP2).unlink()
    c.refused(c.mob("knn", "--checkpoint", "run/checkpoint.pth"), "knn", [("checkpoint.pth", STEP2)],
              before_work=True)


@case("eval.unlabeled_test", "knn data.test=flat/ (a flat folder: no classes)")
def _(c: Ctx):
    c.copy_run()
    make_folder(c.p("flat"), 40)
    r = c.mob("knn", "--checkpoint", "run/checkpoint.pth", "data.test=flat")
    c.refused(r, "knn", ["data.test"], before_work=True)


@case("eval.test_null", "knn data.test=null")
def _(c: Ctx):
    c.copy_run()
    c.refused(c.mob("knn", "--checkpoint", "run/checkpoint.pth", "data.test=null"), "knn", ["data.test"],
              before_work=True)


@case("eval.class_mismatch", "knn with data.eval_train classes {cat,dog} and data.test classes {cat,bird}")
def _(c: Ctx):
    c.copy_run()
    make_folder(c.p("bank"), 40, classes=["cat", "dog"])
    make_folder(c.p("test"), 20, start=100, classes=["cat", "bird"])
    r = c.mob("knn", "--checkpoint", "run/checkpoint.pth", "data.eval_train=bank", "data.test=test")
    c.refused(r, "knn", [("data.test", "data.eval_train")], before_work=True)


@case("eval.test_truncated_zip", "knn data.test=half.zip (a zip cut in half)")
def _(c: Ctx):
    c.copy_run()
    data = bundled_zip("test").read_bytes()
    c.write("half.zip", data[: len(data) // 2])
    r = c.mob("knn", "--checkpoint", "run/checkpoint.pth", "data.test=half.zip")
    c.refused(r, "knn", ["half.zip", "data.test"], before_work=True)


@case("eval.k_larger_than_bank", "knn knn.k=[5000] with a 1,000-image bank")
def _(c: Ctx):
    c.copy_run()
    r = c.mob("knn", "--checkpoint", "run/checkpoint.pth", "knn.k=[5000]")
    if c.either(r, "knn", ["knn.k"]) == "succeeded":
        knn_ok(c, r)


@case("eval.linear_fast", "linear linear.mode=fast linear.epochs=2 --output lin.json (legitimate)")
def _(c: Ctx):
    c.copy_run()
    r = c.mob("linear", "--checkpoint", "run/checkpoint.pth", "linear.mode=fast", "linear.epochs=2",
              "--output", "lin.json")
    if c.succeeded(r):
        knn_ok(c, r, c.p("lin.json"), cmd="linear")


@case("eval.linear_epochs_0", "linear linear.epochs=0")
def _(c: Ctx):
    c.copy_run()
    r = c.mob("linear", "--checkpoint", "run/checkpoint.pth", "linear.mode=fast", "linear.epochs=0")
    c.refused(r, "linear", ["linear.epochs"], before_work=True)


# =============================================================================== 6. data


def data_refusal(name: str, what: str, setup: Callable[[Ctx], str], names, quiet: bool = True, extra=()):
    @case(f"data.{name}", what)
    def _(c: Ctx):
        spec = setup(c)
        r = c.mob("pretrain", *FAST, "data.test=null", f"data.train={spec}", "output_dir=out", *extra)
        c.refused(r, "pretrain", names, quiet=quiet, before_work=True)


def _text_files(c: Ctx) -> str:
    for i in range(5):
        c.write(f"docs/readme_{i}.txt", "not an image\n")
    return "docs"


def _single_image(c: Ctx) -> str:
    c.write("photo.jpg", jpeg_bytes(0))
    return "photo.jpg"


def _truncated_zip(c: Ctx) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(64):
            z.writestr(f"imgs/{i}.jpg", jpeg_bytes(i))
    data = buf.getvalue()
    c.write("train.zip", data[: len(data) // 2])
    return "train.zip"


def _zip_without_images(c: Ctx) -> str:
    with zipfile.ZipFile(c.p("docs.zip"), "w") as z:
        for i in range(5):
            z.writestr(f"docs/readme_{i}.txt", "not an image\n")
    return "docs.zip"


def _empty_dir(c: Ctx) -> str:
    c.p("empty").mkdir()
    return "empty"


data_refusal("train_missing", "pretrain data.train=nothere/", lambda c: "nothere", ["data.train", "nothere"])
data_refusal("train_empty_folder", "pretrain data.train=empty/ (an empty folder)", _empty_dir, ["empty"])
data_refusal("train_non_images", "pretrain data.train=docs/ (only .txt files)", _text_files, ["docs"])
data_refusal("train_single_image", "pretrain data.train=photo.jpg (one image file)", _single_image, ["photo.jpg"])
data_refusal("train_text_file", "pretrain data.train=notes.txt",
             lambda c: c.write("notes.txt", "hello\n").name, ["notes.txt"])
data_refusal("train_truncated_zip", "pretrain data.train=train.zip (a real zip cut in half)", _truncated_zip,
             ["train.zip", "damaged"])
data_refusal("train_zip_without_images", "pretrain data.train=docs.zip (a zip of .txt files)", _zip_without_images,
             ["docs.zip"])
data_refusal("train_fewer_than_a_batch", "pretrain data.train=few/ (10 images, batch 32)",
             lambda c: (make_folder(c.p("few"), 10), "few")[1], [("few", "data.train")])


@case("data.flat_train_with_knn", "pretrain on a flat folder with the default labeled data.test and k-NN at the end")
def _(c: Ctx):
    make_folder(c.p("mine"), 64)
    r = c.mob("pretrain", *TINY, "train.max_steps=2", "train.knn_every=0", "data.train=mine", "output_dir=out")
    c.refused(r, "pretrain", [("data.eval_train", "data.train")], before_work=True)


def bad_folder(c: Ctx, n_good: int, n_bad: int, rel: str = "imgs", ext: str = ".jpg") -> list[str]:
    make_folder(c.p(rel), n_good)
    names = []
    for i in range(n_bad):
        name = f"broken_{i:03d}{ext}"
        c.write(f"{rel}/{name}", corrupt_bytes(i))
        names.append(name)
    return names


@case("data.one_corrupt_jpeg", "pretrain 1 epoch on 159 good + 1 corrupt JPEG (skipped, named, goes on)")
def _(c: Ctx):
    bad = bad_folder(c, 159, 1)
    r = c.mob("pretrain", *TINY, "train.epochs=1", "train.knn_every=-1", "data.test=null", "data.train=imgs",
              "output_dir=out")
    if c.succeeded(r):
        c.check(bad[0] in r.err, f"{bad[0]} is not named on stderr")
        c.check(any(m.get("skipped_images", 0) >= 1 for m in metrics(c.p("out"))),
                "metrics.jsonl does not count the skipped image")
        c.ckpt_ok(c.p("out/checkpoint.pth"))


@case("data.many_corrupt", "pretrain on 20% corrupt images with data.max_bad_fraction=0.01 (stops naming files)")
def _(c: Ctx):
    bad = bad_folder(c, 128, 32)
    r = c.mob("pretrain", *TINY, "train.epochs=1", "train.knn_every=-1", "data.test=null", "data.train=imgs",
              "output_dir=out", "data.max_bad_fraction=0.01")
    c.refused(r, "pretrain", [tuple(bad), "data.max_bad_fraction"], nowrite=False, quiet=False)
    c.check(not c.p("out/checkpoint.pth").exists(), "wrote a final checkpoint after training on 20% bad data")


@case("data.png16_gray", "16-bit grayscale PNGs: not trained on as pure white (load(0) == value/257)")
def _(c: Ctx):
    c.p("png16").mkdir()
    for i in range(160):
        a = ((np.arange(32 * 32).reshape(32, 32) * 61 + 30000 + i * 997) % 65000 + 300).astype(np.uint16)
        Image.fromarray(a).save(c.p(f"png16/g_{i:03d}.png"))
    value = int(np.asarray(Image.open(c.p("png16/g_000.png")))[0, 0])
    check_pixel(c, "png16", round(value / 257), f"16-bit value {value}")
    r = c.mob("pretrain", *TINY, "train.epochs=1", "train.knn_every=-1", "data.test=null", "data.train=png16",
              "output_dir=out")
    c.either(r, "pretrain", ["g_"], quiet=False)


def check_pixel(c: Ctx, folder: str, expected: int, what: str) -> None:
    """The first image as the package decodes it: pixel (0, 0) must be ``expected`` (+-1), or refused by name."""
    from mobyssl.data import DataError, open_dataset

    try:
        ds = open_dataset(str(c.p(folder)))
        idx = next(i for i, k in enumerate(ds.keys) if "000" in k)
        px = ds.load(idx).convert("RGB").getpixel((0, 0))
    except DataError as e:
        if folder not in str(e) and "000" not in str(e):
            c.unclear(f"decoding refused without naming the file: {str(e)[:80]}")
        return
    except Exception as e:  # noqa: BLE001
        c.unclear(f"mobyssl.data.open_dataset(...).load(0) raised {type(e).__name__}: {str(e)[:80]}")
        return
    c.notes.append(f"{what} decoded as {px[0]}, expected {expected}")
    c.check(all(abs(v - expected) <= 1 for v in px),
            f"{what} decoded as {px}, expected {expected} (training on {'white' if px[0] > 250 else 'wrong'} pixels)")


@case("data.float_tiff", "float32 TIFFs in [0,1]: not trained on as pure black (load(0) == 255*value)")
def _(c: Ctx):
    c.p("tiff").mkdir()
    for i in range(160):
        a = ((np.arange(32 * 32).reshape(32, 32) + 500 + i * 37) % 1000 / 1000.0 * 0.9 + 0.05).astype(np.float32)
        Image.fromarray(a, mode="F").save(c.p(f"tiff/f_{i:03d}.tif"))
    value = float(np.asarray(Image.open(c.p("tiff/f_000.tif")))[0, 0])
    check_pixel(c, "tiff", round(value * 255), f"float value {value:.3f}")
    r = c.mob("pretrain", *TINY, "train.epochs=1", "train.knn_every=-1", "data.test=null", "data.train=tiff",
              "output_dir=out")
    c.either(r, "pretrain", ["f_"], quiet=False)


@case("data.zip_member_huge", "zip with a 300 MiB member of zeros (~300 KB file): refused by name, not inflated",
      serial=True)
def _(c: Ctx):
    with zipfile.ZipFile(c.p("data.zip"), "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(159):
            z.writestr(f"imgs/img_{i:03d}.jpg", jpeg_bytes(i))
        with z.open(zipfile.ZipInfo("imgs/huge.png"), "w", force_zip64=True) as f:
            zero = b"\x00" * (1 << 20)
            for _ in range(300):
                f.write(zero)
    r = c.mob("pretrain", *TINY, "train.epochs=1", "train.knn_every=-1", "data.test=null", "data.train=data.zip",
              "output_dir=out")
    rss_check(c, r)
    if c.either(r, "pretrain", ["huge.png"], quiet=False) == "succeeded":
        c.check("huge.png" in r.err, "huge.png was not named on stderr")


def rss_check(c: Ctx, r: Result, limit_mb: float = 150) -> None:
    """Harm if the command's own peak RSS (``os.wait4``: this child alone, so cases running side by side do not
    mix) exceeds a normal tiny run's (the base fixture's) by ``limit_mb``."""
    base = c.probe.baseline_rss
    c.notes.append(f"peak RSS {r.maxrss_mb:.0f} MiB vs {base:.0f} MiB for a normal run")
    c.check(r.maxrss_mb < base + limit_mb,
            f"peak RSS {r.maxrss_mb:.0f} MiB, {r.maxrss_mb - base:.0f} MiB above a normal run's {base:.0f} MiB")


@case("data.png_decompression_bomb", "a 20000x20000 one-colour PNG among 159 JPEGs: refused by name", serial=True)
def _(c: Ctx):
    make_folder(c.p("imgs"), 159)
    png_bomb(c.p("imgs/bomb.png"))
    r = c.mob("pretrain", *TINY, "train.epochs=1", "train.knn_every=-1", "data.test=null", "data.train=imgs",
              "output_dir=out")
    rss_check(c, r)
    if c.either(r, "pretrain", ["bomb.png"], quiet=False) == "succeeded":
        c.check("bomb.png" in r.err, "bomb.png was not named on stderr")


@case("data.corrupt_test_image_during_pretrain", "pretrain with k-NN at the end, one corrupt image in data.test")
def _(c: Ctx):
    with zipfile.ZipFile(bundled_zip("test")) as z:
        z.extractall(c.p("test_x"))
    root = c.p("test_x")
    while len(list(root.iterdir())) == 1 and next(root.iterdir()).is_dir():  # a wrapping folder
        root = next(root.iterdir())
    cls = sorted(d for d in root.iterdir() if d.is_dir())[0]
    (cls / "zz_broken.jpg").write_bytes(corrupt_bytes(0))
    test = root.relative_to(c.dir).as_posix()
    r = c.mob("pretrain", *TINY, "train.max_steps=2", "train.knn_every=0", f"data.test={test}", "output_dir=out")
    if c.succeeded(r):
        c.check("zz_broken.jpg" in r.text, "the corrupt evaluation image is not named")
        c.check(metrics(c.p("out"), "knn"), "no k-NN record in metrics.jsonl")


@case("data.gpu_resident_5pct_bad", "data.pipeline=gpu_resident on CPU, 5% unreadable, max_bad_fraction=0.01")
def _(c: Ctx):
    bad = bad_folder(c, 190, 10)
    r = c.mob("pretrain", *FAST, "data.test=null", "data.pipeline=gpu_resident", "train.device=cpu",
              "data.train=imgs", "output_dir=out", "data.max_bad_fraction=0.01")
    c.refused(r, "pretrain", [tuple(bad)], quiet=False, before_work=True)
    c.check(not list(c.p("out").glob("checkpoint*.pth")) if c.p("out").exists() else True,
            "wrote a checkpoint although the data was refused")


@case("data.gpu_resident_half_pct_bad", "data.pipeline=gpu_resident on CPU, 1 of 200 unreadable (trains, counted)")
def _(c: Ctx):
    bad = bad_folder(c, 199, 1)
    r = c.mob("pretrain", *FAST, "data.test=null", "data.pipeline=gpu_resident", "train.device=cpu",
              "data.train=imgs", "output_dir=out")
    if c.succeeded(r):
        c.check(bad[0] in r.err, f"{bad[0]} is not named on stderr")
        c.check(any(m.get("skipped_images", 0) >= 1 for m in metrics(c.p("out"))),
                "metrics.jsonl's skipped_images does not count the unreadable image")


def legit_images(name: str, what: str, write: Callable[[Ctx, int], None], extra=(), n: int = 160, check=None):
    @case(f"data.{name}", what)
    def _(c: Ctx):
        c.p("imgs").mkdir()
        for i in range(n):
            write(c, i)
        r = c.mob("pretrain", *TINY, "train.epochs=1", "train.knn_every=-1", "data.test=null", "data.train=imgs",
                  "output_dir=out", *extra)
        if c.succeeded(r):
            skipped = [m.get("skipped_images", 0) for m in metrics(c.p("out"))]
            c.check(skipped and max(skipped) == 0, f"images were skipped (skipped_images {max(skipped or [0])})")
            c.ckpt_ok(c.p("out/checkpoint.pth"))
            if check:
                check(c, r)


def _tiff(c: Ctx, i: int) -> None:
    Image.fromarray(rgb_array(i)).save(c.p(f"imgs/t_{i:03d}.tif"))


def _png_named_jpg(c: Ctx, i: int) -> None:
    c.write(f"imgs/p_{i:03d}.jpg", image_bytes(Image.fromarray(rgb_array(i)), "PNG"))


def _tiny(c: Ctx, i: int) -> None:
    c.write(f"imgs/one_{i:03d}.png", image_bytes(Image.fromarray(rgb_array(i)[:1, :1]), "PNG"))


def _cmyk(c: Ctx, i: int) -> None:
    c.write(f"imgs/c_{i:03d}.jpg", jpeg_bytes(i, mode="CMYK"))


def _rgba(c: Ctx, i: int) -> None:
    a = np.concatenate([rgb_array(i), np.full((32, 32, 1), 128, np.uint8)], axis=2)
    c.write(f"imgs/a_{i:03d}.png", image_bytes(Image.fromarray(a, "RGBA"), "PNG"))


def _mixed(c: Ctx, i: int) -> None:
    img = Image.fromarray(rgb_array(i))
    mode = ["L", "P", "LA", "1", "RGB"][i % 5]
    img = img.convert(mode) if mode != "P" else img.convert("P", palette=Image.Palette.ADAPTIVE)
    c.write(f"imgs/m_{i:03d}_{mode}.png", image_bytes(img, "PNG"))


def _odd_shapes(c: Ctx, i: int) -> None:
    w, h = [(400, 7), (7, 400), (1, 300), (257, 255), (64, 64)][i % 5]
    c.write(f"imgs/s_{i:03d}.JPG", image_bytes(Image.fromarray(rgb_array(i, 64)).resize((w, h)), "JPEG"))


legit_images("gpu_decode_tiff", "data.pipeline=gpu_decode on CPU with TIFF images (decoded, not skipped)", _tiff,
             extra=["data.pipeline=gpu_decode", "train.device=cpu"])
legit_images("gpu_decode_png_named_jpg", "data.pipeline=gpu_decode on CPU with PNGs named .jpg", _png_named_jpg,
             extra=["data.pipeline=gpu_decode", "train.device=cpu"])
legit_images("one_pixel_images", "160 images of 1x1 pixel", _tiny)
legit_images("cmyk_jpeg", "160 CMYK JPEGs", _cmyk)
legit_images("rgba_png", "160 RGBA PNGs", _rgba)
legit_images("mixed_modes", "160 PNGs in modes L, P, LA, 1, RGB", _mixed)
legit_images("odd_shapes_uppercase_ext", "160 .JPG files of 400x7, 1x300, 257x255 ... pixels", _odd_shapes)


@case("data.zip_with_macosx_junk", "a zip made on macOS: class folders plus __MACOSX/._* AppleDouble files")
def _(c: Ctx):
    with zipfile.ZipFile(c.p("photos.zip"), "w") as z:
        for i in range(160):
            name = f"photos/{['cat', 'dog'][i % 2]}/img_{i:03d}.jpg"
            z.writestr(name, jpeg_bytes(i))
            z.writestr(f"__MACOSX/{name.rsplit('/', 1)[0]}/._img_{i:03d}.jpg", b"\x00\x05\x16\x07" + os.urandom(200))
    r = c.mob("pretrain", *TINY, "train.epochs=1", "train.knn_every=-1", "data.test=null", "data.train=photos.zip",
              "output_dir=out")
    if c.succeeded(r):
        skipped = [m.get("skipped_images", 0) for m in metrics(c.p("out"))]
        c.check(skipped and max(skipped) == 0, "AppleDouble files were read as (broken) images")
        c.check("160 images" in r.out, "the dataset size is not 160 images (junk counted?)")


@case("data.broken_symlink", "159 images + lost.jpg, a dangling symlink")
def _(c: Ctx):
    make_folder(c.p("imgs"), 159)
    os.symlink("/nonexistent/lost.jpg", c.p("imgs/lost.jpg"))
    r = c.mob("pretrain", *TINY, "train.epochs=1", "train.knn_every=-1", "data.test=null", "data.train=imgs",
              "output_dir=out")
    if c.either(r, "pretrain", ["lost.jpg"], quiet=False) == "succeeded":
        c.check("lost.jpg" in r.err, "the dangling symlink is not named")


@case("data.symlink_loop", "a data folder holding a symlink to itself (must not hang or recurse)")
def _(c: Ctx):
    make_folder(c.p("imgs"), 160)
    os.symlink(".", c.p("imgs/loop"))
    r = c.mob("pretrain", *TINY, "train.epochs=1", "train.knn_every=-1", "data.test=null", "data.train=imgs",
              "output_dir=out", timeout=120)
    if c.either(r, "pretrain", ["loop"]) == "succeeded":
        c.check("160 images" in r.out, "images counted more than once through the loop")


# =============================================================================== 7. signals and disk


def start_long(c: Ctx, rel: str = "run", *extra: str) -> Proc:
    return c.start("pretrain", *TINY, "train.epochs=10", "train.knn_every=-1", "train.max_steps=200",
                   f"output_dir={rel}", *extra)


def interrupt_case(name: str, sig: int, rc: int, twice: bool = False, extra=()):
    @case(f"sig.{name}", f"pretrain, {signal.Signals(sig).name}{' twice' if twice else ''} after step 3, then "
          "--resume", serial=True)
    def _(c: Ctx):
        run = c.p("run")
        proc = start_long(c, "run", *extra)
        if not wait_for(lambda: max_step(run) >= 3, 180, proc):
            c.unclear("the run did not reach step 3")
            c.primary = proc.wait(5) if proc.p.poll() is not None else None
            return
        proc.signal(sig)
        if twice:
            time.sleep(0.05)
            proc.signal(sig)
        r = proc.wait(120)
        c.track(r, c.dir)
        c.primary = r
        if "Traceback" in r.text:
            c.unclear("traceback")
        if r.rc != rc:
            c.unclear(f"exit {r.rc}, not {rc}")
        ckpts = sorted(p for p in run.glob("checkpoint*.pth") if p.exists())
        for p in ckpts:
            c.ckpt_ok(p)
        if not ckpts:
            if not twice:
                c.harm("no checkpoint written on the interruption")
            return
        state = c.ckpt_ok(run / "checkpoint.pth")
        step = state.get("global_step", 0) if isinstance(state, dict) else 0
        if not twice:
            c.check(step >= 3, f"the interruption checkpoint is at step {step}, before the signal")
        c.resumes(run, step + 1)
        c.exit_text = f"{r.rc}, then resume {c.results[-1].rc}"


interrupt_case("sigterm", signal.SIGTERM, 143)
interrupt_case("sigint", signal.SIGINT, 130)
interrupt_case("double_sigint", signal.SIGINT, 130, twice=True, extra=["train.save_every_steps=1"])


@case("sig.sigkill_then_resume", "pretrain with train.save_every_steps=1, kill -9 after step 3, then --resume",
      serial=True)
def _(c: Ctx):
    run = c.p("run")
    proc = start_long(c, "run", "train.save_every_steps=1")
    if not wait_for(lambda: max_step(run) >= 3, 180, proc):
        c.unclear("the run did not reach step 3")
        return
    proc.signal(signal.SIGKILL)
    r = proc.wait(60)
    c.track(r, c.dir)
    state = c.ckpt_ok(run / "checkpoint.pth")
    step = state.get("global_step", 0) if isinstance(state, dict) else 0
    c.primary = r
    c.resumes(run, step + 1)
    c.exit_text = f"{r.rc}, then resume {c.results[-1].rc}"


@case("sig.sigint_during_knn", "knn --output res.json, Ctrl-C while it evaluates", serial=True)
def _(c: Ctx):
    proc = c.start("knn", "--random-init", "data.num_workers=0", "knn.batch_size=16",
                   "data.test=bundled:cifar10-sample-train", "--output", "res.json")
    seen = wait_for(lambda: "evaluating" in proc.stdout_so_far(), 120, proc)
    proc.signal(signal.SIGINT)
    r = proc.wait(60)
    c.track(r, c.dir)
    c.primary = r
    if not seen or r.rc == 0:
        c.unclear("the evaluation finished before the signal arrived; nothing was tested")
        return
    if "Traceback" in r.text:
        c.unclear("traceback")
    if r.rc != 130:
        c.unclear(f"exit {r.rc}, not 130")
    c.check(not c.p("res.json").exists(), "res.json written although the evaluation was interrupted")
    c.check(not list(c.dir.glob("res.json*")), "a partial results file was left")


@case("disk.full_during_checkpoints", "pretrain on a tmpfs with room for 2 checkpoints, train.save_every_steps=1",
      serial=True)
def _(c: Ctx):
    size_mb = int((c.probe.fixture("base") / STEP2).stat().st_size * 2.4 / 2**20) + 1
    c.mount_tmpfs("disk", f"{size_mb}m")
    run = c.p("disk/run")
    r = c.mob("pretrain", *FAST, "train.max_steps=5", "train.save_every_steps=1", "output_dir=disk/run")
    c.primary = r
    if "Traceback" in r.text:
        c.unclear("traceback")
    c.check(re.search(r"space|disk|ENOSPC|could not be written|cannot write|failed", r.text, re.I),
            "the failed checkpoint write is not reported")
    if r.rc == 2:
        line = c.error_line(r, "pretrain") or ""
        named = re.findall(r"checkpoint\w*\.pth", line)
        c.check(named, "the error does not name the last good checkpoint")
        for name in named:
            if (run / name).exists():
                c.ckpt_ok(run / name, "named checkpoint")
        if len([ln for ln in r.lines("err") if ln.startswith("mobyssl pretrain: error:")]) != 1:
            c.unclear("not exactly one error line")
    elif r.rc != 0:
        c.unclear(f"exit {r.rc}, neither 0 (went on) nor 2 (stopped with a message)")
    latest = run / "checkpoint.pth"
    if c.check(latest.exists(), "checkpoint.pth does not resolve to a checkpoint after the disk filled"):
        c.ckpt_ok(latest, "last good checkpoint")
    for p in run.glob("checkpoint_step*.pth"):
        c.ckpt_ok(p)


@case("disk.full_export", "export --output onto a full 1 MiB tmpfs", serial=True)
def _(c: Ctx):
    c.copy_run()
    c.mount_tmpfs("small", "1m")
    r = c.mob("export", "--checkpoint", "run/checkpoint.pth", "--output", "small/backbone.pth")
    c.refused(r, "export", ["small/backbone.pth"])
    left = list(c.p("small").iterdir())
    c.check(not left, f"a partial file was left: {[p.name for p in left]}")


# =============================================================================== 8. concurrency


@case("conc.two_runs_same_dir", "two pretrain into one output_dir at once", serial=True)
def _(c: Ctx):
    run = c.p("run")
    first = start_long(c)
    if not wait_for(lambda: max_step(run) >= 1, 180, first):
        c.unclear("the first run did not start training")
        return
    r = c.mob("pretrain", *FAST, "output_dir=run", snap=False)
    still = first.p.poll() is None
    first.kill()
    c.refused(r, "pretrain", ["run", str(first.p.pid)], nowrite=False)
    steps = [m["step"] for m in metrics(run)]
    c.check(steps == sorted(set(steps)), "metrics.jsonl holds two runs' records (steps repeat)")
    cfg = (run / "config.yaml").read_text() if (run / "config.yaml").exists() else ""
    c.check("max_steps: 200" in cfg, "config.yaml was rewritten by the second run")
    c.check(not (run / STEP2).exists(), f"the second run wrote {STEP2} into the first run's folder")
    if not still:
        c.unclear("the first run had ended before the second started")


@case("conc.resume_while_running", "pretrain --resume into a run that is still training", serial=True)
def _(c: Ctx):
    run = c.p("run")
    first = start_long(c, "run", "train.save_every_steps=1")
    if not wait_for(lambda: (run / "checkpoint.pth").exists(), 180, first):
        c.unclear("the first run wrote no checkpoint")
        return
    r = c.mob("pretrain", "output_dir=run", "--resume", snap=False)
    first.kill()
    c.refused(r, "pretrain", [str(first.p.pid)], nowrite=False)
    steps = [m["step"] for m in metrics(run)]
    c.check(steps == sorted(set(steps)), "metrics.jsonl holds two runs' records (steps repeat)")


@case("conc.knn_while_training", "knn on run/checkpoint.pth while the run writes a checkpoint every step",
      serial=True)
def _(c: Ctx):
    run = c.p("run")
    first = start_long(c, "run", "train.save_every_steps=1")
    if not wait_for(lambda: (run / "checkpoint.pth").exists(), 180, first):
        c.unclear("the run wrote no checkpoint")
        return
    r = c.mob("knn", "--checkpoint", "run/checkpoint.pth", snap=False)
    first.kill()
    if c.succeeded(r, primary=True):
        knn_ok(c, r)


# =============================================================================== 9. the command line itself


@case("cli.command_typo", "mobyssl pretrian")
def _(c: Ctx):
    c.refused(c.mob("pretrian"), "", ["pretrian"])


@case("cli.unknown_flag", "pretrain --epochs 3")
def _(c: Ctx):
    c.refused(c.mob("pretrain", "--epochs", "3", "output_dir=out"), "pretrain", ["--epochs"])


@case("cli.config_schema_is_json", "mobyssl config-schema (legitimate: valid JSON)")
def _(c: Ctx):
    r = c.mob("config-schema")
    if c.succeeded(r):
        try:
            json.loads(r.out)
        except ValueError as e:
            c.harm(f"config-schema prints invalid JSON ({e})")


@case("cli.stdout_closed", "mobyssl backbones | (reader already gone): no traceback")
def _(c: Ctx):
    rfd, wfd = os.pipe()
    os.close(rfd)
    with os.fdopen(wfd, "wb") as w:
        proc = Proc(["backbones"], c.dir, c.probe.work / ".logs" / c.case.name, stdout=w)
        c.procs.append(proc)
        r = proc.wait(120)
    c.track(r, c.dir)
    c.primary = r
    if "Traceback" in r.err or "Exception ignored" in r.err:
        c.unclear(f"noise on a closed pipe: {r.lines('err')[-1][:80] if r.lines('err') else ''}")
    if r.rc not in (0, 1, 120, 141):
        c.unclear(f"exit {r.rc} on a closed pipe")


@case("cli.recipe_with_base", "pretrain --config mine.yaml (base: quickstart + tiny settings) --dry-run")
def _(c: Ctx):
    c.write("mine.yaml", "base: quickstart\nmodel:\n  backbone: vit_nano_patch4_32\n  kwargs: {depth: 2}\n"
                         "train:\n  batch_size: 32\n  epochs: 2\n  warmup_epochs: 1\n")
    c.succeeded(c.mob("pretrain", "--config", "mine.yaml", "output_dir=out", "--dry-run", "data.num_workers=0"))
    c.check(not c.p("out").exists(), "--dry-run created output_dir")


# =============================================================================== the probe


class Probe:
    def __init__(self, work: Path):
        self.work = work
        self._fixtures: dict[str, Path] = {}
        self._lock = threading.RLock()
        self.baseline_rss = 0.0

    def _train(self, name: str, *overrides: str) -> Path:
        out = self.work / ".fixtures" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        proc = Proc(["pretrain", *overrides, f"output_dir={out}"], out.parent, self.work / ".logs" / "fixtures")
        r = proc.wait(600)
        if r.rc != 0:
            raise RuntimeError(f"fixture {name} failed (exit {r.rc}): {r.err[-2000:]}")
        if name == "base":
            self.baseline_rss = r.maxrss_mb
        return out

    def fixture(self, name: str) -> Path:
        with self._lock:
            if name not in self._fixtures:
                if name == "base":
                    path = self._train("base", *FAST)
                elif name == "three":
                    path = self._train("three", *FAST, "train.max_steps=3", "train.save_every_steps=1")
                elif name == "finished":
                    data = self.work / ".fixtures" / "finished_data"
                    make_folder(data, 64)
                    path = self._train("finished", *TINY, "train.knn_every=-1", "data.test=null",
                                       f"data.train={data}")
                elif name == "export":
                    base = self.fixture("base")
                    path = self.work / ".fixtures" / "backbone.pth"
                    r = Proc(["export", "--checkpoint", str(base / "checkpoint.pth"), "--output", str(path)],
                             self.work, self.work / ".logs" / "fixtures").wait(300)
                    if r.rc != 0:
                        raise RuntimeError(f"export fixture failed: {r.err[-1000:]}")
                else:
                    raise KeyError(name)
                self._fixtures[name] = path
            return self._fixtures[name]

    def run_case(self, case_: Case) -> dict:
        c = Ctx(self, case_)
        t0 = time.monotonic()
        verdict, reasons = "ok", []
        try:
            case_.fn(c)
        except Skip as e:
            verdict, reasons = "skipped", [str(e)]
        except Exception as e:  # noqa: BLE001 - a probe failure is reported, the other cases go on
            verdict, reasons = "probe-error", [f"{type(e).__name__}: {e}", traceback.format_exc(limit=3)]
        finally:
            c.cleanup()
        if verdict == "ok":
            if c.harms:
                verdict, reasons = "harm", c.harms + c.unclears
            elif c.unclears:
                verdict, reasons = "unclear", c.unclears
            else:
                reasons = [f"note: {n}" for n in c.notes]
        r = c.primary or (c.results[-1] if c.results else None)
        return {
            "case": case_.name, "what": case_.what, "verdict": verdict, "reasons": reasons,
            "exit": c.exit_text or (str(r.rc) if r else "-"),
            "message": first_message(r, c) if r else "",
            "argv": r.argv if r else [], "seconds": round(time.monotonic() - t0, 1),
            "stderr_tail": r.err[-1500:] if r else "", "stdout_tail": r.out[-800:] if r else "",
        }


def first_message(r: Result, c: Ctx) -> str:
    cmd = r.argv[1] if len(r.argv) > 1 else ""
    line = c.error_line(r, cmd) or c.error_line(r, "")
    if line is None:
        err = strip_usage(r.lines("err"))
        out = r.lines("out")
        notable = [ln for ln in out if re.match(r"(done:|wrote|evaluating|dry run|nothing to train|resumed)", ln)]
        if r.rc == 0 and (notable or out):
            line = (notable or out)[-1]
        else:
            line = err[0] if err else (out[-1] if out else "")
    return line


def md(text: str, limit: int = 180) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                    help="run only the cases whose name contains SUBSTRING (repeatable)")
    ap.add_argument("--json", metavar="PATH", help="write the results to this JSON file")
    ap.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2; timing cases run alone)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (printed at the end)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    args = ap.parse_args()

    cases = [k for k in CASES if not args.only or any(s in k.name for s in args.only)]
    if args.list:
        for k in cases:
            print(f"{k.name:45s} {k.what}")
        return 0
    if not cases:
        print(f"no case matches {args.only}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="mobyssl-hostile-"))
    probe = Probe(work)
    t0 = time.monotonic()
    print(f"{len(cases)} cases, work folder {work}", file=sys.stderr, flush=True)
    probe.fixture("base")  # the baseline RSS and the checkpoint most cases copy
    results: dict[str, dict] = {}

    def run(k: Case) -> None:
        res = probe.run_case(k)
        results[k.name] = res
        print(f"[{len(results):3d}/{len(cases)}] {res['verdict']:8s} {k.name} ({res['seconds']} s)",
              file=sys.stderr, flush=True)

    try:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(run, [k for k in cases if not k.serial]))
        for k in cases:
            if k.serial:
                run(k)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.monotonic() - t0

    rows = [results[k.name] for k in cases]
    print("\n| case | what was tried | exit code | verdict | first line of the message |")
    print("|---|---|---|---|---|")
    for res in rows:
        if res["verdict"] == "ok":
            verdict = f"ok ({'; '.join(res['reasons'])})" if res["reasons"] else "ok"
        else:
            verdict = f"**{res['verdict']}**: {'; '.join(res['reasons'][:3])}"
        print(f"| {res['case']} | {md(res['what'], 110)} | {res['exit']} | {md(verdict, 260)} | {md(res['message'])} |")
    counts: dict[str, int] = {}
    for res in rows:
        counts[res["verdict"]] = counts.get(res["verdict"], 0) + 1
    order = ["ok", "unclear", "harm", "skipped", "probe-error"]
    summary = ", ".join(f"{v}: {counts[v]}" for v in order if v in counts)
    print(f"\n**{len(rows)} cases in {wall / 60:.1f} min: {summary}**")
    if args.keep:
        print(f"work folder kept: {work}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"wall_s": round(wall, 1), "counts": counts, "cases": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
