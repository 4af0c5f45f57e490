"""Checkpoint and export writes: a full disk is an OSError (the trainer reports it and goes on), never a damaged or
lost checkpoint; a bug (an unpicklable object) stays its own error; an export never writes over a checkpoint."""

import contextlib
import errno
import io
import os
import pickle
import re
import subprocess
from pathlib import Path

import pytest
import torch

from mobyssl.errors import CheckpointError, MobysslError, RunDirError
from mobyssl.train import checkpoint as ckpt_mod
from mobyssl.train import trainer as trainer_mod
from mobyssl.train.checkpoint import (
    CheckpointWriteError,
    load_checkpoint,
    save_checkpoint,
    save_export,
    step_checkpoints,
    write_run_checkpoint,
)
from mobyssl.train.trainer import pretrain

_real_open = open


def _state(step, numel=1000):
    return {"global_step": step, "w": torch.full((numel,), float(step))}


def _filling_open(budget):
    """An ``open`` whose files hold ``budget`` bytes: then a write stores what fits and fails with ENOSPC, as a
    full disk does; torch's C++ zip writer calls it and sees the error itself."""

    class FillingFile(io.FileIO):
        written = 0

        def write(self, data):
            room = budget - self.written
            if len(data) > room:
                if room > 0:
                    super().write(bytes(memoryview(data)[:room]))
                    self.written = budget
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return super().write(data)

    def fake_open(file, mode="r", *args, **kwargs):
        if str(file).endswith(".tmp") and "w" in mode:
            return FillingFile(file, "w")
        return _real_open(file, mode, *args, **kwargs)

    return fake_open


def test_enospc_inside_torch_save_is_an_oserror_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    write_run_checkpoint(_state(1), tmp_path, 1, keep_last=2)
    monkeypatch.setattr(ckpt_mod, "open", _filling_open(3000), raising=False)
    with pytest.raises(OSError) as e:
        write_run_checkpoint(_state(2, numel=100_000), tmp_path, 2, keep_last=2)
    err = e.value
    assert isinstance(err, CheckpointWriteError) and isinstance(err, MobysslError)
    assert err.errno == errno.ENOSPC
    assert isinstance(err.original, RuntimeError)  # what torch.save raised
    msg = str(err)
    assert msg.startswith(f"cannot write {tmp_path / 'checkpoint_step00000002.pth'}: No space left on device")
    assert "free in" in msg and "\n" not in msg
    monkeypatch.undo()
    assert not list(tmp_path.glob("*.tmp"))
    assert [p.name for p in step_checkpoints(tmp_path)] == ["checkpoint_step00000001.pth"]
    assert load_checkpoint(tmp_path / "checkpoint.pth")["global_step"] == 1


def test_trainer_sees_an_oserror_on_a_full_disk_and_goes_on(tiny_cfg, monkeypatch, capsys):
    seen = []
    real_write = trainer_mod.write_run_checkpoint

    def spy(state, out, step, *a, **kw):
        if step == 2:  # the second checkpoint hits a full disk inside torch.save
            monkeypatch.setattr(ckpt_mod, "open", _filling_open(5000), raising=False)
        try:
            return real_write(state, out, step, *a, **kw)
        except BaseException as e:
            seen.append(e)
            raise
        finally:
            monkeypatch.delattr(ckpt_mod, "open", raising=False)

    monkeypatch.setattr(trainer_mod, "write_run_checkpoint", spy)
    result = pretrain(tiny_cfg("train.max_steps=3", "train.save_every_steps=1", "train.knn_every=-1"))
    assert result["global_step"] == 3  # training went on
    assert len(seen) == 1 and isinstance(seen[0], OSError) and seen[0].errno == errno.ENOSPC
    out = capsys.readouterr().out
    assert "could not write a checkpoint at step 2" in out and "No space left on device" in out
    run = Path(tiny_cfg().output_dir)
    assert not list(run.glob("*.tmp"))
    assert load_checkpoint(run / "checkpoint_step00000001.pth")["global_step"] == 1  # intact
    assert load_checkpoint(run / "checkpoint.pth")["global_step"] == 3


@contextlib.contextmanager
def small_tmpfs(where: Path, size="2m"):
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root in a sandbox that allows mounts): "
                    f"{r.stderr.strip() or r.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_full_tmpfs_is_an_oserror_and_keeps_the_previous_checkpoint(tmp_path):
    with small_tmpfs(tmp_path / "small") as disk:
        write_run_checkpoint(_state(1, numel=50_000), disk, 1, keep_last=2)  # 200 KB: fits
        with pytest.raises(CheckpointWriteError) as e:
            write_run_checkpoint(_state(2, numel=1_000_000), disk, 2, keep_last=2)  # 4 MB on a 2 MB disk
        assert e.value.errno == errno.ENOSPC and "No space left on device" in str(e.value)
        assert isinstance(e.value.original, RuntimeError)  # torch reported it as a RuntimeError
        assert sorted(p.name for p in disk.iterdir()) == ["checkpoint.pth", "checkpoint_step00000001.pth"]
        state = load_checkpoint(disk / "checkpoint.pth")
        assert state["global_step"] == 1 and torch.equal(state["w"], torch.full((50_000,), 1.0))
        write_run_checkpoint(_state(3, numel=50_000), disk, 3, keep_last=2)  # the space was given back
        assert load_checkpoint(disk / "checkpoint.pth")["global_step"] == 3


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom: not picklable")


def test_an_unpicklable_object_is_its_own_error_not_a_write_failure(tmp_path):
    save_checkpoint(_state(1), tmp_path / "c.pth")
    with pytest.raises(RuntimeError, match="boom: not picklable") as e:
        save_checkpoint({"x": _Unpicklable()}, tmp_path / "c.pth")
    assert not isinstance(e.value, OSError)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)) as e:
        save_checkpoint({"f": lambda: 1}, tmp_path / "c.pth")
    assert not isinstance(e.value, OSError)
    assert not list(tmp_path.glob("*.tmp"))
    assert load_checkpoint(tmp_path / "c.pth")["global_step"] == 1


@pytest.mark.parametrize("free", [0, 10 << 30], ids=["disk-full", "space-left"])
def test_a_stream_writer_failure_without_errno_is_an_oserror(tmp_path, monkeypatch, free):
    # torch's own file writer (a path, not a file object) reports only "PytorchStreamWriter failed writing file".
    def failing(obj, f, *a, **kw):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(ckpt_mod.torch, "save", failing)
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: type("Usage", (), {"free": free})())
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(_state(1), tmp_path / "c.pth")
    assert e.value.errno == (errno.ENOSPC if free == 0 else errno.EIO)
    assert "PytorchStreamWriter failed" in str(e.value) or free == 0
    assert not list(tmp_path.iterdir())


def test_save_onto_a_symlink_replaces_the_link_not_its_target(tmp_path):
    save_checkpoint(_state(1), tmp_path / "real.pth")
    (tmp_path / "link.pth").symlink_to("real.pth")
    save_checkpoint(_state(2), tmp_path / "link.pth")
    assert not (tmp_path / "link.pth").is_symlink()
    assert load_checkpoint(tmp_path / "link.pth")["global_step"] == 2
    assert load_checkpoint(tmp_path / "real.pth")["global_step"] == 1


# ---------------------------------------------------------------- checkpoint.pth and rotation


def _fail_replace_onto(monkeypatch, name):
    real = os.replace

    def replace(src, dst, *a, **kw):
        if Path(dst).name == name:
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)


def test_failed_latest_pointer_keeps_the_previous_one_and_leaves_no_tmp(tmp_path, monkeypatch):
    write_run_checkpoint(_state(1), tmp_path, 1, keep_last=1)
    _fail_replace_onto(monkeypatch, "checkpoint.pth")
    with pytest.raises(CheckpointWriteError, match="checkpoint.pth: Input/output error"):
        write_run_checkpoint(_state(2), tmp_path, 2, keep_last=1)
    with pytest.raises(CheckpointWriteError):
        write_run_checkpoint(_state(3), tmp_path, 3, keep_last=1)
    assert not list(tmp_path.glob("*.tmp"))
    assert load_checkpoint(tmp_path / "checkpoint.pth")["global_step"] == 1
    monkeypatch.undo()  # the next save works and rotates the files the failed ones left
    write_run_checkpoint(_state(4), tmp_path, 4, keep_last=1)
    assert load_checkpoint(tmp_path / "checkpoint.pth")["global_step"] == 4
    assert [p.name for p in step_checkpoints(tmp_path)] == ["checkpoint_step00000004.pth"]


def test_rotation_never_removes_the_file_latest_points_at(tmp_path, monkeypatch):
    write_run_checkpoint(_state(1), tmp_path, 1, keep_last=1)
    for step in (2, 3):  # newer step files whose checkpoint.pth update did not happen
        save_checkpoint(_state(step), tmp_path / ckpt_mod.step_name(step))
    monkeypatch.setattr(ckpt_mod, "_point_latest", lambda out, target: None)  # checkpoint.pth stays at step 1
    write_run_checkpoint(_state(4), tmp_path, 4, keep_last=1)
    assert load_checkpoint(tmp_path / "checkpoint.pth")["global_step"] == 1  # not dangling
    assert [p.name for p in step_checkpoints(tmp_path)] == ["checkpoint_step00000004.pth",
                                                             "checkpoint_step00000001.pth"]


def test_rotation_and_epoch_copy_failures_are_reported_and_the_checkpoint_stands(tmp_path, monkeypatch):
    write_run_checkpoint(_state(1), tmp_path, 1, keep_last=1)
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name == "checkpoint_step00000001.pth":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_unlink(self, missing_ok=missing_ok)

    def no_link(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "unlink", unlink)
    monkeypatch.setattr(ckpt_mod.os, "link", no_link)
    monkeypatch.setattr(ckpt_mod.shutil, "copyfile", no_link)
    log = []
    write_run_checkpoint(_state(2), tmp_path, 2, keep_last=1, keep_epoch=1, log=log.append)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "checkpoint.pth")["global_step"] == 2
    assert any("could not write the permanent copy" in m and "checkpoint_epoch0001.pth" in m for m in log)
    assert any("could not remove the old checkpoint" in m and "checkpoint_step00000001.pth" in m for m in log)
    assert not (tmp_path / "checkpoint_epoch0001.pth").exists() and not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------- exports


def _bb():
    return {"w": torch.ones(3)}


def _intact(run):
    assert load_checkpoint(run / "checkpoint.pth")["global_step"] == 2
    assert load_checkpoint(run / "checkpoint_step00000001.pth")["global_step"] == 1
    assert (run / "checkpoint.pth").is_symlink()


@pytest.mark.parametrize("target", ["checkpoint.pth", "checkpoint_step00000002.pth", "checkpoint_step00000001.pth"])
def test_export_never_writes_over_a_training_checkpoint(run, target):
    for overwrite in (False, True):
        with pytest.raises(RunDirError) as e:
            save_export(_bb(), run / target, run / "checkpoint.pth", overwrite=overwrite)
        assert str(run / target) in str(e.value) and "choose another --output" in str(e.value)
    _intact(run)


def test_export_refuses_a_renamed_training_checkpoint_and_the_source(run, tmp_path):
    mine = tmp_path / "pretrained.pth"
    mine.write_bytes((run / "checkpoint_step00000002.pth").read_bytes())
    with pytest.raises(RunDirError, match="is a training checkpoint"):
        save_export(_bb(), mine, run / "checkpoint.pth", overwrite=True)
    with pytest.raises(RunDirError, match="is the checkpoint being exported"):
        save_export(_bb(), mine, mine, overwrite=True)
    (tmp_path / "alias.pth").symlink_to(mine)
    with pytest.raises(RunDirError, match="is the checkpoint being exported"):
        save_export(_bb(), tmp_path / "alias.pth", mine, overwrite=True)
    assert load_checkpoint(mine)["global_step"] == 2


def test_export_refuses_an_existing_file_named_like_a_checkpoint(run, tmp_path):
    # A copied-out permanent checkpoint, whatever it holds (here a bare state dict), outside any run directory.
    kept = tmp_path / "kept" / "checkpoint_epoch0003.pth"
    kept.parent.mkdir()
    torch.save({"w": torch.zeros(3)}, kept)
    with pytest.raises(RunDirError, match="is a training checkpoint"):
        save_export(_bb(), kept, run / "checkpoint.pth", overwrite=True)
    assert torch.equal(torch.load(kept)["w"], torch.zeros(3))


def test_export_refuses_a_new_checkpoint_name_in_a_run_directory(run):
    with pytest.raises(RunDirError, match="checkpoint name inside the run directory"):
        save_export(_bb(), run / "checkpoint_step99999999.pth", run / "checkpoint.pth")
    assert [p.name for p in step_checkpoints(run)] == ["checkpoint_step00000002.pth", "checkpoint_step00000001.pth"]
    out = save_export(_bb(), run / "backbone.pth", run / "checkpoint.pth")  # another name there is fine
    assert torch.equal(load_checkpoint(out)["w"], torch.ones(3))
    _intact(run)


def test_export_replaces_another_file_only_with_overwrite(run, tmp_path):
    dest = tmp_path / "backbone.pth"
    dest.write_text("my notes")
    with pytest.raises(RunDirError) as e:
        save_export(_bb(), dest, run / "checkpoint.pth")
    assert str(e.value) == f"--output {dest.resolve()} already exists; pass --overwrite to replace it, or choose another --output."
    assert dest.read_text() == "my notes"
    save_export(_bb(), dest, run / "checkpoint.pth", overwrite=True)
    assert torch.equal(load_checkpoint(dest)["w"], torch.ones(3)) and not list(tmp_path.glob("*.tmp"))


def test_export_over_a_symlink_replaces_the_link(run, tmp_path):
    (tmp_path / "notes.pth").write_text("keep me")
    (tmp_path / "bb.pth").symlink_to("notes.pth")
    save_export(_bb(), tmp_path / "bb.pth", run / "checkpoint.pth", overwrite=True)
    assert (tmp_path / "notes.pth").read_text() == "keep me"
    assert not (tmp_path / "bb.pth").is_symlink()


def test_export_to_a_folder_or_missing_folder(run, tmp_path):
    with pytest.raises(RunDirError, match=r"is a folder; give a file name such as .*/backbone\.pth"):
        save_export(_bb(), tmp_path, run / "checkpoint.pth")
    with pytest.raises(RunDirError, match="does not exist"):
        save_export(_bb(), tmp_path / "nope" / "bb.pth", run / "checkpoint.pth")
    _intact(run)


def test_export_on_a_full_disk_is_one_clear_error(run, tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_mod, "open", _filling_open(100), raising=False)
    with pytest.raises(CheckpointWriteError) as e:
        save_export({"w": torch.ones(100_000)}, tmp_path / "bb.pth", run / "checkpoint.pth")
    assert isinstance(e.value, MobysslError) and e.value.errno == errno.ENOSPC
    assert str(e.value).startswith(f"cannot write {tmp_path.resolve() / 'bb.pth'}: No space left on device")
    assert not (tmp_path / "bb.pth").exists() and not list(tmp_path.glob("*.tmp"))


def test_step_checkpoints_ignores_names_that_only_look_like_them(tmp_path):
    for name in ("checkpoint_step00000003.pth", "checkpoint_step_old.pth", "checkpoint_stepXY.pth",
                 "checkpoint_step00000001.pth"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in step_checkpoints(tmp_path)] == ["checkpoint_step00000003.pth", "checkpoint_step00000001.pth"]


def test_a_folder_given_as_checkpoint_is_refused_with_the_file_to_give(tmp_path):
    with pytest.raises(CheckpointError, match=r"is a folder; give the checkpoint file \(runs write "
                                              r"<output_dir>/checkpoint\.pth\)\.$"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"is a folder; give the checkpoint file such as "
                                              rf"{re.escape(str(tmp_path / 'checkpoint.pth'))}\.$"):
        load_checkpoint(tmp_path)


def test_a_missing_checkpoint_and_a_broken_link_are_told_apart(tmp_path):
    with pytest.raises(CheckpointError, match=r"^checkpoint .*gone\.pth does not exist; check the path \(runs write "
                                              r"<output_dir>/checkpoint\.pth\)\.$"):
        load_checkpoint(tmp_path / "gone.pth")
    (tmp_path / "link.pth").symlink_to(tmp_path / "gone.pth")
    with pytest.raises(CheckpointError, match=r"^checkpoint .*link\.pth is a broken link; check the path"):
        load_checkpoint(tmp_path / "link.pth")


class _NotATensor:
    pass


def test_a_checkpoint_holding_python_objects_is_refused_without_loading_them(tmp_path):
    torch.save({"global_step": 1, "thing": _NotATensor()}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"holds Python objects other than tensors, numbers and plain "
                                              r"containers, which are not loaded \(that could run code\)"):
        load_checkpoint(tmp_path / "c.pth")


def test_a_checkpoint_whose_folder_is_gone_is_a_write_error_naming_it(tmp_path):
    with pytest.raises(CheckpointWriteError) as e:  # open() fails before anything is written
        save_checkpoint({"global_step": 1}, tmp_path / "gone" / "c.pth")
    assert e.value.errno == errno.ENOENT and str(tmp_path / "gone" / "c.pth") in str(e.value)


def test_a_folder_that_cannot_be_synced_is_not_an_error(tmp_path, monkeypatch):
    def refuse(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(ckpt_mod.os, "fsync", refuse)
    ckpt_mod._fsync_dir(tmp_path)  # some filesystems cannot fsync a folder: skipped
    ckpt_mod._fsync_dir(tmp_path / "gone")
