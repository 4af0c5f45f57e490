"""Pictures during pre-training (SiT's reconstructions): written as PNGs, without touching the trajectory."""

import torch
from helpers import metrics_records, tinted_split
from PIL import Image
from torch import nn

from mobyssl.config import load_config
from mobyssl.methods import SiT
from mobyssl.methods.base import Method
from mobyssl.models import create_backbone
from mobyssl.train.trainer import pretrain, write_pictures


class _Noisy(Method):
    """Draws random numbers and runs a BatchNorm in its pictures, to see that neither leaks into training."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.modes = []

    def pictures(self, views):
        self.modes.append(self.training)
        torch.rand(100)
        self.bn(torch.randn(4, 3))
        return {"noise": torch.rand(3, 8, 8), "flat": torch.full((3, 4, 4), 0.5)}


def test_write_pictures_restores_the_random_state_and_the_mode_and_writes_pngs(tmp_path):
    method = _Noisy().train()
    stats = method.bn.running_mean.clone()
    torch.manual_seed(0)
    expected_next = torch.rand(5)
    torch.manual_seed(0)
    written = write_pictures(method, [torch.zeros(2, 3, 8, 8)], tmp_path / "pictures", 7)
    assert torch.equal(torch.rand(5), expected_next)  # the RNG is where it was
    assert method.modes == [False] and method.training  # drawn in eval mode, train mode back
    assert torch.equal(method.bn.running_mean, stats)  # eval mode: no BatchNorm statistics moved
    assert sorted(p.name for p in written) == ["flat_epoch00007.png", "noise_epoch00007.png"]
    flat = Image.open(tmp_path / "pictures" / "flat_epoch00007.png")
    assert flat.size == (4, 4) and flat.getpixel((0, 0)) == (128, 128, 128)


def test_a_method_without_pictures_writes_nothing(tmp_path):
    class Quiet(Method):
        pass

    assert write_pictures(Quiet(), [torch.zeros(1, 3, 4, 4)], tmp_path / "pictures", 0) == []
    assert not (tmp_path / "pictures").exists()


def test_sit_pictures_show_clean_corrupted_reconstruction_and_mask_rows():
    torch.manual_seed(0)
    m = SiT(lambda dpr: create_backbone("vit_nano_patch4_32", depth=1), out_dim=8, hidden_dim=16,
            normalization=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))).eval()
    views = [torch.randn(3, 3, 32, 32).clamp(-2, 2), torch.randn(3, 3, 32, 32)]
    grid = m.pictures(views, n=2)["reconstruction"]
    assert grid.shape == (3, 4 * 34 + 2, 2 * 34 + 2)  # 4 rows of 2 images of 32 px, 2 px padding
    first = grid[:, 2:34, 2:34]
    torch.testing.assert_close(first, views[0][0] * 0.25 + 0.5)  # the clean view, in its own colours
    mask = grid[:, 3 * 34 + 2:4 * 34, 2:34]
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and 0.2 < mask.mean() < 0.8


def test_sit_run_writes_a_picture_per_epoch_and_the_trajectory_does_not_depend_on_it(tmp_path, tiny_overrides):
    tiny = [o for o in tiny_overrides if not o.startswith(("method.", "train.batch_size"))]
    images = tinted_split(tmp_path / "images", 8, 0)  # 24 small images: 2 steps of 12 per epoch

    def run(name, every):
        cfg = load_config("sit_quickstart", [*tiny, f"output_dir={tmp_path / name}", "train.batch_size=12",
                                             f"data.train={images}", f"data.test={images}",
                                             "method.hidden_dim=32", "method.out_dim=16", "train.epochs=2",
                                             "train.max_steps=3", "train.knn_every=-1", f"train.pictures_every={every}"])
        pretrain(cfg)
        return [r["loss"] for r in metrics_records(tmp_path / name)]

    with_pictures, without = run("with", 1), run("without", 0)
    assert with_pictures == without and len(with_pictures) == 3  # 2 steps per epoch: the third starts epoch 1
    assert sorted(p.name for p in (tmp_path / "with" / "pictures").iterdir()) == [
        "reconstruction_epoch00000.png", "reconstruction_epoch00001.png"]
    assert not (tmp_path / "without" / "pictures").exists()
