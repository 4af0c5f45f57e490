"""Run-directory protection: one run per folder (a lock that holds across processes), a new run only in a new or
empty folder, and output folders and files checked before any work. Each refusal is a one-line RunDirError."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mobyssl.errors import MobysslError, RunDirError
from mobyssl.train.rundir import (
    LOCK_NAME,
    RunLock,
    check_fresh_output_dir,
    check_output_dir_writable,
    check_output_file,
)


@contextlib.contextmanager
def read_only_dir(tmp_path):
    """A folder nobody can write into: a read-only tmpfs (we run as root), else chmod 555 for a normal user."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        try:
            yield d
        finally:
            d.chmod(0o755)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


HOLDER = textwrap.dedent("""
    import multiprocessing, sys, time
    from mobyssl.train.rundir import RunLock
    with RunLock(sys.argv[1]):
        worker = None
        if sys.argv[2] == "fork":  # like a DataLoader worker, forked while the lock is held
            worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,), daemon=True)
            worker.start()
        print("locked", worker.pid if worker else "", flush=True)
        sys.stdin.read()  # hold until the test closes our stdin
""")


@contextlib.contextmanager
def holder(out, fork=False):
    """Another process holding the lock on ``out`` (with a forked worker of its own when ``fork``)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), "fork" if fork else "--marker-arg"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker = None
    try:
        line = proc.stdout.readline().split()
        assert line and line[0] == "locked", proc.stderr.read()
        worker = int(line[1]) if len(line) > 1 else None
        proc.worker = worker
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(timeout=30)
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)


# ---------------------------------------------------------------- the lock


def test_lock_excludes_another_process_and_names_it(tmp_path):
    out = tmp_path / "a" / "b" / "run"  # created with its parents
    with holder(out) as proc:
        with pytest.raises(RunDirError) as e:
            RunLock(out).acquire()
        msg = str(e.value)
        assert f"output_dir={out} is in use by another mobyssl run" in msg
        assert f"pid {proc.pid} on host {socket.gethostname()} since " in msg
        assert "--marker-arg" in msg  # its command line
        assert "wait for it to finish or choose another output_dir" in msg
        assert "\n" not in msg
        with pytest.raises(RunDirError, match="in use by another mobyssl run"):
            check_fresh_output_dir(out)  # a new run is told the same, not "not empty"
    with RunLock(out) as lock:  # released when the holder exited
        assert lock.held
        info = json.loads((out / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["hostname"] == socket.gethostname()
        assert info["command"] == sys.argv and info["user"] and "T" in info["started"]
    assert not lock.held
    assert (out / LOCK_NAME).exists()  # the marker of a run directory stays


@pytest.mark.parametrize("fork", [False, True], ids=["alone", "with-forked-worker"])
def test_lock_of_a_killed_process_is_free_at_once(tmp_path, fork):
    # kill -9 of a run whose DataLoader workers are still alive: the folder is free right away (--resume works).
    with holder(tmp_path / "run", fork=fork) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if fork:
            os.kill(proc.worker, 0)  # the worker outlives its parent for now
        with RunLock(tmp_path / "run"):
            pass


def test_unreadable_holder_info_says_another_process(tmp_path):
    out = tmp_path / "run"
    with holder(out):
        (out / LOCK_NAME).write_text("{not json")
        with pytest.raises(RunDirError, match=r"in use by another mobyssl run \(another process\)"):
            RunLock(out).acquire()


def test_lock_in_the_same_process_twice_is_refused(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirError, match="in use"):
            RunLock(tmp_path).acquire()


def test_lock_where_a_path_component_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match=r"f is a file, not a folder") as e:
        RunLock(tmp_path / "f" / "run").acquire()
    assert str(tmp_path / "f" / "run") in str(e.value)
    with pytest.raises(RunDirError, match=r"output_dir=.*/f is a file, not a folder"):
        RunLock(tmp_path / "f").acquire()


def test_lock_in_a_read_only_folder(tmp_path):
    with read_only_dir(tmp_path) as ro:
        with pytest.raises(RunDirError, match="is not writable") as e:
            RunLock(ro / "run").acquire()
        assert str(ro / "run") in str(e.value) and "choose another output_dir" in str(e.value)


def test_fresh_lock_refuses_a_used_folder_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "run"
    with RunLock(out, fresh=True):  # a new folder: fine, and our own lock file is not "an earlier run"
        pass
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.yaml").write_text("my own")
    with pytest.raises(RunDirError, match="is not empty"):
        RunLock(tmp_path / "mine", fresh=True).acquire()
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["config.yaml"]  # no lock file left there
    with RunLock(out, fresh=True):  # only the marker of a run that wrote nothing else: as good as empty
        pass
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError, match=r"earlier run that saved no checkpoint \(metrics\.jsonl\)"):
        RunLock(out, fresh=True).acquire()  # what an earlier run left beside its marker
    assert (out / LOCK_NAME).exists()


def test_recheck_under_own_lock(tmp_path):
    # The trainer's order: check, lock, check again under the lock (another run may have started meanwhile).
    out = tmp_path / "run"
    check_fresh_output_dir(out)
    with RunLock(out) as lock:
        assert lock.created
        check_fresh_output_dir(out, own_lock=True)  # our own new lock file is not an earlier run
    mine = tmp_path / "mine"
    mine.mkdir()
    with RunLock(mine):
        (mine / "config.yaml").write_text("appeared meanwhile")
        with pytest.raises(RunDirError, match=r"is not empty \(config\.yaml\)"):
            check_fresh_output_dir(mine, own_lock=True)
    assert [p.name for p in mine.iterdir()] == ["config.yaml"]  # the lock file we made is gone again
    (out / "config.yaml").write_text("written by the earlier run")
    with RunLock(out):  # a marker and files from before: an earlier run, and they stay
        with pytest.raises(RunDirError, match="earlier run that saved no checkpoint"):
            check_fresh_output_dir(out, own_lock=True)
    assert (out / LOCK_NAME).exists()


# ---------------------------------------------------------------- a new run


def test_fresh_output_dir_new_or_empty_is_fine(tmp_path):
    check_fresh_output_dir(tmp_path / "new" / "run")
    (tmp_path / "empty").mkdir()
    check_fresh_output_dir(tmp_path / "empty")


def test_fresh_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match=r"output_dir=.*/f is a file, not a folder"):
        check_fresh_output_dir(tmp_path / "f")
    with pytest.raises(RunDirError, match=r"is a file, not a folder"):
        check_fresh_output_dir(tmp_path / "f" / "run")


@pytest.mark.parametrize("name", ["checkpoint.pth", "checkpoint_step00000010.pth", "checkpoint_epoch0002.pth",
                                  "checkpoint_diagnostic.pth"])
def test_fresh_output_dir_with_checkpoints_says_resume(tmp_path, name):
    (tmp_path / name).write_bytes(b"x")
    (tmp_path / "config.yaml").write_text("x")
    with pytest.raises(RunDirError) as e:
        check_fresh_output_dir(tmp_path)
    msg = str(e.value)
    assert f"output_dir={tmp_path} already holds the checkpoints of a run ({name})" in msg
    assert "pass --resume" in msg and "nothing was overwritten" in msg
    assert isinstance(e.value, MobysslError)


def test_fresh_output_dir_not_empty_names_five_entries(tmp_path):
    for n in ("config.yaml", "notes.txt", "a", "b", "c", "d"):
        (tmp_path / n).write_text("x")
    with pytest.raises(RunDirError) as e:
        check_fresh_output_dir(tmp_path)
    assert str(e.value) == (f"output_dir={tmp_path} is not empty (a, b, c, config.yaml, d, ...); a new run needs an "
                            "empty or new folder: choose another output_dir (nothing was overwritten).")


def test_fresh_output_dir_with_an_earlier_run_without_checkpoint(tmp_path):
    for n in (LOCK_NAME, "config.yaml", "metrics.jsonl"):
        (tmp_path / n).write_text("{}")
    with pytest.raises(RunDirError) as e:
        check_fresh_output_dir(tmp_path)
    assert (f"output_dir={tmp_path} holds an earlier run that saved no checkpoint (config.yaml, metrics.jsonl); "
            "delete it or choose another output_dir") in str(e.value)


def test_fresh_output_dir_empty_string_is_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("the user's own")
    with pytest.raises(RunDirError, match=r"not empty \(config\.yaml\)") as e:
        check_fresh_output_dir("")
    assert str(tmp_path) in str(e.value)  # the absolute folder is named
    assert (tmp_path / "config.yaml").read_text() == "the user's own"


# ---------------------------------------------------------------- writable output


def test_output_dir_writable_creates_it_and_leaves_no_probe(tmp_path):
    out = tmp_path / "x" / "y"
    check_output_dir_writable(out)
    assert out.is_dir() and not list(out.iterdir())


def test_output_dir_writable_refusals(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a folder"):
        check_output_dir_writable(tmp_path / "f")
    with pytest.raises(RunDirError, match="f is a file, not a folder"):
        check_output_dir_writable(tmp_path / "f" / "sub")
    with read_only_dir(tmp_path) as ro:
        with pytest.raises(RunDirError, match="is not writable") as e:
            check_output_dir_writable(ro / "run")
        assert str(ro / "run") in str(e.value) and "choose another output_dir" in str(e.value)
        with pytest.raises(RunDirError, match="is not writable"):
            check_output_dir_writable(ro)  # exists, but the probe cannot be written


def test_output_file_checks_create_nothing(tmp_path):
    assert check_output_file(tmp_path / "results.json", "--output") == tmp_path.resolve() / "results.json"
    (tmp_path / "d").mkdir()
    with pytest.raises(RunDirError) as e:
        check_output_file(tmp_path / "d", "--output")
    assert str(e.value) == f"--output {tmp_path / 'd'} is a folder; give a file name such as {tmp_path / 'd' / 'results.json'}."
    with pytest.raises(RunDirError, match=r"folder .*/missing does not exist; create it first"):
        check_output_file(tmp_path / "missing" / "r.json", "--output")
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match=r"/f is a file, not a folder"):
        check_output_file(tmp_path / "f" / "r.json", "--output")
    with pytest.raises(RunDirError, match=r"/f is a file, not a folder"):
        check_output_file(tmp_path / "f" / "deeper" / "r.json", "--output")
    with read_only_dir(tmp_path) as ro:
        with pytest.raises(RunDirError, match=r"folder .*/ro is not writable"):
            check_output_file(ro / "r.json", "--output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f", "ro"]  # nothing created


def test_output_file_keeps_a_symlink_as_the_last_component(tmp_path):
    (tmp_path / "target.json").write_text("{}")
    (tmp_path / "link.json").symlink_to("target.json")
    assert check_output_file(tmp_path / "link.json", "--output") == Path(tmp_path.resolve(), "link.json")
