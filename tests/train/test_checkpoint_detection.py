"""What an export refuses to write over: a training checkpoint is recognised by content (whatever its name, layout,
saving device), a run directory by any of its marks; files that are not training checkpoints stay replaceable."""

import os
import zipfile

import pytest
import torch
import torch.serialization
from helpers import deadline

from mobyssl.errors import RunDirError
from mobyssl.train.checkpoint import (
    check_export_target,
    load_checkpoint,
    save_checkpoint,
    save_export,
    step_name,
)
from mobyssl.train.rundir import LOCK_NAME


def _train_state(step=1, numel=3):
    return {"method": {"encoder.w": torch.zeros(numel) + step}, "optimizer": {"state": {}}, "global_step": step}


def _bb():
    return {"w": torch.ones(3)}


# ---------------------------------------------------------------- training checkpoints by content


def test_a_compressed_repack_of_a_training_checkpoint_is_still_recognised(tmp_path):
    """A training checkpoint re-packed with zip compression (cannot be memory-mapped, loads without mmap) is refused."""
    orig = tmp_path / "orig.pth"
    save_checkpoint(_train_state(numel=100_000), orig)
    packed = tmp_path / "archived.pth"
    with zipfile.ZipFile(orig) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert load_checkpoint(packed)["global_step"] == 1  # a readable checkpoint
    before = packed.read_bytes()
    with pytest.raises(RunDirError, match="is a training checkpoint"):
        save_export(_bb(), packed, overwrite=True)
    assert packed.read_bytes() == before


def test_a_training_checkpoint_saved_on_another_gpu_is_recognised(tmp_path, monkeypatch):
    """A training checkpoint whose tensors were saved on a CUDA device this machine lacks is still refused."""
    dest = tmp_path / "pretrained.pth"
    with monkeypatch.context() as m:  # tag the storages as torch.save does for tensors on that device
        m.setattr(torch.serialization, "location_tag", lambda storage: f"cuda:{torch.cuda.device_count()}")
        save_checkpoint(_train_state(), dest)
    before = dest.read_bytes()
    with pytest.raises(RunDirError, match="is a training checkpoint"):
        save_export(_bb(), dest, overwrite=True)
    assert dest.read_bytes() == before


class _Planted:
    """Unpickling it creates a folder: evidence that the check loaded Python objects (which could run code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("force_no_weights_only", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
def test_the_export_check_never_unpickles_code(tmp_path, monkeypatch, force_no_weights_only):
    """Checking an existing file with pickled objects runs none of them (even where torch's env asks for full loads)."""
    if force_no_weights_only:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "code-ran"
    dest = tmp_path / "dest.pth"
    torch.save({**_train_state(), "extra": _Planted(marker)}, dest)
    assert check_export_target(dest, overwrite=True) == dest  # not loadable as weights: not a training checkpoint
    assert not marker.exists()


@pytest.mark.parametrize("state", [
    {"optimizer": {"state": {}}},
    {"method": {"encoder.w": torch.ones(3)}},
    {"w": torch.ones(3)},
], ids=["only-optimizer", "only-method", "a-state-dict"])
def test_a_dict_without_both_method_and_optimizer_is_replaceable(tmp_path, state):
    """A torch file lacking "method" or "optimizer" is not a training checkpoint: --overwrite replaces it."""
    dest = tmp_path / "backbone.pth"
    torch.save(state, dest)
    with pytest.raises(RunDirError, match="already exists"):
        save_export(_bb(), dest)
    assert save_export(_bb(), dest, overwrite=True) == dest
    assert torch.equal(load_checkpoint(dest)["w"], torch.ones(3))


def test_a_zip_or_torch_file_that_does_not_load_as_weights_is_replaceable(tmp_path):
    """A zip that is not a loadable checkpoint (an archive, a torch file of Python objects) is replaced with --overwrite."""
    archive = tmp_path / "archive.pth"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("notes.txt", "hello")
    objects = tmp_path / "objects.pth"
    torch.save({"method": {}, "optimizer": {}, "x": zipfile.ZipInfo("a")}, objects)
    for dest in (archive, objects):
        assert check_export_target(dest, overwrite=True) == dest
        save_export(_bb(), dest, overwrite=True)
        assert torch.equal(load_checkpoint(dest)["w"], torch.ones(3))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_the_export_check_does_not_open_a_named_pipe(tmp_path):
    """An existing named pipe at the destination is refused as an existing file without being opened (no hang)."""
    fifo = tmp_path / "bb.pth"
    os.mkfifo(fifo)
    with deadline(), pytest.raises(RunDirError) as e:
        check_export_target(fifo)
    assert str(e.value) == f"--output {fifo} already exists; pass --overwrite to replace it, or choose another --output."


# ---------------------------------------------------------------- run directories by any of their marks


def _new_checkpoint_name_refused(d):
    for name in ("checkpoint_best.pth", step_name(99)):
        with pytest.raises(RunDirError, match="checkpoint name inside the run directory"):
            save_export(_bb(), d / name)
        assert not (d / name).exists()


def test_a_run_folder_with_only_step_checkpoints_is_a_run_directory(tmp_path):
    """A folder with step checkpoints (no lock marker, no checkpoint.pth: an older run) is a run directory."""
    save_checkpoint(_train_state(), tmp_path / step_name(1))
    _new_checkpoint_name_refused(tmp_path)


def test_a_folder_with_only_the_lock_marker_is_a_run_directory(tmp_path):
    """A run killed before its first checkpoint (only the lock marker) still marks its folder as a run directory."""
    (tmp_path / LOCK_NAME).write_text("{}")
    _new_checkpoint_name_refused(tmp_path)


def test_a_folder_with_only_checkpoint_pth_is_a_run_directory(tmp_path):
    """A folder holding only checkpoint.pth (a copied latest checkpoint) is a run directory."""
    save_checkpoint(_train_state(), tmp_path / "checkpoint.pth")
    _new_checkpoint_name_refused(tmp_path)


def test_a_checkpoint_like_name_in_a_plain_folder_is_allowed(tmp_path):
    """Outside a run directory a new file may be named checkpoint_*.pth (nothing there for --resume to confuse)."""
    (tmp_path / "notes.txt").write_text("x")
    out = save_export(_bb(), tmp_path / "checkpoint_best.pth")
    assert torch.equal(load_checkpoint(out)["w"], torch.ones(3))


# ---------------------------------------------------------------- links at the destination


def test_a_link_to_a_training_checkpoint_is_refused_naming_its_target(run, tmp_path):
    """A destination that is a symlink to a run's checkpoint is refused, even with --overwrite, naming what it points at."""
    link = tmp_path / "bb.pth"
    link.symlink_to(run / step_name(2))
    with pytest.raises(RunDirError) as e:
        save_export(_bb(), link, overwrite=True)
    assert f"(it points at {run / step_name(2)})" in str(e.value) and "is a training checkpoint" in str(e.value)
    assert link.is_symlink() and load_checkpoint(run / step_name(2))["global_step"] == 2


def test_a_link_to_a_renamed_training_checkpoint_is_refused(tmp_path):
    """A symlink whose target is a training checkpoint under a neutral name is refused by content."""
    save_checkpoint(_train_state(), tmp_path / "pretrained.pth")
    (tmp_path / "bb.pth").symlink_to("pretrained.pth")
    with pytest.raises(RunDirError, match=r"is a training checkpoint \(it points at"):
        save_export(_bb(), tmp_path / "bb.pth", overwrite=True)
    assert load_checkpoint(tmp_path / "pretrained.pth")["global_step"] == 1


def test_a_dangling_link_to_a_checkpoint_name_in_a_run_directory_is_refused(run, tmp_path):
    """A dangling symlink whose target would be a new checkpoint file inside a run directory is refused."""
    link = tmp_path / "bb.pth"
    link.symlink_to(run / step_name(99))
    with pytest.raises(RunDirError, match="checkpoint name inside the run directory"):
        save_export(_bb(), link, overwrite=True)
    assert not (run / step_name(99)).exists()


def test_a_dangling_link_at_the_destination_needs_overwrite(tmp_path):
    """An existing (even dangling) symlink at the destination counts as an existing file: --overwrite is needed."""
    link = tmp_path / "bb.pth"
    link.symlink_to(tmp_path / "gone.pth")
    with pytest.raises(RunDirError, match="already exists; pass --overwrite"):
        save_export(_bb(), link)
    assert link.is_symlink()
    save_export(_bb(), link, overwrite=True)
    assert not link.is_symlink() and not (tmp_path / "gone.pth").exists()


def test_the_export_check_names_the_option_in_its_refusals(tmp_path):
    """Export refusals name the option given as ``what`` (``--output`` by default), also through save_export."""
    with pytest.raises(RunDirError, match=r"^--output .* is a folder; give a file name such as .*backbone\.pth"):
        check_export_target(tmp_path)
    with pytest.raises(RunDirError, match=r"^--out-file .* is a folder"):
        check_export_target(tmp_path, what="--out-file")
    with pytest.raises(RunDirError, match=r"^--backbone-out .* is a folder"):
        save_export(_bb(), tmp_path, what="--backbone-out")


def test_load_checkpoint_never_unpickles_code_even_where_torch_is_told_to(tmp_path, monkeypatch):
    """weights_only is passed explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD (and torch < 2.6's default) only change
    the default, so a planted object is refused without running."""
    from mobyssl.errors import CheckpointError
    from mobyssl.train.checkpoint import load_checkpoint

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "code-ran"
    path = tmp_path / "planted.pth"
    torch.save({**_train_state(), "extra": _Planted(marker)}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()
