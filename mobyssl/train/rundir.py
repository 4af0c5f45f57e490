"""Run-directory protection: a run never loses or overwrites what a user already has.

* ``RunLock(output_dir)``: one mobyssl run per output directory at a time (an exclusive ``flock`` on
  ``<output_dir>/.mobyssl.lock``; the file stays after the run and marks the folder as a mobyssl run directory).
* ``check_fresh_output_dir``: a new run (not ``--resume``) starts only in a new or empty folder.
* ``check_output_dir_writable`` / ``check_output_file``: output locations are checked before any work.

Every refusal is a ``RunDirError`` whose one-line message names the path and the fix.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import json
import os
import re
import shlex
import socket
import sys
from pathlib import Path

from ..errors import RunDirError

try:  # POSIX only; on Windows the lock degrades to a marker file without exclusion
    import fcntl
except ImportError:  # pragma: no cover - not on Linux / macOS
    fcntl = None

LOCK_NAME = ".mobyssl.lock"
# Every file name a run writes for its checkpoints (``checkpoint.py``), and their temporary files.
_CHECKPOINT_RE = re.compile(r"checkpoint(_step\d+|_epoch\d+|_diagnostic)?\.pth(\.tmp)?")
_MAX_LISTED = 5


def is_checkpoint_name(name: str) -> bool:
    """``checkpoint.pth``, ``checkpoint_step*.pth``, ``checkpoint_epoch*.pth``, ``checkpoint_diagnostic.pth``
    (or their ``.tmp``): the names of a run's checkpoint files."""
    return _CHECKPOINT_RE.fullmatch(name) is not None


def _show(path: Path) -> str:
    """The path as given, with its absolute form where it is relative (``output_dir=`` is the current folder)."""
    text = str(path)
    return text if path.is_absolute() else f"{text} ({Path.cwd() / path})"


def _file_component(path: Path) -> Path | None:
    """The first component of ``path`` (itself included) that exists and is not a folder."""
    for p in [*reversed(path.parents), path]:
        if p.exists() and not p.is_dir():
            return p
        if not p.exists():
            return None
    return None


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _make_dir(out: Path) -> None:
    """Create ``out`` with its parents; a ``RunDirError`` naming the path and the reason if that is impossible."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = _file_component(out)
        if blocker == out:
            raise RunDirError(f"output_dir={_show(out)} is a file, not a folder; choose another output_dir.") from None
        if blocker is not None:
            raise RunDirError(f"output_dir={_show(out)} cannot be created: {blocker} is a file, not a folder; "
                              "choose another output_dir.") from None
        raise RunDirError(f"output_dir={_show(out)} is not writable ({_reason(e)}); choose another output_dir or "
                          "fix its permissions.") from None


# ---------------------------------------------------------------- the lock


def _holder_text(info: dict | None) -> str:
    if not info:
        return "another process"
    cmd = info.get("command")
    cmd = shlex.join(cmd) if isinstance(cmd, list) else str(cmd or "?")
    return (f"pid {info.get('pid', '?')} on host {info.get('hostname', '?')} since {info.get('started', '?')}: "
            f"{cmd}")


def _read_holder(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _in_use_error(out: Path, lock_path: Path) -> RunDirError:
    return RunDirError(f"output_dir={_show(out)} is in use by another mobyssl run ({_holder_text(_read_holder(lock_path))}); "
                       "wait for it to finish or choose another output_dir.")


def _lock_is_held(lock_path: Path) -> bool:
    """Whether another open file holds the lock (probed without keeping it)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases a lock this probe took
    return False


class RunLock:
    """Exclusive use of ``output_dir`` by one mobyssl run, as a context manager.

    Creates ``output_dir`` (with parents) and takes an exclusive, non-blocking ``fcntl.flock`` on
    ``<output_dir>/.mobyssl.lock``, then writes JSON about the holder into it (pid, hostname, user, command
    line, start time). If another process holds the lock, raises ``RunDirError`` naming that process
    (read from the file) and the fix. The lock is released on exit (or when the process dies: the kernel
    drops it); the file is kept, as the marker of a mobyssl run directory.

    A new run checks its folder again while holding the lock (``check_fresh_output_dir(out, own_lock=True)``,
    or ``RunLock(out, fresh=True)`` which does that in ``acquire``): that closes the race between two runs
    started on the same new folder at the same moment. A lock file this lock created does not count as an
    earlier run's marker there, and after such a refusal it is removed again on release, so nothing is left
    behind in the user's folder. ``created`` says whether this lock created the file.

    Limits: ``flock`` is advisory (only mobyssl runs respect it) and on some network filesystems (older NFS,
    some FUSE mounts) it is not enforced across hosts; where ``fcntl`` is unavailable (Windows) there is no
    exclusion at all and only the marker file is written. Take it on one process per run (rank 0 under
    ``torchrun``). Processes forked while the lock is held (DataLoader workers) close their copy of it at
    once, so a run killed with SIGKILL frees its folder at that moment, not when its workers notice.
    """

    def __init__(self, output_dir: str | os.PathLike, fresh: bool = False):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self.fresh = fresh
        self.created = False
        self.created_dir = False
        self._fd: int | None = None
        self._discard = False  # remove the lock file on release (a refused new run that created it)

    def acquire(self) -> RunLock:
        out = self.output_dir
        self.created_dir = not out.exists()
        _make_dir(out)
        created = False
        try:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                created = True
            except FileExistsError:
                fd = os.open(self.path, os.O_RDWR)
        except OSError as e:
            if self.path.is_dir():
                raise RunDirError(f"{self.path} is a folder; remove it (mobyssl keeps its lock file there) or "
                                  "choose another output_dir.") from None
            raise RunDirError(f"output_dir={_show(out)} is not writable: cannot open {self.path} "
                              f"({_reason(e)}); choose another output_dir or fix its permissions.") from None
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise _in_use_error(out, self.path) from None
                except OSError as e:  # e.g. ENOLCK: a filesystem without locks
                    raise RunDirError(f"cannot lock {self.path} ({_reason(e)}); choose an output_dir on a "
                                      "local filesystem.") from None
            self.created, self._fd = created, fd
            _HELD[_key(out)] = self
            if self.fresh:
                check_fresh_output_dir(out, own_lock=True)
            info = {"pid": os.getpid(), "hostname": socket.gethostname(), "user": _user(),
                    "command": list(sys.argv),
                    "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
            data = (json.dumps(info) + "\n").encode()
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
            except OSError as e:
                raise RunDirError(f"output_dir={_show(out)} is not writable: cannot write {self.path} "
                                  f"({_reason(e)}); free disk space or choose another output_dir.") from None
        except BaseException:
            self._discard = self._discard or created
            if self._fd is None:
                os.close(fd)
            else:
                self.release()
            raise
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if _HELD.get(_key(self.output_dir)) is self:
            del _HELD[_key(self.output_dir)]
        if self._discard:  # while still holding the lock: no other run can have taken it meanwhile
            with contextlib.suppress(OSError):
                self.path.unlink()
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)  # also for forked children that share this open file
        finally:
            os.close(fd)

    def undo_new_run(self) -> None:
        """For a new run that failed before it trained a step: remove what it wrote (everything in the folder,
        which was new or empty when this lock re-checked it) and, on release, the lock file and the folder if
        this lock created it; the folder is left as it was found."""
        if self._fd is None or not (self.fresh and self.created):
            return
        import shutil

        for entry in self.output_dir.iterdir():
            if entry.name == LOCK_NAME:
                continue
            with contextlib.suppress(OSError):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        self._discard = True
        self.release()
        if self.created_dir:
            with contextlib.suppress(OSError):
                self.output_dir.rmdir()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: dict[str, RunLock] = {}  # the locks this process holds, by folder


def _drop_inherited_locks() -> None:
    """In a forked child: close the copies of the parent's lock files without unlocking them (the lock belongs to
    the open file, shared with the parent; a child keeping it open would keep the folder locked after the
    parent died until the child exits too)."""
    for lock in list(_HELD.values()):
        if lock._fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock._fd)
            lock._fd = None
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def _key(out: Path) -> str:
    return os.path.realpath(out)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (containers without /etc/passwd entries)
        return str(os.getuid()) if hasattr(os, "getuid") else "?"


# ---------------------------------------------------------------- checks


def _listing(names: list[str]) -> str:
    shown = sorted(names)[:_MAX_LISTED]
    return ", ".join(shown) + (", ..." if len(names) > _MAX_LISTED else "")


def acquire_writable(lock: RunLock) -> None:
    """Take ``lock`` and check that its folder can be written; on a refusal the lock is released again."""
    lock.acquire()
    try:
        check_output_dir_writable(lock.output_dir)
    except BaseException:
        lock.release()
        raise


def check_fresh_output_dir(output_dir: str | os.PathLike, own_lock: bool = False) -> None:
    """Refuse to start a NEW run (not ``--resume``) in ``output_dir`` unless it is a new or empty folder.

    Reads only; creates nothing. ``output_dir=`` (empty) is the current folder, which is refused when it holds
    anything (the user's own ``config.yaml`` would be overwritten). Refusals, each a ``RunDirError``:
    a file, not a folder; in use by a running mobyssl run (its lock is held); holds a run's checkpoints (pass
    --resume or choose another output_dir); holds an earlier run that saved no checkpoint (its lock marker is
    there); any other non-empty folder (up to 5 entries named).

    ``own_lock=True``: called while this process holds ``RunLock(output_dir)``: the lock is not probed, and a
    lock file that lock created is not an earlier run's marker (and is removed on release after a refusal).
    """
    out = Path(output_dir)
    lock = _HELD.get(_key(out)) if own_lock else None
    try:
        _check_fresh(out, holding=own_lock, ignore_lock=lock is not None and lock.created)
    except RunDirError:
        if lock is not None and lock.created:
            lock._discard = True
        raise


def _check_fresh(out: Path, holding: bool, ignore_lock: bool) -> None:
    if not out.exists():
        blocker = _file_component(out)
        if blocker is not None:
            raise RunDirError(f"output_dir={_show(out)} cannot be created: {blocker} is a file, not a folder; "
                              "choose another output_dir.")
        return
    if not out.is_dir():
        raise RunDirError(f"output_dir={_show(out)} is a file, not a folder; choose another output_dir.")
    try:
        names = [p.name for p in out.iterdir()]
    except OSError as e:
        raise RunDirError(f"output_dir={_show(out)} cannot be read ({_reason(e)}); choose another output_dir or "
                          "fix its permissions.") from None
    has_lock = LOCK_NAME in names
    if has_lock and not holding and _lock_is_held(out / LOCK_NAME):
        raise _in_use_error(out, out / LOCK_NAME)
    if ignore_lock or names == [LOCK_NAME]:  # our own lock, or only the marker of a run that wrote nothing else
        names = [n for n in names if n != LOCK_NAME]
        has_lock = False
    if not names:
        return
    checkpoints = [n for n in names if is_checkpoint_name(n) and not n.endswith(".tmp")]
    if checkpoints:
        raise RunDirError(f"output_dir={_show(out)} already holds the checkpoints of a run ({_listing(checkpoints)}); "
                          "pass --resume to continue it, or choose another output_dir (nothing was overwritten).")
    visible = [n for n in names if n != LOCK_NAME] or names
    if has_lock:
        raise RunDirError(f"output_dir={_show(out)} holds an earlier run that saved no checkpoint ({_listing(visible)}); "
                          "delete it or choose another output_dir (nothing was overwritten).")
    raise RunDirError(f"output_dir={_show(out)} is not empty ({_listing(names)}); a new run needs an empty or new "
                      "folder: choose another output_dir (nothing was overwritten).")


def check_output_dir_writable(output_dir: str | os.PathLike) -> None:
    """Create ``output_dir`` (with parents) and prove it writable with a probe file, before any work.

    ``RunDirError`` naming the path and the reason (a path component that is a file: "is a file, not a folder").
    """
    out = Path(output_dir)
    _make_dir(out)
    probe = out / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
    except OSError as e:
        raise RunDirError(f"output_dir={_show(out)} is not writable ({_reason(e)}); choose another output_dir or fix "
                          "its permissions.") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _writable_dir(d: Path) -> bool:
    if not os.access(d, os.W_OK | os.X_OK):
        return False
    try:  # root passes os.access on read-only mounts
        return not (os.statvfs(d).f_flag & getattr(os, "ST_RDONLY", 1))
    except (OSError, AttributeError):
        return True


def check_output_file(path: str | os.PathLike, what: str, example: str = "results.json") -> Path:
    """Check an output FILE named on the command line (``what``, e.g. ``"--output"``) before any work.

    Refuses (``RunDirError``) an existing folder, a parent folder that does not exist or is a file, and a parent
    that is not writable. Creates nothing, and does not refuse an existing file (callers decide about
    overwriting: ``save_export`` does). Returns the absolute path with its folder resolved; a symlink as the
    last component is kept as such (not followed).
    """
    raw = Path(os.path.expanduser(str(path)))
    if str(path) == "" or raw.is_dir():
        shown = str(path) or "''"
        raise RunDirError(f"{what} {shown} is a folder; give a file name such as {raw / example}.")
    parent = raw.parent
    if not parent.exists():
        blocker = _file_component(parent)
        if blocker is not None:
            raise RunDirError(f"{what} {raw}: {blocker} is a file, not a folder; choose another path.")
        raise RunDirError(f"{what} {raw}: folder {_show(parent)} does not exist; create it first or choose "
                          "another path.")
    if not parent.is_dir():
        raise RunDirError(f"{what} {raw}: {parent} is a file, not a folder; choose another path.")
    if not _writable_dir(parent):
        raise RunDirError(f"{what} {raw}: folder {_show(parent)} is not writable; choose another path or fix its "
                          "permissions.")
    return parent.resolve() / raw.name
