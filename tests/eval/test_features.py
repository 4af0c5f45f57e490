"""Feature extraction: eval-mode outputs with the mode restored, unreadable rows left out, autocast, progress bar."""

import io
import sys

import pytest
import torch
from helpers import KeyedRows
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mobyssl.eval.features import extract_features
from mobyssl.models import create_backbone

CPU = torch.device("cpu")


class ModeDependent(nn.Module):
    """Returns different features in training and eval mode (like dropout / drop path, but deterministic)."""

    num_features = 4

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        f = x.flatten(1)[:, :4] * self.scale
        return f + 100.0 if self.training else f


def _loader(n=10, batch=4, shape=(3, 4, 4)):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, *shape, generator=g)
    labels = torch.arange(n) % 3 + 1
    return DataLoader(TensorDataset(images, labels), batch_size=batch), images, labels


@pytest.mark.parametrize("initially_training", [True, False])
def test_features_are_the_eval_mode_outputs_and_the_mode_is_restored(initially_training):
    backbone = ModeDependent()
    backbone.train(initially_training)
    loader, images, labels = _loader()
    feats, ys = extract_features(backbone, loader, CPU)
    assert backbone.training is initially_training
    assert backbone.modes == [False] * 3  # 10 images in batches of 4
    with torch.no_grad():
        expected = ModeDependent().eval()(images)
    assert torch.equal(feats, expected)
    assert torch.equal(ys, labels) and ys.dtype == torch.int64 and feats.dtype == torch.float32


def test_mode_is_restored_when_the_backbone_fails():
    class FailsOnSecondBatch(ModeDependent):
        def forward(self, x):
            if len(self.modes) == 1:
                raise RuntimeError("boom")
            return super().forward(x)

    backbone = FailsOnSecondBatch().train()
    with pytest.raises(RuntimeError, match="boom"):
        extract_features(backbone, _loader()[0], CPU)
    assert backbone.training


def test_real_dropout_is_off():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Dropout(p=0.9))
    backbone.train()
    loader, images, _ = _loader()
    feats, _ = extract_features(backbone, loader, CPU)
    assert backbone.training and backbone[2].training  # submodules restored too
    with torch.no_grad():
        backbone.eval()
        expected = torch.cat([backbone(images[i:i + 4]) for i in range(0, 10, 4)])
    assert torch.equal(feats, expected)


def test_vit_with_drop_path_gives_deterministic_eval_mode_features():
    torch.manual_seed(0)
    vit = create_backbone("vit_nano_patch4_32", drop_path_rate=0.5, depth=2)
    vit.train()
    loader, images, _ = _loader(n=6, batch=6, shape=(3, 32, 32))
    torch.manual_seed(1)
    first, _ = extract_features(vit, loader, CPU)
    torch.manual_seed(2)  # another drop-path draw, were drop path on
    second, _ = extract_features(vit, loader, CPU)
    assert vit.training
    assert torch.equal(first, second)
    with torch.no_grad():
        vit.eval()
        expected = vit(images)
        vit.train()
        torch.manual_seed(1)
        in_train_mode = vit(images)
    assert torch.equal(first, expected)
    assert not torch.allclose(in_train_mode, expected, atol=1e-3)  # drop path 0.5 does change the features


# --------------------------------------------------------------------------- unreadable images, amp, progress bar


class _Recording(ModeDependent):
    """Records the images each forward sees and whether autocast (and which dtype) was on."""

    def __init__(self):
        super().__init__()
        self.inputs, self.autocast = [], []

    def forward(self, x):
        self.inputs.append(x.clone())
        on = torch.is_autocast_enabled("cpu")
        self.autocast.append((on, torch.get_autocast_dtype("cpu") if on else None))
        return super().forward(x)


def _keyed_loader():
    """12 images in batches of 4: batch 0 has image 1 unreadable, batch 1 is all unreadable, batch 2 is clean."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 4, 4, generator=g)
    labels = torch.arange(12) % 3 + 1
    keys = [""] * 12
    for i in (1, 4, 5, 6, 7):
        keys[i] = f"bad{i}.png"
        labels[i] = -100
        images[i] = 0.0  # the black placeholder
    return DataLoader(KeyedRows(images, labels, keys), batch_size=4), images, labels


@pytest.mark.parametrize("collect", [True, False])
def test_unreadable_images_are_left_out_and_their_keys_collected(collect):
    """Rows with a key never reach the backbone nor the output; the rest keep their order; keys go to ``failed``."""
    loader, images, labels = _keyed_loader()
    good = [0, 2, 3, 8, 9, 10, 11]
    backbone = _Recording()
    failed = [] if collect else None
    feats, ys = extract_features(backbone, loader, CPU, failed=failed)
    if collect:
        assert failed == ["bad1.png", "bad4.png", "bad5.png", "bad6.png", "bad7.png"]
    assert [len(x) for x in backbone.inputs] == [3, 4]  # the all-unreadable batch is skipped, the next one is not
    assert torch.equal(torch.cat(backbone.inputs), images[good])
    with torch.no_grad():
        expected = ModeDependent().eval()(images[good])
    assert torch.equal(feats, expected) and torch.equal(ys, labels[good])
    assert ys.dtype == torch.int64 and feats.dtype == torch.float32


@pytest.mark.parametrize("backbone, dim", [(ModeDependent(), 4), (nn.Flatten(), 0)])
def test_a_loader_of_unreadable_images_only_gives_empty_features(backbone, dim):
    """Nothing readable: ``(0, num_features)`` float32 features (``num_features`` 0 if unknown) and ``(0,)`` int64."""
    images = torch.zeros(4, 3, 4, 4)
    loader = DataLoader(KeyedRows(images, torch.full((4,), -100), ["a", "b", "c", "d"]), batch_size=2)
    failed = []
    feats, ys = extract_features(backbone, loader, CPU, failed=failed)
    assert feats.shape == (0, dim) and feats.dtype == torch.float32
    assert ys.shape == (0,) and ys.dtype == torch.int64
    assert failed == ["a", "b", "c", "d"]


def test_features_run_under_autocast_when_given_an_amp_dtype():
    """With ``amp_dtype`` the backbone runs under autocast on the device; the features come back float32 either way."""
    loader, images, _ = _loader()
    for amp, expected in ((torch.bfloat16, (True, torch.bfloat16)), (None, (False, None))):
        backbone = _Recording()
        feats, _ = extract_features(backbone, loader, CPU, amp_dtype=amp)
        assert backbone.autocast == [expected] * 3, amp
        assert feats.dtype == torch.float32 and feats.shape == (10, 4)
    assert not torch.is_autocast_enabled("cpu")


class _Stream(io.StringIO):
    """A stderr stand-in that says whether it is a terminal."""

    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_on_a_terminal_the_main_process_shows_a_transient_features_bar(monkeypatch):
    """On a terminal: a ``features`` bar counted in batches, erased when done (no line left behind)."""
    err = _Stream(tty=True)
    monkeypatch.setattr(sys, "stderr", err)
    extract_features(ModeDependent(), _loader()[0], CPU)
    out = err.getvalue()
    assert out.startswith("\rfeatures:") and "batch/s" in out
    assert "\n" not in out and out.split("\r")[-2].strip() == ""  # the last thing drawn is a blank line


@pytest.mark.parametrize("tty, main_process", [(False, True), (True, False)])
def test_no_bar_off_a_terminal_or_on_other_ranks(monkeypatch, tty, main_process):
    """No progress bar when stderr is not a terminal (logs) nor on ranks other than the main one."""
    from mobyssl import distributed

    err = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(distributed, "is_main_process", lambda: main_process)
    feats, _ = extract_features(ModeDependent(), _loader()[0], CPU)
    assert err.getvalue() == "" and feats.shape == (10, 4)
