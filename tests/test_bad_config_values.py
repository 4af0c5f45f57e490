"""Every config field of every command, fed bad values through the command line (property-based).

The fields come from the config's own declarations (methods' options included), so a field added later is
covered without editing this file. For each field, hypothesis draws values from the usual kinds of bad
input: nan and infinities, wrong types, empty strings, huge numbers (refused everywhere), and negative
numbers, zero, an existing folder and a missing path (legitimate for some fields). A refused value must end
with exit code 2 and one line that names the field, never a traceback; an accepted one must pass the
command's ``--dry-run`` (config, data, model and output checks) with exit code 0.
"""

from __future__ import annotations

import json
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobyssl.cli import main
from mobyssl.config import METHOD_OPTIONS, Config, iter_field_infos, method_names

TINY = ["data.num_workers=0", "model.backbone=vit_nano_patch4_32", "model.kwargs={depth: 1}",
        "method.proj_hidden_dim=16", "method.pred_hidden_dim=16", "method.proj_dim=8", "method.queue_size=64",
        "train.batch_size=32", "knn.batch_size=128"]


def _fields():
    seen = {}
    for name in method_names():
        for key, _, info in iter_field_infos(Config(method=METHOD_OPTIONS[name]())):
            seen.setdefault(key, info)
    return sorted(seen.items())


FIELDS = _fields()


def _base(tp):
    """The field's type without Annotated and Optional: int, float, bool, str, list, dict or Literal."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return _base(args[0])
    return typing.get_origin(tp) or tp


def _yaml(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


NON_FINITE = st.sampled_from([".nan", ".inf", "-.inf", "nan", "inf", "-inf", "Infinity", "1e999"])
HUGE = st.one_of(st.integers(10**13, 10**40), st.floats(1e13, 1e300)).map(_yaml)
NEGATIVE = st.one_of(st.integers(-10**9, -1), st.floats(-1e9, -1e-9)).map(_yaml)
ZERO = st.sampled_from(["0", "0.0", "-0.0"])
EMPTY = st.sampled_from(["", "''", "' '"])


def _strategies(kind, tmp_dir: str):
    """(always bad, maybe bad) value strategies for a field of type ``kind``."""
    folder = st.just(tmp_dir)
    missing = st.just(tmp_dir + "/missing/path")
    text = st.text(alphabet="abcxyz_", min_size=1, max_size=8).map(lambda s: "x" + s)
    mapping = st.just("{a: 1}")
    if kind in (int, float):
        always = st.one_of(NON_FINITE, HUGE, EMPTY, text, mapping, st.just("[1, 2]"), st.sampled_from(["true", "off"]))
        maybe = st.one_of(NEGATIVE, ZERO, st.just("-1"), st.just("1"))
        if kind is int:
            always = st.one_of(always, st.just("2.5"))
    elif kind is bool:
        always = st.one_of(NON_FINITE, EMPTY, text, mapping, st.just("[1]"), st.just("2.5"))
        maybe = st.sampled_from(["true", "false", "0", "1"])
    elif kind is list:
        always = st.one_of(NON_FINITE.map(lambda v: f"[{v}, {v}]"), HUGE.map(lambda v: f"[{v}, {v}]"),
                           EMPTY, text, mapping, st.just("3"), st.just("[]"), st.just("[abc, 1]"))
        maybe = st.one_of(NEGATIVE.map(lambda v: f"[{v}, 0.5]"), st.just("[0, 0]"), st.just("[1, 1, 1, 1, 1]"))
    elif kind is dict:
        always = st.one_of(NON_FINITE, text, st.just("[1, 2]"), st.just("3"))
        maybe = st.one_of(st.just("{}"), st.just("{depth: -1}"), st.just("{no_such_arg: 1}"))
    else:  # str and Literal
        always = st.one_of(EMPTY, mapping, st.just("[1, 2]"))
        maybe = st.one_of(folder, missing, text, NON_FINITE, NEGATIVE, ZERO, HUGE)
    return always, maybe


def _command(command: str, tmp_path, key: str, value: str) -> list[str]:
    run = ["--dry-run", *TINY, f"output_dir={tmp_path / 'run'}", f"{key}={value}"]
    if command == "pretrain":
        return ["pretrain", *run]
    return [command, "--random-init", "--config", "quickstart", *run]


def _check(capsys, argv, key, must_refuse):
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, (argv, err)
    if code == 0:
        assert not must_refuse, f"{argv[-1]} was accepted: {out}"
        assert "dry run" in out
        return
    assert code == 2, (argv, code, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    # The message names the field: its dotted key, or the section for a value that is not a section.
    named = [key, key.rsplit(".", 1)[0] + "." if "." in key else key]
    assert any(n in lines[0] for n in named), (argv[-1], lines[0])


@pytest.mark.parametrize("command", ["pretrain", "knn", "linear"])
@pytest.mark.parametrize("key,info", FIELDS, ids=[k for k, _ in FIELDS])
@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_bad_values_are_refused_with_one_line_naming_the_field(command, key, info, data, tmp_path, capsys):
    always, maybe = _strategies(_base(info.annotation), str(tmp_path))
    value = data.draw(always, label="always bad")
    _check(capsys, _command(command, tmp_path, key, value), key, must_refuse=True)
    value = data.draw(maybe, label="maybe bad")
    _check(capsys, _command(command, tmp_path, key, value), key, must_refuse=False)


def test_the_sweep_covers_every_declared_field():
    keys = {k for k, _ in FIELDS}
    assert {"train.lr", "train.min_lr", "method.proj_dim", "output_dir", "data.aug.crop_scale", "knn.k",
            "linear.lr_ref_batch", "train.seed", "train.device", "train.betas", "model.kwargs"} <= keys
    assert len(keys) >= 60
