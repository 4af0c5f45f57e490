"""``run_knn`` / ``run_linear`` wire a run's config into the evaluations.

Each config value must reach the function that uses it, features must come from the right split under the
asked autocast dtype, the full probe must train on augmented, drop-last, seeded batches, and the skipped
counts must be filled per split. Recorders wrap the real evaluation functions (they call through), so every
result here is the real one; only the arguments are looked at on the way.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import tinted_split

from mobyssl import distributed as D
from mobyssl.build import build_backbone, build_eval_datasets, make_loader
from mobyssl.data import DataError, linear_train_transform
from mobyssl.data.sampler import GlobalBatchSampler
from mobyssl.eval import runner
from mobyssl.eval.features import SkipUnreadable, extract_features
from mobyssl.eval.knn import knn_classify
from mobyssl.eval.runner import check_unreadable, run_knn, run_linear
from mobyssl.models.last_blocks import LastBlocksFeatures

CPU = torch.device("cpu")
# Every value differs from its default, so a value that does not reach its function changes what it gets.
KNOBS = ["knn.k=[3, 5]", "knn.temperature=0.5", "linear.epochs=2", "linear.batch_size=8", "linear.lr=0.3",
         "linear.lr_ref_batch=64", "linear.momentum=0.8", "linear.weight_decay=0.01", "train.seed=7",
         "data.normalization=cifar10", "data.max_bad_fraction=0.1"]


def record_calls(monkeypatch, module, name: str) -> list[dict]:
    """Replace ``module.name`` by a wrapper that calls the real function and records its arguments by name
    (defaults filled in, so an argument left out shows up as its default)."""
    real = getattr(module, name)
    calls: list[dict] = []

    def wrapper(*args, **kwargs):
        bound = inspect.signature(real).bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.fixture
def setup(tiny_cfg, tmp_path):
    """(config factory, backbone) on 3 classes: a bank of 8 images per class and a test split of 5 per class,
    each split with one unreadable file."""
    bank = tinted_split(tmp_path / "bank", 8, 0, bad=("b/broken.png",))
    test = tinted_split(tmp_path / "test", 5, 1, bad=("c/broken.png",))

    def cfg(*more):
        return tiny_cfg(f"data.eval_train={bank}", f"data.test={test}", *KNOBS, *more)

    torch.manual_seed(0)
    backbone = build_backbone(cfg()).eval()
    return cfg, backbone


def features(cfg, backbone, ds, amp_dtype):
    """What the runner should embed, computed without it: every readable image of ``ds``, in order."""
    loader = make_loader(SkipUnreadable(ds), cfg.knn.batch_size, 0, CPU)
    return extract_features(backbone, loader, CPU, amp_dtype)


def test_run_knn_passes_the_configs_k_temperature_and_classes_and_bf16_features(setup, monkeypatch):
    make_cfg, backbone = setup
    cfg = make_cfg()
    bank, test = build_eval_datasets(cfg)
    bank_feats, bank_labels = features(cfg, backbone, bank, torch.bfloat16)
    test_features, test_labels = features(cfg, backbone, test, torch.bfloat16)
    assert not torch.equal(bank_feats, features(cfg, backbone, bank, None)[0])  # the dtype is visible
    assert bank_feats.shape[0] == 24 and test_features.shape[0] == 15

    calls = record_calls(monkeypatch, runner, "knn_classify")
    skipped: dict = {}
    result = run_knn(cfg, backbone, CPU, torch.bfloat16, skipped=skipped)

    (call,) = calls
    assert torch.equal(call["train_features"], bank_feats) and torch.equal(call["train_labels"], bank_labels)
    assert torch.equal(call["test_features"], test_features) and torch.equal(call["test_labels"], test_labels)
    assert (list(call["ks"]), call["temperature"], call["num_classes"]) == ([3, 5], 0.5, 3)
    assert result == knn_classify(bank_feats, bank_labels, test_features, test_labels, [3, 5], 0.5, num_classes=3)
    assert skipped == {"data.eval_train": 1, "data.test": 1}


def test_run_knn_uses_the_datasets_it_is_given(setup, monkeypatch):
    make_cfg, backbone = setup
    cfg = make_cfg()
    bank, test = build_eval_datasets(cfg)
    builds = record_calls(monkeypatch, runner.build, "build_eval_datasets")
    calls = record_calls(monkeypatch, runner, "knn_classify")
    run_knn(cfg, backbone, CPU, datasets=(test, bank))  # swapped on purpose: the runner must not re-open
    assert builds == []
    assert calls[0]["train_features"].shape[0] == 15 and calls[0]["test_features"].shape[0] == 24


def test_fast_linear_probe_gets_the_configs_values_and_bf16_features(setup, monkeypatch):
    make_cfg, backbone = setup
    cfg = make_cfg("linear.mode=fast")
    bank, test = build_eval_datasets(cfg)
    bank_feats, bank_labels = features(cfg, backbone, bank, torch.bfloat16)
    test_features, test_labels = features(cfg, backbone, test, torch.bfloat16)

    fast = record_calls(monkeypatch, runner, "linear_probe_fast")
    full = record_calls(monkeypatch, runner, "linear_probe_full")
    lines: list[str] = []
    skipped: dict = {}
    result = run_linear(cfg, backbone, CPU, torch.bfloat16, log=lines.append, skipped=skipped)

    assert full == [] and len(fast) == 1
    call = fast[0]
    assert torch.equal(call["train_feats"], bank_feats) and torch.equal(call["train_labels"], bank_labels)
    assert torch.equal(call["test_feats"], test_features) and torch.equal(call["test_labels"], test_labels)
    got = {k: call[k] for k in ("num_classes", "epochs", "batch_size", "lr", "lr_ref_batch", "momentum",
                                "weight_decay", "seed")}
    assert got == {"num_classes": 3, "epochs": 2, "batch_size": 8, "lr": 0.3, "lr_ref_batch": 64,
                   "momentum": 0.8, "weight_decay": 0.01, "seed": 7}
    assert call["log"] == lines.append and len(lines) == 2  # one line per epoch, to the caller's log
    assert set(result) == {"linear_top1", "linear_top5"}
    assert skipped == {"data.eval_train": 1, "data.test": 1}


def test_full_linear_probe_trains_on_augmented_seeded_drop_last_batches(setup, monkeypatch):
    make_cfg, backbone = setup
    cfg = make_cfg("linear.mode=full", "linear.epochs=1", "linear.batch_size=10")
    _, test = build_eval_datasets(cfg)
    test_features, test_labels = features(cfg, backbone, test, torch.bfloat16)

    fast = record_calls(monkeypatch, runner, "linear_probe_fast")
    full = record_calls(monkeypatch, runner, "linear_probe_full")
    lines: list[str] = []
    skipped: dict = {}
    run_linear(cfg, backbone, CPU, torch.bfloat16, log=lines.append, skipped=skipped)

    assert fast == [] and len(full) == 1
    call = full[0]
    assert call["backbone"] is backbone and call["device"] == CPU and call["amp_dtype"] == torch.bfloat16
    assert torch.equal(call["test_feats"], test_features) and torch.equal(call["test_labels"], test_labels)
    got = {k: call[k] for k in ("num_classes", "epochs", "lr", "lr_ref_batch", "momentum", "weight_decay")}
    assert got == {"num_classes": 3, "epochs": 1, "lr": 0.3, "lr_ref_batch": 64, "momentum": 0.8,
                   "weight_decay": 0.01}
    assert call["log"] == lines.append and len(lines) == 1

    loader = call["train_loader"]
    assert loader.batch_size == 10 and loader.drop_last  # 25 images: 2 full batches, 5 left over
    sampler = loader.sampler
    assert isinstance(sampler, GlobalBatchSampler)
    assert (sampler.seed, sampler.rank, sampler.world_size, sampler.batch_size) == (7, 0, 1, 10)
    train = loader.dataset.dataset
    assert train.key == "data.eval_train" and len(train) == 25
    assert repr(train.transform) == repr(linear_train_transform(cfg.data.image_size, "cifar10"))
    # The unreadable training image is found while training (end of epoch) and counted then.
    assert skipped == {"data.eval_train": 1, "data.test": 1}


def test_full_linear_probe_splits_each_global_batch_over_the_ranks(setup, monkeypatch):
    """Rank 2 of 4 takes a quarter of each global batch, at least one image (the probe itself is not run, and
    ``rank`` / ``world_size`` are what the runner is told, without a process group)."""
    make_cfg, backbone = setup
    monkeypatch.setattr(D, "rank", lambda: 2)
    monkeypatch.setattr(D, "world_size", lambda: 4)
    seen = []
    monkeypatch.setattr(runner, "linear_probe_full", lambda *a, **k: seen.append(a[1]) or {})
    for batch_size, per_rank in ((12, 3), (3, 1)):
        skipped: dict = {}
        run_linear(make_cfg("linear.mode=full", f"linear.batch_size={batch_size}"), backbone, CPU, skipped=skipped)
        sampler = seen[-1].sampler
        assert (sampler.rank, sampler.world_size, sampler.batch_size, sampler.seed) == (2, 4, per_rank, 7)
        assert seen[-1].batch_size == per_rank
        # The training split's count starts at 0: its unreadable images are found while the probe trains.
        assert skipped == {"data.eval_train": 0, "data.test": 1}


class _Plain:
    """A dataset-like object without a ``key`` (a user's own), with or without a ``source``."""

    def __init__(self, n, source=None):
        self.n = n
        if source is not None:
            self.source = source

    def __len__(self):
        return self.n


def test_check_unreadable_names_a_split_without_a_key_by_its_source():
    skipped: dict = {}
    check_unreadable(_Plain(10, source="/data/mine"), ["x.png"], 0.5, skipped)
    check_unreadable(_Plain(10), [], 0.5, skipped)
    assert skipped == {"/data/mine": 1, "dataset": 0}


class _Split(_Plain):
    key = "data.test"

    def __init__(self, n):
        super().__init__(n, source="/data/test")
        self.unreadable: set[str] = set()


def test_check_unreadable_lists_the_first_ten_files_then_the_count(capfd):
    ds = _Split(100)
    check_unreadable(ds, [f"f{i:02d}.png" for i in range(10)], 0.5)
    err = capfd.readouterr().err
    assert err.strip().endswith("evaluation: " + ", ".join(f"f{i:02d}.png" for i in range(10)))
    check_unreadable(ds, [f"f{i:02d}.png" for i in range(11)], 0.5)
    err = capfd.readouterr().err
    assert err.strip().endswith(", ".join(f"f{i:02d}.png" for i in range(10)) + " ... (11 in all)")
    assert ds.unreadable == {f"f{i:02d}.png" for i in range(11)}


def test_check_unreadable_stops_only_past_the_fraction_and_names_an_all_unreadable_split(capfd):
    skipped: dict = {}
    check_unreadable(_Split(10), ["a.png"], 0.1, skipped)  # exactly the fraction: left out, goes on
    assert skipped == {"data.test": 1} and "1 of 10 images could not be read" in capfd.readouterr().err
    with pytest.raises(DataError, match=r"2 of 10 images could not be read \(20.0% > data.max_bad_fraction=0.1\)"):
        check_unreadable(_Split(10), ["a.png", "b.png"], 0.1)
    with pytest.raises(DataError, match="none of its 2 images could be read"):
        check_unreadable(_Split(2), ["a.png", "b.png"], 1.0)


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_linear_probe_on_the_last_blocks_gets_their_concatenated_features(setup, monkeypatch, mode):
    make_cfg, backbone = setup
    cfg = make_cfg(f"linear.mode={mode}", "linear.epochs=1", "linear.n_last_blocks=2")
    _, test = build_eval_datasets(cfg)
    blocks = LastBlocksFeatures(backbone, 2)
    expected, _ = features(cfg, blocks, test, torch.bfloat16)
    assert expected.shape[1] == 2 * backbone.num_features
    calls = record_calls(monkeypatch, runner, f"linear_probe_{mode}")
    lines: list[str] = []
    result = run_linear(cfg, backbone, CPU, torch.bfloat16, log=lines.append)
    assert lines[0] == f"linear probe on the pooled outputs of the last 2 blocks ({2 * backbone.num_features} features)"
    (call,) = calls
    torch.testing.assert_close(call["test_feats"], expected, rtol=0, atol=0)
    if mode == "full":
        assert isinstance(call["backbone"], LastBlocksFeatures) and call["backbone"].backbone is backbone
        assert call["backbone"].n == 2
    else:
        assert call["train_feats"].shape[1] == 2 * backbone.num_features
    assert set(result) == {"linear_top1", "linear_top5"}
