"""``SkipUnreadable``: readable images pass through with an empty key; an unreadable one becomes a black placeholder
through the dataset's transform, labelled ``IGNORE_LABEL`` and keyed by its file, reported on stderr once per file."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from mobyssl.errors import DataError
from mobyssl.eval.features import IGNORE_LABEL, SkipUnreadable


class Files:
    """A dataset of three files, ``b.png`` unreadable; ``transform`` and ``unreadable`` only when given."""

    keys = ["a.png", "b.png", "c.png"]

    def __init__(self, transform=None, unreadable=None):
        if transform is not None:
            self.transform = transform
        if unreadable is not None:
            self.unreadable = unreadable

    def __len__(self):
        return 3

    def __getitem__(self, i):
        if self.keys[i] == "b.png":
            raise DataError(f"cannot read image '{self.keys[i]}'")
        return f"image {i}", i


def test_readable_images_pass_through_with_an_empty_key():
    """A readable item is the dataset's own ``(image, label)`` with ``""`` as its key."""
    ds = SkipUnreadable(Files())
    assert len(ds) == 3
    assert ds[0] == ("image 0", 0, "")
    assert ds[2] == ("image 2", 2, "")


def test_an_unreadable_image_becomes_a_black_32px_placeholder_keyed_by_its_file(capsys):
    """Without a transform the placeholder is a black 32x32 RGB image, labelled IGNORE_LABEL, keyed by the file."""
    image, label, key = SkipUnreadable(Files())[1]
    assert label == IGNORE_LABEL == -100 and key == "b.png"
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    assert not np.asarray(image).any()
    assert "skipping unreadable image: cannot read image 'b.png'" in capsys.readouterr().err


def test_the_placeholder_goes_through_the_datasets_transform():
    """With a transform the placeholder is ``transform(black image)``: the shape of the dataset's other images."""
    seen = []

    def transform(img):
        seen.append((img.mode, img.size, np.asarray(img).any()))
        return torch.full((3, 4, 4), 7.0)

    image, label, key = SkipUnreadable(Files(transform=transform))[1]
    assert seen == [("RGB", (32, 32), False)]
    assert torch.equal(image, torch.full((3, 4, 4), 7.0)) and (label, key) == (IGNORE_LABEL, "b.png")


def test_the_placeholders_transform_leaves_the_random_streams_as_they_were():
    """A random transform on the placeholder draws from forked streams: the other images' augmentations don't move."""

    def transform(img):
        return torch.rand(1).item() + random.random()

    random.seed(1)
    torch.manual_seed(1)
    SkipUnreadable(Files(transform=transform))[1]
    after = (random.random(), torch.rand(1).item())
    random.seed(1)
    torch.manual_seed(1)
    assert after == (random.random(), torch.rand(1).item())


def test_each_unreadable_file_is_reported_once(capsys):
    """Reading the same unreadable file again (the next epoch) does not repeat the message."""
    ds = SkipUnreadable(Files())
    assert ds[1][2] == ds[1][2] == "b.png"
    assert capsys.readouterr().err.count("skipping unreadable image") == 1
    assert ds.reported == {"b.png"}


@pytest.mark.parametrize("known, printed", [(["b.png"], 0), (["z.png"], 1)])
def test_files_the_runner_already_knows_unreadable_are_not_reported_again(capsys, known, printed):
    """Keys in ``dataset.unreadable`` (found by an earlier evaluation) are not printed; other files are."""
    ds = SkipUnreadable(Files(unreadable=known))
    assert ds[1][1:] == (IGNORE_LABEL, "b.png")
    assert capsys.readouterr().err.count("skipping unreadable image") == printed
    assert ds.reported == {*known, "b.png"}
