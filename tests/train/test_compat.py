"""What a resume (or an evaluation of a checkpoint) may change: config_changes, check_resume_changes (safe /
schedule / trajectory / architecture, --accept-changes) and check_backbone_fits, on configs alone (no training)."""

from types import SimpleNamespace

import pytest

from mobyssl.config import (
    ARCHITECTURE,
    METHOD_OPTIONS,
    SAFE,
    SCHEDULE,
    TRAJECTORY,
    Config,
    Int,
    MethodOptions,
    Text,
    load_config,
    method_name,
    opt,
    to_dict,
)
from mobyssl.errors import CheckpointError
from mobyssl.train.compat import _MISSING, Change, check_backbone_fits, check_resume_changes, config_changes

CKPT = "runs/x/checkpoint.pth"


@pytest.fixture(scope="module")
def base():
    return load_config("quickstart", [])


def _cfg(*overrides):
    return load_config("quickstart", list(overrides))


def _refused(changes, accept):
    logged = []
    with pytest.raises(CheckpointError) as e:
        check_resume_changes(changes, CKPT, accept, logged.append)
    assert logged == []  # nothing is noted as accepted before a refusal
    return str(e.value)


def _accepted(changes, accept):
    logged = []
    check_resume_changes(changes, CKPT, accept, logged.append)
    return logged


# ---------------------------------------------------------------- config_changes


def test_same_config_has_no_changes(base):
    """A checkpoint's own config (None values included: data.eval_train) gives no change."""
    assert to_dict(base)["data"]["eval_train"] is None
    assert config_changes(to_dict(base), base) == []
    assert config_changes(to_dict(base), _cfg()) == []


def test_every_differing_key_is_listed_sorted_with_old_new_and_kind(base):
    """Each differing key, by its dotted name and in sorted order, with the old and new value and its kind."""
    cfg = _cfg("train.lr=0.01", "train.epochs=60", "model.backbone=vit_tiny_patch16_224", "knn.k=[10]",
               "train.compile=true", "data.aug.flip_prob=0.0", "method.queue_size=512")
    assert config_changes(to_dict(base), cfg) == [
        Change("data.aug.flip_prob", 0.5, 0.0, TRAJECTORY),
        Change("knn.k", [20, 200], [10], SAFE),
        Change("method.queue_size", 256, 512, ARCHITECTURE),
        Change("model.backbone", "vit_nano_patch4_32", "vit_tiny_patch16_224", ARCHITECTURE),
        Change("train.compile", False, True, SAFE),
        Change("train.epochs", 30, 60, SCHEDULE),
        Change("train.lr", 0.005, 0.01, TRAJECTORY),
    ]


def test_model_kwargs_is_one_architecture_key(base):
    """model.kwargs is compared as a whole (one architecture key), not flattened into its entries."""
    cfg = _cfg("model.kwargs={depth: 2}")
    assert config_changes(to_dict(base), cfg) == [Change("model.kwargs", {}, {"depth": 2}, ARCHITECTURE)]
    saved = to_dict(cfg)
    assert config_changes(saved, _cfg("model.kwargs={depth: 3}")) == [
        Change("model.kwargs", {"depth": 2}, {"depth": 3}, ARCHITECTURE)]


def test_keys_the_checkpoint_lacks(base):
    """A key newer than the checkpoint is skipped when safe, listed as (not recorded) otherwise; later keys still count."""
    saved = to_dict(base)
    del saved["data"]["eval_crop_ratio"]  # safe, and sorts before the changed key
    del saved["train"]["max_steps"]  # safe
    del saved["train"]["seed"]  # trajectory
    changes = config_changes(saved, _cfg("train.lr=0.01"))
    assert changes == [Change("train.lr", 0.005, 0.01, TRAJECTORY), Change("train.seed", _MISSING, 0, TRAJECTORY)]
    assert str(changes[1]) == "train.seed (not recorded) -> 0"


def test_a_registered_methods_own_kinds_are_used():
    """A method's options declare their own kinds (a safe method key is not architecture), checked on the config given."""

    class ToyOptions(MethodOptions):
        name: Text = method_name("toy_compat")
        verbosity: Int = opt(1, "A safe method key.", on_resume=SAFE)
        rounds: Int = opt(1, "A schedule method key.", on_resume=SCHEDULE)

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(METHOD_OPTIONS, "toy_compat", ToyOptions)
        saved = to_dict(Config(method=ToyOptions()))
        assert config_changes(saved, Config(method=ToyOptions(verbosity=3, rounds=2))) == [
            Change("method.rounds", 1, 2, SCHEDULE), Change("method.verbosity", 1, 3, SAFE)]
        del saved["method"]["verbosity"]
        assert config_changes(saved, Config(method=ToyOptions(verbosity=3))) == []


def test_change_shows_values_as_json_and_strings_bare():
    """A change reads `key old -> new`: strings bare, other values as JSON (true, null, lists, dicts)."""
    assert str(Change("train.compile", False, True, SAFE)) == "train.compile false -> true"
    assert str(Change("model.backbone", "vit_a", "vit_b", ARCHITECTURE)) == "model.backbone vit_a -> vit_b"
    assert str(Change("data.eval_train", None, "x", SAFE)) == "data.eval_train null -> x"
    assert str(Change("model.kwargs", {}, {"depth": 2}, ARCHITECTURE)) == 'model.kwargs {} -> {"depth": 2}'
    assert str(Change("knn.k", [20, 200], [10], SAFE)) == "knn.k [20, 200] -> [10]"
    assert str(Change("train.seed", _MISSING, 0, TRAJECTORY)) == "train.seed (not recorded) -> 0"


# ---------------------------------------------------------------- check_resume_changes


def test_no_changes_resume_silently():
    """No change: no refusal and nothing logged, with or without --accept-changes."""
    assert _accepted([], False) == [] and _accepted([], True) == []


def test_safe_changes_are_accepted_and_listed_in_one_note(base):
    """Safe changes need no --accept-changes; one note lists each of them with old and new value."""
    changes = config_changes(to_dict(base), _cfg("train.log_every=5", "knn.k=[10]"))
    assert [c.kind for c in changes] == [SAFE, SAFE]
    expected = ["note: changed since the checkpoint (safe): knn.k [20, 200] -> [10]; train.log_every 10 -> 5"]
    assert _accepted(changes, False) == expected
    assert _accepted(changes, True) == expected


@pytest.mark.parametrize("override, kind", [("train.epochs=60", SCHEDULE), ("train.lr=0.01", TRAJECTORY)])
def test_schedule_and_trajectory_changes_are_refused_unless_accepted(base, override, kind):
    """A schedule (train.epochs) or trajectory change is refused without --accept-changes, noted with it."""
    changes = config_changes(to_dict(base), _cfg(override, "train.log_every=5"))
    (change,) = [c for c in changes if c.kind == kind]
    msg = _refused(changes, False)
    assert f"{change} ({kind}: " in msg and CKPT in msg and "--accept-changes" in msg
    assert "train.log_every" not in msg.split("Keys that are safe")[0]  # the safe change is not among the refused
    logged = _accepted(changes, True)
    assert len(logged) == 2 and logged[0].startswith(f"note: accepted change since the checkpoint: {change} (")
    assert logged[1] == "note: changed since the checkpoint (safe): train.log_every 10 -> 5"


def test_refusal_lists_every_change_with_its_kind(base):
    """The refusal names each schedule/trajectory change with old and new value and kind, joined by '; '."""
    changes = config_changes(to_dict(base), _cfg("train.epochs=60", "train.lr=0.01"))
    msg = _refused(changes, False)
    assert "train.epochs 30 -> 60 (schedule: " in msg and "train.lr 0.005 -> 0.01 (trajectory: " in msg
    assert "); train.lr 0.005 -> 0.01 (trajectory: " in msg
    assert len(_accepted(changes, True)) == 2  # one note per accepted change


@pytest.mark.parametrize("accept", [False, True])
def test_architecture_changes_are_refused_even_when_accepted(base, accept):
    """An architecture change is refused even with --accept-changes, naming the key and both values."""
    changes = config_changes(to_dict(base), _cfg("method.queue_size=512", "train.log_every=5"))
    msg = _refused(changes, accept)
    assert "method.queue_size 256 -> 512" in msg and CKPT in msg and "train.log_every" not in msg


def test_accepted_changes_write_config_step_file(base, tmp_path):
    """An accepted change records the new config as config_step<N>.yaml beside the untouched config.yaml."""
    from mobyssl.train.trainer import _write_config

    (tmp_path / "config.yaml").write_text("first")
    point = SimpleNamespace(config=lambda: to_dict(base))
    _write_config(tmp_path, base, point, 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    _write_config(tmp_path, _cfg("train.epochs=60"), point, 7)
    assert (tmp_path / "config.yaml").read_text() == "first"
    assert "epochs: 60" in (tmp_path / "config_step00000007.yaml").read_text()


# ---------------------------------------------------------------- check_backbone_fits


def test_backbone_fits_without_a_recorded_config(base):
    """A checkpoint without a config (None or empty) is not checked."""
    check_backbone_fits(None, base, CKPT)
    check_backbone_fits({}, base, CKPT)


@pytest.mark.parametrize("overrides", [
    [], ["method.queue_size=512"], ["model.drop_path_rate=0.2"], ["train.epochs=60", "train.lr=0.01"]])
def test_backbone_fits_when_only_other_keys_differ(base, overrides):
    """Only architecture keys of the backbone count: method.* heads, model.drop_path_rate, schedules do not."""
    check_backbone_fits(to_dict(base), _cfg(*overrides), CKPT)


@pytest.mark.parametrize("override, listed", [
    ("model.backbone=vit_tiny_patch16_224", "model.backbone vit_nano_patch4_32 -> vit_tiny_patch16_224"),
    ("model.kwargs={depth: 2}", 'model.kwargs {} -> {"depth": 2}'),
    ("data.image_size=64", "data.image_size 32 -> 64"),
])
def test_backbone_shape_changes_are_refused(base, override, listed):
    """model.* architecture keys and data.image_size must match the checkpoint's: refused, naming key and values."""
    with pytest.raises(CheckpointError) as e:
        check_backbone_fits(to_dict(base), _cfg(override, "method.queue_size=512"), CKPT)
    assert listed in str(e.value) and CKPT in str(e.value) and "method.queue_size" not in str(e.value)
