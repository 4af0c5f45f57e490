"""Feature extraction runs the backbone in eval mode (no dropout / drop path) and restores its mode."""

import pytest
import torch
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
