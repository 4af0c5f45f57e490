"""A failed checkpoint write is one CheckpointWriteError naming the file, the reason and (disk full) the free space,
found however deep the OSError sits in the exception chain; other errors stay themselves."""

import errno
import io

import pytest
import torch
from helpers import deadline

from mobyssl.train import checkpoint as ckpt_mod
from mobyssl.train.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint

_real_open = open
_FIX = "; free disk space or choose another location"


def _state(step=1):
    return {"global_step": step, "w": torch.full((1000,), float(step))}


def _failing_open(err: OSError):
    """An ``open`` whose ``.tmp`` files fail every write with ``err`` (a disk that reports it)."""

    class FailingFile(io.FileIO):
        def write(self, data):
            raise err

    def fake_open(file, mode="r", *args, **kwargs):
        if str(file).endswith(".tmp") and "w" in mode:
            return FailingFile(file, "w")
        return _real_open(file, mode, *args, **kwargs)

    return fake_open


def _free(monkeypatch, free):
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: type("Usage", (), {"free": free})())


def test_an_io_error_message_names_file_and_reason_without_a_detail(tmp_path, monkeypatch):
    """An I/O error (not a full disk) reads exactly "cannot write <file>: <reason>; <fix>", with no empty "()"."""
    save_checkpoint(_state(1), tmp_path / "c.pth")
    monkeypatch.setattr(ckpt_mod, "open", _failing_open(OSError(errno.EIO, "Input/output error")), raising=False)
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(_state(2), tmp_path / "c.pth")
    assert e.value.errno == errno.EIO and e.value.filename == str(tmp_path / "c.pth")
    assert str(e.value) == f"cannot write {tmp_path / 'c.pth'}: Input/output error{_FIX}"
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "c.pth")["global_step"] == 1 and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("free, shown", [(512, "512 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (3 * 2**20 + 2**19, "3.5 MiB"),
                                         (2**30 // 4, "256.0 MiB"), (5 * 2**40, "5120.0 GiB")])
def test_a_full_disk_message_shows_the_free_space_in_binary_units(tmp_path, monkeypatch, free, shown):
    """ENOSPC adds "(<free> free in <folder>)" with B / KiB / MiB / GiB units."""
    monkeypatch.setattr(ckpt_mod, "open", _failing_open(OSError(errno.ENOSPC, "No space left on device")),
                        raising=False)
    _free(monkeypatch, free)
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(_state(), tmp_path / "c.pth")
    assert str(e.value) == f"cannot write {tmp_path / 'c.pth'}: No space left on device ({shown} free in {tmp_path}){_FIX}"


def _raising_save(exc):
    def save(obj, f, *a, **kw):
        f.write(b"partial")
        raise exc

    return save


def _wrapped_twice(err: OSError) -> BaseException:
    """``err`` as the implicit context of a ValueError, itself the implicit context of a RuntimeError (a storage
    library that wraps I/O errors in its own exceptions)."""
    try:
        try:
            try:
                raise err
            except OSError:
                raise ValueError("stream closed")
        except ValueError:
            raise RuntimeError("serializer gave up")
    except RuntimeError as e:
        return e


def _wrapped_as_cause(err: OSError) -> BaseException:
    """``err`` only as the explicit ``__cause__`` (no ``__context__``)."""
    e = RuntimeError("serializer gave up")
    e.__cause__ = err
    assert e.__context__ is None
    return e


@pytest.mark.parametrize("make", [_wrapped_twice, _wrapped_as_cause], ids=["context-two-deep", "cause-only"])
def test_an_oserror_anywhere_in_the_chain_is_a_write_failure(tmp_path, monkeypatch, make):
    """A non-OSError raised while saving whose chain (cause or context, any depth) holds an OSError is a write failure."""
    save_checkpoint(_state(1), tmp_path / "c.pth")
    wrapped = make(OSError(errno.EDQUOT, "Disk quota exceeded"))
    monkeypatch.setattr(ckpt_mod.torch, "save", _raising_save(wrapped))
    _free(monkeypatch, 2048)
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(_state(2), tmp_path / "c.pth")
    assert e.value.errno == errno.EDQUOT and e.value.original is wrapped and e.value.__cause__ is wrapped
    assert str(e.value) == f"cannot write {tmp_path / 'c.pth'}: Disk quota exceeded (2.0 KiB free in {tmp_path}){_FIX}"
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "c.pth")["global_step"] == 1 and not list(tmp_path.glob("*.tmp"))


def test_a_cyclic_exception_chain_without_oserror_is_not_a_write_failure(tmp_path, monkeypatch):
    """An error whose context chain loops (and holds no OSError) is re-raised unchanged, promptly."""
    a, b = RuntimeError("tensor bug"), ValueError("inner")
    a.__context__, b.__context__ = b, a
    monkeypatch.setattr(ckpt_mod.torch, "save", _raising_save(a))
    with deadline(), pytest.raises(RuntimeError, match="tensor bug") as e:
        save_checkpoint(_state(), tmp_path / "c.pth")
    assert e.value is a and not isinstance(e.value, OSError)
    assert not list(tmp_path.iterdir())


def test_a_cyclic_exception_chain_holding_an_oserror_is_a_write_failure(tmp_path, monkeypatch):
    """A looping chain that reaches an OSError before it loops still yields that OSError's errno."""
    a, b, c = RuntimeError("outer"), ValueError("inner"), OSError(errno.ENOSPC, "No space left on device")
    a.__context__, b.__context__, c.__context__ = b, c, a
    monkeypatch.setattr(ckpt_mod.torch, "save", _raising_save(a))
    _free(monkeypatch, 0)
    with deadline(), pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(_state(), tmp_path / "c.pth")
    assert e.value.errno == errno.ENOSPC and "(0 B free in" in str(e.value)


def test_the_reason_is_the_errors_own_text_or_else_the_systems(tmp_path, monkeypatch):
    _free(monkeypatch, 10 * 2**30)
    monkeypatch.setattr(ckpt_mod, "open", _failing_open(OSError(errno.EIO, "controller reset")), raising=False)
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(_state(), tmp_path / "c.pth")
    assert str(e.value) == f"cannot write {tmp_path / 'c.pth'}: controller reset{_FIX}"
    monkeypatch.setattr(ckpt_mod, "open", _failing_open(OSError(errno.EIO, "")), raising=False)
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(_state(), tmp_path / "c.pth")
    assert str(e.value) == f"cannot write {tmp_path / 'c.pth'}: Input/output error{_FIX}"


def test_an_error_without_errno_or_text_is_named_by_its_type(tmp_path, monkeypatch):
    _free(monkeypatch, 10 * 2**30)
    monkeypatch.setattr(ckpt_mod, "open", _failing_open(OSError()), raising=False)
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(_state(), tmp_path / "c.pth")
    assert e.value.errno == errno.EIO
    assert str(e.value) == f"cannot write {tmp_path / 'c.pth'}: Input/output error: OSError{_FIX}"


def test_a_stream_failure_with_exactly_the_threshold_free_is_not_a_full_disk(tmp_path, monkeypatch):
    _free(monkeypatch, ckpt_mod._DISK_FULL_BELOW)
    monkeypatch.setattr(ckpt_mod, "open", _failing_open(OSError("stream broke")), raising=False)
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(_state(), tmp_path / "c.pth")
    assert e.value.errno == errno.EIO and "stream broke" in str(e.value)
    _free(monkeypatch, ckpt_mod._DISK_FULL_BELOW - 1)
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(_state(), tmp_path / "c.pth")
    assert e.value.errno == errno.ENOSPC


def test_free_space_that_cannot_be_read_is_left_out_of_the_message(tmp_path, monkeypatch):
    def unreadable(path):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", unreadable)
    monkeypatch.setattr(ckpt_mod, "open", _failing_open(OSError(errno.ENOSPC, "No space left on device")),
                        raising=False)
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(_state(), tmp_path / "c.pth")
    assert str(e.value) == f"cannot write {tmp_path / 'c.pth'}: No space left on device{_FIX}"


def test_a_write_error_built_without_detail_shows_none():
    assert str(CheckpointWriteError(errno.EIO, "Input/output error", "f.pth")) == \
        f"cannot write f.pth: Input/output error{_FIX}"


def _torch_save_that_hides_the_oserror(method: str):
    """A ``torch.save`` like the C++ writers of some PyTorch versions: the stream's OSError (from ``write`` or
    ``flush``) becomes a RuntimeError that neither names nor chains it."""

    def save(obj, f, *a, **kw):
        failed = []
        for call in (lambda: f.write(b"first"), lambda: f.write(b"second")) if method == "write" else (f.flush,):
            try:
                call()
            except OSError:
                failed.append(True)
        if failed:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . something went wrong")

    return save


@pytest.mark.parametrize("method", ["write", "flush"])
def test_a_disk_error_hidden_by_torch_is_recovered_from_the_stream(tmp_path, monkeypatch, method):
    calls = []

    class FailingFile(io.FileIO):
        """Its stream fails: first with ENOSPC, then with EIO (write); once, with ENOSPC (flush)."""

        def write(self, data):
            calls.append("write")
            raise OSError(errno.ENOSPC, "No space left on device") if calls.count("write") == 1 else \
                OSError(errno.EIO, "Input/output error")

        def flush(self):
            calls.append("flush")
            if method == "flush" and calls.count("flush") == 1:
                raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "open", lambda file, mode="r", *a, **k: FailingFile(file, mode.replace("b", "")),
                        raising=False)
    monkeypatch.setattr(ckpt_mod.torch, "save", _torch_save_that_hides_the_oserror(method))
    _free(monkeypatch, 512)
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(_state(), tmp_path / "c.pth")
    assert e.value.errno == errno.ENOSPC  # the first error of the stream, not a later one
    assert str(e.value) == f"cannot write {tmp_path / 'c.pth'}: No space left on device (512 B free in {tmp_path}){_FIX}"
    assert isinstance(e.value.original, RuntimeError)
