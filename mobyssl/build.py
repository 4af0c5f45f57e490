"""Config -> objects. The one place that unpacks the run config into plain constructor arguments."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .config import Config
from .data import DataError, eval_transform, open_dataset
from .data.datasets import check_labelled_splits
from .data.sampler import GlobalBatchSampler
from .data.shards import ShardStreamSampler, TarShards, open_stream_shards
from .data.training import TrainingDataset
from .methods import Method, get_method
from .models import create_backbone

STREAM_SEED_STRIDE = 1_000_000_007  # process r's shards draw augmentations from seed + r * this


def backbone_fn(cfg: Config):
    """``(drop_path_rate, multi_size=False) -> backbone`` with the run's name, image size, norm variant and kwargs
    bound; ``multi_size``: the backbone also takes crops of other sizes (multi-crop methods)."""

    def make(drop_path_rate: float, multi_size: bool = False):
        return create_backbone(cfg.model.backbone, img_size=cfg.data.image_size, drop_path_rate=drop_path_rate,
                               norm_before_mlp=cfg.model.norm_before_mlp, multi_size=multi_size,
                               **cfg.model.kwargs)

    return make


def build_backbone(cfg: Config, drop_path_rate: float = 0.0):
    return backbone_fn(cfg)(drop_path_rate)


def build_method(cfg: Config) -> Method:
    return get_method(cfg.method.name).from_config(cfg, backbone_fn(cfg))


def build_train_dataset(cfg: Config, rank: int = 0, world: int = 1) -> TrainingDataset:
    """``data.train`` with the method's augmentation, indexed by ``(epoch, index)`` keys. WebDataset shards are
    this process's own shards (``rank`` of ``world``), whose samples get their own augmentation seeds."""
    transform = get_method(cfg.method.name).train_transform(cfg)
    shards = open_stream_shards(cfg.data.train, rank, world)
    if shards is not None:
        return TrainingDataset(shards, transform, seed=cfg.train.seed + STREAM_SEED_STRIDE * rank,
                               jpeg_draft=cfg.data.jpeg_draft)
    return TrainingDataset(open_dataset(cfg.data.train, key="data.train"), transform, seed=cfg.train.seed,
                           jpeg_draft=cfg.data.jpeg_draft)


def build_train_sampler(cfg: Config, dataset: TrainingDataset, batch_per_rank: int):
    """The pre-training order of ``dataset`` (from ``build_train_dataset``) on this process: a stream of its own
    shards, or this process's part of each global batch of a seeded permutation. Every process calls it."""
    from . import distributed as D

    images = dataset.dataset
    if isinstance(images, TarShards):
        steps = min(D.gather_objects(len(images) // batch_per_rank))  # the same number of steps on every process
        return ShardStreamSampler(images.shard_sizes, batch_per_rank, steps, seed=cfg.train.seed, rank=D.rank(),
                                  buffer=cfg.data.shuffle_buffer)
    return GlobalBatchSampler(len(dataset), batch_per_rank, seed=cfg.train.seed, rank=D.rank(),
                              world_size=D.world_size(), yield_epoch=True)


def build_eval_datasets(cfg: Config, train_transform=None):
    """(memory/train split, test split) for k-NN and linear probing; both must be labeled."""
    if not cfg.data.test:
        raise DataError("data.test is not set: evaluation needs a labeled test split "
                        "(data.test=<ImageFolder dir or zip>).")
    tf = eval_transform(cfg.data.image_size, cfg.data.eval_crop_ratio, cfg.data.normalization)
    train_key = "data.eval_train" if cfg.data.eval_train else "data.train"
    train = open_dataset(cfg.data.eval_train or cfg.data.train, train_transform or tf, key=train_key)
    test = open_dataset(cfg.data.test, tf, key="data.test")
    check_labelled_splits(train, train_key, test, "evaluation")
    return train, test


def make_loader(dataset, batch_size: int, num_workers: int, device: torch.device, shuffle: bool = False,
                drop_last: bool = False, generator: torch.Generator | None = None, sampler=None,
                collate_fn=None) -> DataLoader:
    if hasattr(dataset, "prepare"):
        dataset.prepare()  # before the workers fork: they share what it builds (the CPU views' hue tables)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                      sampler=sampler, num_workers=num_workers, pin_memory=device.type == "cuda",
                      drop_last=drop_last, generator=generator, persistent_workers=num_workers > 0,
                      collate_fn=collate_fn or getattr(dataset, "collate", None))


def device_loader(cfg: Config, dataset, sampler, batch_size: int, device: torch.device):
    """``data.pipeline=gpu_decode`` or ``gpu_resident``: the method's views made on ``device`` per batch."""
    from . import distributed as D

    augment = get_method(cfg.method.name).device_transform(cfg)
    if cfg.train.compile and device.type == "cuda" and hasattr(augment, "compile"):
        augment.compile()
    if cfg.data.pipeline == "gpu_resident":
        from .data.resident import ResidentImages, ResidentLoader

        limit = int(0.25 * torch.cuda.get_device_properties(device).total_memory) if device.type == "cuda" else None
        resident = ResidentImages(dataset, cfg.data.image_size, device, max_bytes=limit,
                                  max_bad_fraction=cfg.data.max_bad_fraction)
        return ResidentLoader(resident, sampler, batch_size, augment, seed=cfg.train.seed, rank=D.rank())
    from .data.device_decode import DeviceDecodeLoader, EncodedDataset, collate_encoded

    loader = make_loader(EncodedDataset(dataset), batch_size, cfg.data.num_workers, torch.device("cpu"),
                         drop_last=True, sampler=sampler, collate_fn=collate_encoded,
                         generator=torch.Generator().manual_seed(cfg.train.seed))
    return DeviceDecodeLoader(loader, sampler, augment, device, dataset.source, seed=cfg.train.seed, rank=D.rank())
