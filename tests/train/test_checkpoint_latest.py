"""checkpoint.pth and epoch copies: written through *.tmp (a stale one from a killed run is cleared); checkpoint.pth is a copy
of the newest checkpoint where symlinks are unsupported, and found by resume either way."""

import errno
import os
from pathlib import Path

import torch

from mobyssl.train import checkpoint as ckpt_mod
from mobyssl.train.checkpoint import find_resumable, load_checkpoint, step_checkpoints, step_name, write_run_checkpoint


def _state(step):
    return {"global_step": step, "w": torch.full((10,), float(step))}


def test_a_stale_latest_tmp_left_by_a_killed_run_is_cleared(tmp_path):
    """A checkpoint.pth.tmp left by a run killed mid-switch is replaced: checkpoint.pth links the new file, no .tmp stays."""
    write_run_checkpoint(_state(1), tmp_path, 1, keep_last=2)
    os.symlink(step_name(1), tmp_path / "checkpoint.pth.tmp")  # killed between creating the link and renaming it
    write_run_checkpoint(_state(2), tmp_path, 2, keep_last=2)
    assert os.readlink(tmp_path / "checkpoint.pth") == step_name(2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", step_name(1), step_name(2)]


def test_without_symlinks_checkpoint_pth_is_a_copy_of_the_newest(tmp_path, monkeypatch):
    """Where symlinks are unsupported (FAT, some SMB), checkpoint.pth is a copy of the newest checkpoint, and resume
    takes it."""

    def no_symlink(*a, **kw):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(ckpt_mod.os, "symlink", no_symlink)
    for step in (1, 2, 3):
        write_run_checkpoint(_state(step), tmp_path, step, keep_last=2)
    latest = tmp_path / "checkpoint.pth"
    assert latest.is_file() and not latest.is_symlink()
    assert latest.read_bytes() == (tmp_path / step_name(3)).read_bytes()
    assert [p.name for p in step_checkpoints(tmp_path)] == [step_name(3), step_name(2)]
    assert not list(tmp_path.glob("*.tmp"))
    path, state = find_resumable(tmp_path, log=lambda m: None)
    assert path == latest and state["global_step"] == 3 and torch.equal(state["w"], torch.full((10,), 3.0))


def test_a_stale_epoch_copy_tmp_left_by_a_killed_run_is_cleared(tmp_path):
    """A partial checkpoint_epoch*.pth.tmp left by a killed run is replaced by the permanent copy; no .tmp stays."""
    (tmp_path / "checkpoint_epoch0001.pth.tmp").write_bytes(b"partial copy")
    write_run_checkpoint(_state(1), tmp_path, 1, keep_last=2, keep_epoch=1, log=lambda m: None)
    assert load_checkpoint(tmp_path / "checkpoint_epoch0001.pth")["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", "checkpoint_epoch0001.pth", step_name(1)]


def test_without_hard_links_the_epoch_copy_is_a_copy(tmp_path, monkeypatch):
    """Where hard links are unsupported, the permanent epoch checkpoint is a byte copy and nothing is reported."""

    def no_link(*a, **kw):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(ckpt_mod.os, "link", no_link)
    log = []
    path = write_run_checkpoint(_state(1), tmp_path, 1, keep_last=2, keep_epoch=3, log=log.append)
    assert log == []
    assert (tmp_path / "checkpoint_epoch0003.pth").read_bytes() == path.read_bytes()
    assert (tmp_path / "checkpoint_epoch0003.pth").stat().st_ino != path.stat().st_ino
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_epoch_copy_is_one_warning_naming_file_and_reason(tmp_path, monkeypatch):
    """A permanent copy that cannot be written is one warning naming it, the OS reason and the saved checkpoint."""

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.os, "link", full)
    monkeypatch.setattr(ckpt_mod.shutil, "copyfile", full)
    log = []
    path = write_run_checkpoint(_state(1), tmp_path, 1, keep_last=2, keep_epoch=1, log=log.append)
    assert log == [f"warning: could not write the permanent copy {tmp_path / 'checkpoint_epoch0001.pth'} "
                   f"(No space left on device); {path} is saved."]


def test_rotation_counts_only_this_step_and_older_ones(tmp_path):
    """Step files newer than the one just written (left when a run resumed from an earlier step) neither take
    keep_last slots from this run's checkpoints nor are removed; the new checkpoint is latest."""
    for step in (1, 2, 5, 6):
        write_run_checkpoint(_state(step), tmp_path, step, keep_last=4)
    write_run_checkpoint(_state(3), tmp_path, 3, keep_last=2)
    assert [p.name for p in step_checkpoints(tmp_path)] == [step_name(6), step_name(5), step_name(3), step_name(2)]
    assert load_checkpoint(tmp_path / "checkpoint.pth")["global_step"] == 3


def test_rotation_spares_the_file_checkpoint_pth_points_at_and_removes_the_older_ones(tmp_path, monkeypatch):
    """If checkpoint.pth could not be moved to the new file, the file it still points at stays; rotation goes on past
    it and removes every other file outside the keep_last newest."""
    for step in (1, 2, 3):
        write_run_checkpoint(_state(step), tmp_path, step, keep_last=5)
    monkeypatch.setattr(ckpt_mod, "_point_latest", lambda out, target: None)  # the pointer stays at step 3
    write_run_checkpoint(_state(4), tmp_path, 4, keep_last=1)
    assert [p.name for p in step_checkpoints(tmp_path)] == [step_name(4), step_name(3)]
    assert load_checkpoint(tmp_path / "checkpoint.pth")["global_step"] == 3


def test_a_failed_rotation_is_one_warning_naming_file_and_reason(tmp_path, monkeypatch):
    """An old checkpoint that cannot be removed is one warning naming it and the OS reason; the rest goes on."""
    write_run_checkpoint(_state(1), tmp_path, 1, keep_last=1)
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name == step_name(1):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    log = []
    write_run_checkpoint(_state(2), tmp_path, 2, keep_last=1, log=log.append)
    assert log == [f"warning: could not remove the old checkpoint {tmp_path / step_name(1)} (Permission denied); "
                   "delete it by hand."]
    assert load_checkpoint(tmp_path / "checkpoint.pth")["global_step"] == 2


def test_resume_names_the_step_file_and_reports_each_broken_one(tmp_path):
    """find_resumable returns the newest loadable step file itself (not the checkpoint.pth link), with one warning
    naming each broken newer file, and none for a missing checkpoint.pth."""
    for step in (1, 2, 3):
        write_run_checkpoint(_state(step), tmp_path, step, keep_last=3)
    (tmp_path / step_name(3)).write_bytes(b"truncated")
    log = []
    path, state = find_resumable(tmp_path, log=log.append)
    assert path == tmp_path / step_name(2) and state["global_step"] == 2
    assert len(log) == 1 and log[0].startswith(f"warning: skipping checkpoint {tmp_path / step_name(3)}: ")
    (tmp_path / "checkpoint.pth").unlink()
    log.clear()
    assert find_resumable(tmp_path, log=log.append)[0] == tmp_path / step_name(2) and len(log) == 1
