"""Data sources and augmentations."""

from .datasets import BUNDLED, DataError, FolderDataset, ZipDataset
from .sources import open_dataset
from .transforms import MultiView, eval_transform, linear_train_transform, moby_transform

__all__ = [
    "BUNDLED", "DataError", "FolderDataset", "ZipDataset", "open_dataset",
    "MultiView", "eval_transform", "linear_train_transform", "moby_transform",
]
