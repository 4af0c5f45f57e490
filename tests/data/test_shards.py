"""WebDataset tar shards: brace patterns, the header index, reading by seeking, the pre-training stream order."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch
from helpers import add_member as _add
from helpers import bundled_images, write_shards

from mobyssl.build import build_train_dataset, build_train_sampler
from mobyssl.config import load_config
from mobyssl.data import open_dataset
from mobyssl.data.shards import ShardStreamSampler, TarShards, expand_braces, open_stream_shards, shard_paths
from mobyssl.errors import DataError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10"


# -- brace patterns and what names shards ------------------------------------------------------------------

def test_brace_ranges_pad_like_their_bounds_and_lists_multiply():
    assert expand_braces("a-{0000..0002}.tar") == ["a-0000.tar", "a-0001.tar", "a-0002.tar"]
    assert expand_braces("a-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar"]
    assert expand_braces("a-{2..0}") == ["a-2", "a-1", "a-0"]
    assert expand_braces("{x,y}/s{0..1}.tar") == ["x/s0.tar", "x/s1.tar", "y/s0.tar", "y/s1.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(DataError, match=r"'\{abc\}' is neither a range"):
        expand_braces("a-{abc}.tar")
    with pytest.raises(DataError, match="unbalanced braces"):
        expand_braces("a-{0..3.tar", key="data.test")


def test_a_pattern_names_its_missing_shards(tmp_path):
    write_shards(tmp_path, [2, 2])
    found = shard_paths(str(tmp_path / "train-{0000..0001}.tar"))
    assert found == [tmp_path / "train-0000.tar", tmp_path / "train-0001.tar"]
    with pytest.raises(DataError) as e:
        open_dataset(str(tmp_path / "train-{0000..0003}.tar"), key="data.test")
    assert "data.test=" in str(e.value) and "2 of the 4 shards" in str(e.value)
    assert str(tmp_path / "train-0002.tar") in str(e.value)
    with pytest.raises(DataError, match=r"none of the 2 shards it names exist.*first missing: .*val-0\.tar"):
        open_dataset(str(tmp_path / "val-{0..1}.tar"))


def test_a_folder_of_tars_is_shards_unless_it_holds_images_or_folders(tmp_path):
    paths = write_shards(tmp_path / "shards", [1, 2, 3])
    assert shard_paths(str(tmp_path / "shards")) == paths
    assert shard_paths(str(paths[0])) == [paths[0]]
    (tmp_path / "shards" / "photo.jpg").write_bytes(bundled_images(1)[0][1])
    assert shard_paths(str(tmp_path / "shards")) is None  # an image folder that also holds tars
    gz = tmp_path / "data.tar.gz"
    gz.write_bytes(b"\x1f\x8b" + b"0" * 100)
    with pytest.raises(DataError, match="compressed tar file: shards are read by seeking"):
        open_dataset(str(gz))


# -- the index and reading -------------------------------------------------------------------------------

def test_shards_index_keys_labels_and_read_the_exact_bytes(tmp_path):
    paths = write_shards(tmp_path, [3, 4])
    ds = open_dataset(str(tmp_path / "train-{0000..0001}.tar"), key="data.test")
    expected = bundled_images(7)
    assert isinstance(ds, TarShards) and len(ds) == 7 and ds.shard_sizes == [3, 4]
    assert ds.keys == [k for k, _, _ in expected] and ds.labels == [c for _, _, c in expected]
    assert ds.has_labels and ds.classes == [str(i) for i in range(max(ds.labels) + 1)] and not ds.named_classes
    for i, (_, data, _) in enumerate(expected):
        assert ds.read_bytes(i) == data
    assert ds.describe(5) == f"'{expected[5][0]}' in {paths[1]}"
    img, label = ds[6]
    assert img.size == (32, 32) and label == expected[6][2]
    assert ds.summary() == "7 images in 2 shards"


def test_samples_without_images_are_left_out_and_jpg_is_preferred(tmp_path):
    path = tmp_path / "mixed.tar"
    (_, jpg, _), (_, other, _) = bundled_images(2)
    with tarfile.open(path, "w") as tf:
        _add(tf, "a.png", other)  # two images in one sample: the .jpg is the one used
        _add(tf, "a.jpg", jpg)
        _add(tf, "b.json", b"{}")  # no image: not a sample
        _add(tf, "README", b"no extension")
        _add(tf, "dir/c.seg.png", other)
        _add(tf, "dir/c.jpeg", jpg)
    ds = TarShards([path])
    assert ds.keys == ["a", "dir/c"] and ds.read_bytes(0) == jpg and ds.read_bytes(1) == jpg
    assert not ds.has_labels and ds.labels == [-1, -1] and ds.classes == []


def test_unlabelled_shards_cannot_be_evaluated_and_labelled_ones_match_a_zip_by_class_count(tmp_path, tiny_cfg):
    from mobyssl.build import build_eval_datasets

    write_shards(tmp_path / "u", [4], labels=False)
    cfg = tiny_cfg(f"data.eval_train={tmp_path / 'u'}")
    with pytest.raises(DataError, match=r"data.eval_train=.* has no class folders \(or .cls labels, for shards\)"):
        build_eval_datasets(cfg)
    write_shards(tmp_path / "l", [30])
    train, test = build_eval_datasets(tiny_cfg(f"data.eval_train={tmp_path / 'l'}"))
    assert len(train.classes) == len(test.classes) == 10 and train.classes != test.classes
    write_shards(tmp_path / "few", [3])  # classes 0, 3 and 6: indices up to 6, not the test split's 10 classes
    with pytest.raises(DataError, match=r"different classes \(7 vs 10"):
        build_eval_datasets(tiny_cfg(f"data.eval_train={tmp_path / 'few'}"))


def test_bad_shards_are_named_with_the_fix(tmp_path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar" * 100)
    with pytest.raises(DataError) as e:
        open_dataset(str(garbage), key="data.eval_train")
    assert f"data.eval_train={garbage}" in str(e.value) and "cannot be read as a tar file" in str(e.value)
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w") as tf:
        _add(tf, "a.txt", b"hello")
    with pytest.raises(DataError, match=r"no sample holds an image.*<key>\.jpg and <key>\.cls"):
        open_dataset(str(empty))
    bad_label = tmp_path / "label.tar"
    with tarfile.open(bad_label, "w") as tf:
        _add(tf, "a.jpg", bundled_images(1)[0][1])
        _add(tf, "a.cls", b"cat")
    with pytest.raises(DataError, match=r"member 'a.cls' of shard .*label.tar holds b'cat', not a class index"):
        open_dataset(str(bad_label))


def test_a_shard_cut_short_or_damaged_is_refused_before_work_and_one_cut_later_names_the_image(tmp_path):
    (path,) = write_shards(tmp_path, [3])
    data = path.read_bytes()
    ds = TarShards([path])
    offset = ds._where[2][1]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: offset + 100])  # the last image loses its tail: found by the index, before training
    with pytest.raises(DataError, match=rf"shard {cut} is damaged after 5 members \(unexpected end of data\)"):
        TarShards([cut])
    broken = tmp_path / "broken.tar"
    header = ds._where[1][1] - 512  # the second image's header
    broken.write_bytes(data[:header] + b"\x01" * 512 + data[header + 512:])  # its checksum fails
    with pytest.raises(DataError, match=rf"shard {broken} is damaged after 2 members \(a header at byte {header} "):
        TarShards([broken])
    cut.write_bytes(data)
    later = TarShards([cut])
    cut.write_bytes(data[: offset + 100])  # cut after it was indexed (a copy still running?)
    assert later.read_bytes(0) == ds.read_bytes(0)
    with pytest.raises(DataError, match=rf"'{ds.keys[2]}' in {cut}: the shard ends .* bytes into it"):
        later.read_bytes(2)


@pytest.mark.skipif(not (SHARED / "sample-train.tar").exists(), reason="needs ../shared/data/cifar10")
def test_the_shared_sample_shards_hold_the_bundled_sample():
    tar = open_dataset(str(SHARED / "sample-train.tar"))
    zipped = open_dataset("bundled:cifar10-sample-train")
    assert len(tar) == len(zipped) == 1000
    by_name = {f"train_{k.replace('/', '_').removesuffix('.jpg')}": i for i, k in enumerate(zipped.keys)}
    for i in range(0, 1000, 97):
        j = by_name[tar.keys[i]]
        assert tar.read_bytes(i) == zipped.read_bytes(j) and tar.labels[i] == zipped.labels[j]


# -- the pre-training stream -----------------------------------------------------------------------------

def test_the_stream_reads_each_shard_front_to_back_in_a_shuffled_shard_order():
    s = ShardStreamSampler([3, 4, 2], batch_size=3, steps_per_epoch=3, seed=1, buffer=1)
    orders = {tuple(s.order(e)) for e in range(6)}
    runs = {(0, 1, 2), (3, 4, 5, 6), (7, 8)}
    for order in orders:
        assert sorted(order) == list(range(9))
        cuts, start = [], 0  # cut into consecutive runs of one shard each
        for size in (len(r) for r in sorted(runs, key=lambda r: order.index(r[0]))):
            cuts.append(order[start:start + size])
            start += size
        assert set(cuts) == runs
    assert len(orders) > 1  # the shard order changes with the epoch


def test_the_shuffle_buffer_mixes_within_its_window_only():
    sizes = [50, 50, 50, 50]
    s = ShardStreamSampler(sizes, batch_size=10, steps_per_epoch=20, seed=0, buffer=16)
    plain = ShardStreamSampler(sizes, batch_size=10, steps_per_epoch=20, seed=0, buffer=1)
    for epoch in range(3):
        order, stream = s.order(epoch), plain.order(epoch)  # the same shard order: the same rng draws first
        assert sorted(order) == list(range(200)) and order != stream
        arrival = {i: p for p, i in enumerate(stream)}
        # A sample leaves the window no earlier than ... it arrived minus the window, and only after arriving.
        assert all(arrival[i] <= p + 15 for p, i in enumerate(order))
    # Each step, every sample in the window leaves with chance 1/16: a sample waits 16 arrivals on average.
    big = ShardStreamSampler([250] * 4, batch_size=10, steps_per_epoch=100, seed=0, buffer=16)
    order, stream = big.order(0), ShardStreamSampler([250] * 4, 10, 100, seed=0, buffer=1).order(0)
    arrival = {i: p for p, i in enumerate(stream)}
    waits = [p + 16 - arrival[i] for p, i in enumerate(order[:-16])]
    assert min(waits) >= 1 and 14 < sum(waits) / len(waits) < 18
    assert s.order(0) == ShardStreamSampler(sizes, 10, 20, seed=0, buffer=16).order(0)
    assert s.order(0) != ShardStreamSampler(sizes, 10, 20, seed=0, rank=1, buffer=16).order(0)
    assert s.order(0) != ShardStreamSampler(sizes, 10, 20, seed=2, buffer=16).order(0)


def test_the_stream_resumes_mid_epoch_and_cuts_to_whole_batches():
    s = ShardStreamSampler([7, 6], batch_size=4, steps_per_epoch=3, seed=3, buffer=5)
    s.set_epoch(2)
    full = list(s)
    assert len(full) == len(s) == 12 and {e for e, _ in full} == {2} and len({i for _, i in full}) == 12
    s.set_epoch(2, start_step=2)
    assert list(s) == full[8:] and len(s) == 4


def test_each_process_opens_only_its_own_shards_and_all_agree_on_the_steps(tmp_path):
    write_shards(tmp_path, [5, 3, 4, 2, 6])
    spec = str(tmp_path)
    mine = [open_stream_shards(spec, rank, 2) for rank in (0, 1)]
    assert [p.name for p in mine[0].paths] == ["train-0000.tar", "train-0002.tar", "train-0004.tar"]
    assert [p.name for p in mine[1].paths] == ["train-0001.tar", "train-0003.tar"]
    assert mine[0].summary() == "15 images in 3 shards (process 0 of 2: its own 3 of 5 shards)"
    assert open_stream_shards(str(tmp_path / "elsewhere.zip")) is None
    with pytest.raises(DataError, match=r"has 5 shards for 8 processes: every process reads its own shards"):
        open_stream_shards(spec, 0, 8)


def test_process_shards_get_their_own_augmentation_seeds(tmp_path, monkeypatch):
    from mobyssl import distributed as D

    write_shards(tmp_path, [8, 8])
    cfg = load_config("quickstart", [f"data.train={tmp_path}", "train.batch_size=4", "data.shuffle_buffer=3"])
    datasets = [build_train_dataset(cfg, rank, 2) for rank in (0, 1)]
    assert datasets[0].seed == cfg.train.seed and datasets[1].seed != datasets[0].seed
    counts = iter([[8 // 2, 8 // 2]])
    monkeypatch.setattr(D, "gather_objects", lambda n: next(counts))
    sampler = build_train_sampler(cfg, datasets[0], 2)
    assert isinstance(sampler, ShardStreamSampler) and sampler.steps_per_epoch == 4 and sampler.buffer == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_the_batches_do_not_depend_on_the_number_of_workers(tmp_path, workers):
    from mobyssl.build import make_loader

    write_shards(tmp_path, [10, 14])
    cfg = load_config("quickstart", [f"data.train={tmp_path}", "data.shuffle_buffer=5"])
    dataset = build_train_dataset(cfg)
    sampler = build_train_sampler(cfg, dataset, 6)
    sampler.set_epoch(1)

    def batches(n):
        loader = make_loader(dataset, 6, n, torch.device("cpu"), drop_last=True, sampler=sampler,
                             generator=torch.Generator().manual_seed(0))
        return [views for views, _, _ in loader]

    a, b = batches(0), batches(workers)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))


def test_the_image_size_limit_applies_to_shards_and_can_be_raised(tmp_path, monkeypatch):
    from mobyssl.data import datasets as datasets_module

    write_shards(tmp_path, [2])
    ds = open_dataset(str(tmp_path))
    size = len(ds.read_bytes(0))
    monkeypatch.setattr(datasets_module, "MAX_IMAGE_BYTES", size - 1)
    with pytest.raises(DataError, match=rf"'{ds.keys[0]}' in .*train-0000.tar.*MAX_IMAGE_BYTES"):
        ds.read_bytes(0)
    monkeypatch.setattr(datasets_module, "MAX_IMAGE_BYTES", size)
    assert len(ds.read_bytes(0)) == size
