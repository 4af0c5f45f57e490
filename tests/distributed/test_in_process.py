"""Fast, in-process checks of ``mobyssl.distributed`` (the slow 2-process gloo runs stay in this folder).

Three tools, none of them a stand-in for the code under test:

* ``group``: a real one-process gloo group, so every helper takes its distributed branch against real
  ``torch.distributed`` calls (argument checks, world size 1).
* ``Peers``: simulated ranks. Each rank runs the helper under test in its own thread; ``dist.get_rank`` and
  ``dist.get_world_size`` answer per thread and the collectives the module uses (all_gather,
  all_gather_object, all_reduce, broadcast_object_list) exchange data between the threads the way the real
  ones exchange it between processes, with the same argument checks. Every rank runs the same code, so what
  a peer sends is what this code sends; a rank that skips a collective fails the test instead of hanging.
* Recording fakes for ``dist.init_process_group``, ``torch.cuda.set_device`` and ``DistributedDataParallel``
  where the real call would wait for other processes or need a GPU.
"""

from __future__ import annotations

import datetime
import inspect
import pickle
import threading
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.parallel

from mobyssl import distributed as D
from mobyssl.errors import CheckpointError, ConfigError

CPU = torch.device("cpu")
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_group():
    assert not dist.is_initialized()
    yield


@pytest.fixture
def group():
    """A real gloo process group of one process (rank 0 of 1), destroyed afterwards."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


class Peers:
    """``world`` simulated ranks in threads of this process, on top of the real one-process ``group``."""

    TIMEOUT = 5.0

    def __init__(self, world: int, monkeypatch):
        self.world = world
        self.local = threading.local()
        self.cond = threading.Condition()
        self.rounds: dict[int, dict[int, tuple]] = {}
        self.failed = False
        monkeypatch.setattr(dist, "get_rank", lambda group=None: self.local.rank)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: self.world)
        monkeypatch.setattr(dist, "all_gather", self.all_gather)
        monkeypatch.setattr(dist, "all_gather_object", self.all_gather_object)
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)
        monkeypatch.setattr(dist, "broadcast_object_list", self.broadcast_object_list)

    def run(self, fn):
        """``fn(rank)`` on every rank at once; ``[(result, exception), ...]`` in rank order."""
        out = [(None, None)] * self.world

        def body(r):
            self.local.rank, self.local.calls = r, 0
            try:
                out[r] = (fn(r), None)
            except Exception as e:  # noqa: BLE001 - reported per rank
                out[r] = (None, e)
                with self.cond:
                    self.failed = True
                    self.cond.notify_all()

        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.TIMEOUT * 2)
            assert not t.is_alive(), "a simulated rank did not finish"
        return out

    def results(self, fn):
        """``fn(rank)`` on every rank; the results in rank order, re-raising the first rank's error."""
        out = self.run(fn)
        for _, e in out:
            if e is not None:
                raise e
        return [r for r, _ in out]

    def _exchange(self, op: str, value):
        """Everyone's ``value`` for this collective, in rank order (each rank's n-th call meets the others')."""
        r, k = self.local.rank, self.local.calls
        self.local.calls += 1
        with self.cond:
            self.rounds.setdefault(k, {})[r] = (op, value)
            self.cond.notify_all()
            self.cond.wait_for(lambda: len(self.rounds[k]) == self.world or self.failed, self.TIMEOUT)
            got = self.rounds[k]
            if len(got) < self.world:
                raise RuntimeError(f"{op}: not every rank joined this collective (a real run would hang)")
        ops = {o for o, _ in got.values()}
        if ops != {op}:
            raise RuntimeError(f"ranks called different collectives together: {sorted(ops)}")
        return [got[i][1] for i in range(self.world)]

    # The collectives, with the argument checks of the real ones.
    def all_gather(self, tensor_list, tensor, group=None, async_op=False):
        if not isinstance(tensor, torch.Tensor) or not isinstance(tensor_list, list):
            raise TypeError("all_gather(tensor_list, tensor) takes a list of tensors and a tensor")
        if len(tensor_list) != self.world:
            raise ValueError(f"all_gather: {len(tensor_list)} outputs for a world of {self.world}")
        got = self._exchange("all_gather", tensor.detach().clone())
        for out, t in zip(tensor_list, got):
            if out.shape != t.shape or out.dtype != t.dtype or out.device != t.device:
                raise RuntimeError(f"all_gather: output {tuple(out.shape)} {out.dtype} for input "
                                   f"{tuple(t.shape)} {t.dtype}")
        for out, t in zip(tensor_list, got):
            out.copy_(t)

    def all_gather_object(self, object_list, obj, group=None):
        got = self._exchange("all_gather_object", pickle.dumps(obj))
        for i, data in enumerate(got):
            object_list[i] = pickle.loads(data)

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError("all_reduce takes a tensor")
        reduce = {dist.ReduceOp.SUM: lambda s: s.sum(0), dist.ReduceOp.MAX: lambda s: s.max(0).values}
        if op not in reduce:
            raise TypeError(f"all_reduce: op {op!r} not simulated")
        got = self._exchange("all_reduce", tensor.detach().clone())
        tensor.copy_(reduce[op](torch.stack(got)))

    def broadcast_object_list(self, object_list, src=None, group=None, device=None, group_src=None):
        src = 0 if src is None else src
        if not 0 <= src < self.world:
            raise RuntimeError(f"broadcast: invalid root rank: {src}")
        got = self._exchange("broadcast_object_list", pickle.dumps(list(object_list)))
        if self.local.rank != src:
            object_list[:] = pickle.loads(got[src])


@pytest.fixture
def peers(group, monkeypatch):
    return lambda world: Peers(world, monkeypatch)


# --- rank and world size -------------------------------------------------------------------------------


def test_one_process_without_a_group(no_group):
    assert D.is_distributed() is False
    assert D.world_size() == 1 and D.rank() == 0 and D.is_main_process() is True


def test_one_process_group(group):
    assert D.is_distributed() is True
    assert D.world_size() == 1 and D.rank() == 0 and D.is_main_process() is True


def test_rank_and_world_size_of_each_peer(peers):
    got = peers(3).results(lambda r: (D.rank(), D.world_size(), D.is_main_process()))
    assert got == [(0, 3, True), (1, 3, False), (2, 3, False)]


# --- torchrun detection and process-group set-up ---------------------------------------------------------


@pytest.fixture
def env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, v)

    return set_env


@pytest.mark.parametrize("values, expected", [
    ({}, False),
    ({"RANK": "0"}, False),  # WORLD_SIZE defaults to 1
    ({"WORLD_SIZE": "2"}, False),  # no RANK
    ({"RANK": "0", "WORLD_SIZE": "1"}, False),
    ({"RANK": "0", "WORLD_SIZE": "2"}, True),
    ({"RANK": "1", "WORLD_SIZE": "2"}, True),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, True),
])
def test_launched_by_torchrun(env, values, expected):
    env(**values)
    assert D.launched_by_torchrun() is expected


@pytest.fixture
def fake_init(monkeypatch, env):
    """Records ``dist.init_process_group`` and ``torch.cuda.set_device`` calls instead of making them."""
    calls = {"init": [], "set_device": []}

    def init_process_group(backend=None, **kwargs):
        calls["init"].append((backend, kwargs))

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls["set_device"].append(device))
    return calls


@pytest.mark.parametrize("values", [{}, {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}])
@pytest.mark.parametrize("device", [CPU, torch.device("cuda", 0)])
def test_init_distributed_alone_changes_nothing(no_group, fake_init, env, values, device):
    env(**values)
    assert D.init_distributed(device) == device
    assert fake_init == {"init": [], "set_device": []}


@pytest.mark.parametrize("local_rank", [None, "1"])
def test_init_distributed_on_cpu_joins_gloo(no_group, fake_init, env, local_rank):
    env(RANK="1", WORLD_SIZE="2", **({} if local_rank is None else {"LOCAL_RANK": local_rank}))
    assert D.init_distributed(CPU) == CPU
    assert fake_init["init"] == [("gloo", {"timeout": datetime.timedelta(minutes=30)})]
    assert fake_init["set_device"] == []


@pytest.mark.parametrize("local_rank, expected", [(None, 0), ("0", 0), ("1", 1), ("3", 3)])
@pytest.mark.parametrize("given", [torch.device("cuda"), torch.device("cuda", 0)])
def test_init_distributed_on_gpus_uses_local_rank_and_nccl(no_group, fake_init, env, local_rank, expected, given):
    env(RANK=str(expected), WORLD_SIZE="4", **({} if local_rank is None else {"LOCAL_RANK": local_rank}))
    device = D.init_distributed(given)
    assert device == torch.device("cuda", expected) and device.index == expected
    assert fake_init["set_device"] == [torch.device("cuda", expected)]
    assert fake_init["init"] == [("nccl", {"timeout": datetime.timedelta(minutes=30),
                                           "device_id": torch.device("cuda", expected)})]


@pytest.mark.parametrize("given, expected", [(CPU, CPU), (torch.device("cuda"), torch.device("cuda", 1))])
def test_init_distributed_joins_only_once(group, fake_init, env, given, expected):
    env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")
    assert D.init_distributed(given) == expected
    assert fake_init["init"] == []


# --- same config on every rank ---------------------------------------------------------------------------


def test_diff_keys_equal():
    assert D._diff_keys({}, {}) == []
    assert D._diff_keys({"a": 1, "b": {"c": [1, 2]}}, {"b": {"c": [1, 2]}, "a": 1}) == []
    assert D._diff_keys(3, 3) == [] and D._diff_keys(None, None) == []


def test_diff_keys_names_every_difference_sorted_and_dotted():
    a = {"z": 1, "a": 1, "same": 5, "m": {"y": 1, "x": 2, "deep": {"k": 1, "eq": 0}}, "only_a": 1}
    b = {"z": 2, "a": 2, "same": 5, "m": {"y": 1, "x": 3, "deep": {"k": 2, "eq": 0}}, "only_b": None}
    # only_b is None on one side and missing on the other: no difference for the config dump either.
    assert D._diff_keys(a, b) == ["a", "m.deep.k", "m.x", "only_a", "z"]
    assert D._diff_keys(b, a) == ["a", "m.deep.k", "m.x", "only_a", "z"]


def test_diff_keys_dict_against_value_and_missing_keys():
    assert D._diff_keys({"a": {"b": 1}}, {"a": 3}) == ["a"]
    assert D._diff_keys({"a": 3}, {"a": {"b": 1}}) == ["a"]
    assert D._diff_keys({"a": {"b": 1}}, {}) == ["a"]
    assert D._diff_keys({}, {"a": {"b": 1, "c": 2}}) == ["a"]
    assert D._diff_keys({"x": {"only": 1}}, {"y": {"only": 1}}) == ["x", "y"]
    assert D._diff_keys(1, 2) == [""] and D._diff_keys({"a": 1}, 2) == [""]


def test_diff_keys_keeps_key_names_verbatim():
    assert D._diff_keys({"X": 1, ".a.": {"lr.X": 1}}, {"X": 2, ".a.": {"lr.X": 2}}) == [".a..lr.X", "X"]
    assert D._diff_keys({" k ": 1}, {" k ": 2}) == [" k "]


def test_check_same_config_alone_is_a_no_op(no_group):
    D.check_same_config({"a": 1})


def test_check_same_config_one_process_group(group):
    D.check_same_config({"a": 1, "b": {"c": [1, 2]}})


def test_check_same_config_passes_for_equal_configs_in_any_key_order(peers):
    configs = [{"a": 1, "b": {"x": 1, "y": [1, 2]}}, {"b": {"y": [1, 2], "x": 1}, "a": 1},
               {"b": {"x": 1, "y": [1, 2]}, "a": 1}]
    assert peers(3).results(lambda r: D.check_same_config(configs[r])) == [None, None, None]


def test_check_same_config_fails_on_every_rank_naming_ranks_and_keys(peers):
    base = {"train": {"lr": 0.1, "batch_size": 32}, "seed": 0, "model": "vit"}
    configs = [base, {**base, "train": {"lr": 0.5, "batch_size": 32}, "seed": 1}, base,
               {**base, "model": "swin"}]
    out = peers(4).run(lambda r: D.check_same_config(configs[r]))
    for _, e in out:
        assert isinstance(e, ConfigError)
        msg = str(e)
        assert "ranks [1, 3] were started with a config that differs from rank 0's" in msg
        assert "(keys: seed, train.lr)" in msg  # rank 1's differences, the first rank that differs


def test_check_same_config_names_at_most_five_keys(peers):
    a = {k: 0 for k in "abcdefg"}
    out = peers(2).run(lambda r: D.check_same_config(a if r == 0 else {k: 1 for k in "gfedcba"}))
    for _, e in out:
        assert isinstance(e, ConfigError) and "ranks [1]" in str(e) and "(keys: a, b, c, d, e)" in str(e)


def test_check_same_config_when_rank_0_is_the_odd_one(peers):
    out = peers(3).run(lambda r: D.check_same_config({"n": 1} if r == 0 else {"n": 2, "extra": {"k": 1}}))
    for _, e in out:
        assert isinstance(e, ConfigError) and "ranks [1, 2]" in str(e) and "(keys: extra, n)" in str(e)


# --- errors found on rank 0 raised everywhere ------------------------------------------------------------


class Check:
    def __init__(self, error=None):
        self.error, self.calls, self.lock = error, [], threading.Lock()

    def __call__(self):
        with self.lock:
            self.calls.append(D.rank())
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize("setup", ["no_group", "group"])
def test_on_main_then_agree_in_one_process(request, setup):
    request.getfixturevalue(setup)
    check = Check()
    assert D.on_main_then_agree(check) is None
    assert check.calls == [0]
    original = CheckpointError("bad checkpoint: start fresh")
    with pytest.raises(CheckpointError) as info:
        D.on_main_then_agree(Check(original))
    assert info.value is original  # rank 0 raises the very error, with its traceback


@pytest.mark.parametrize("setup", ["no_group", "group"])
def test_on_main_then_agree_lets_other_errors_through(request, setup):
    request.getfixturevalue(setup)
    with pytest.raises(KeyError):
        D.on_main_then_agree(Check(KeyError("a bug")))


def test_on_main_then_agree_runs_the_check_on_rank_0_only(peers):
    check = Check()
    assert peers(3).results(lambda r: D.on_main_then_agree(check)) == [None, None, None]
    assert check.calls == [0]


def test_on_main_then_agree_raises_rank_0s_error_everywhere(peers):
    original = ConfigError("output_dir=/x holds another run: pick another one")
    check = Check(original)
    out = peers(3).run(lambda r: D.on_main_then_agree(check))
    assert check.calls == [0]
    assert out[0][1] is original
    for _, e in out[1:]:
        assert type(e) is ConfigError and str(e) == str(original)


def test_on_every_rank_then_agree_returns_each_ranks_own_result(peers):
    assert peers(3).results(lambda r: D.on_every_rank_then_agree(lambda: r * 10)) == [0, 10, 20]


def test_on_every_rank_then_agree_stops_every_rank_with_the_first_failing_ranks_error(peers):
    from mobyssl.errors import DataError

    original = DataError("shard /data/train-0001.tar is damaged after 5 members; re-create it.")

    def open_own_shards(r):
        if r == 1:
            raise original
        return f"shards of {r}"

    out = peers(3).run(lambda r: D.on_every_rank_then_agree(lambda: open_own_shards(r)))
    assert out[1][1] is original  # the failing rank raises its very error
    for r in (0, 2):  # the others do not hang: they raise it too, naming the rank
        assert type(out[r][1]) is DataError and str(out[r][1]) == f"process 1: {original}"


@pytest.mark.parametrize("setup", ["no_group", "group"])
def test_on_every_rank_then_agree_in_one_process_is_a_plain_call(request, setup):
    request.getfixturevalue(setup)
    assert D.on_every_rank_then_agree(lambda: 7) == 7
    with pytest.raises(ConfigError, match="x"):
        D.on_every_rank_then_agree(Check(ConfigError("x")))


# --- gathering -------------------------------------------------------------------------------------------


def _rows(rank: int, n: int, dtype=torch.float32) -> torch.Tensor:
    """Rows no padding can look like: (rank*100 + i + 1, -(rank*100 + i + 1), 0.5)."""
    ids = torch.arange(n, dtype=torch.float64) + rank * 100 + 1
    return torch.stack([ids, -ids, torch.full_like(ids, 0.5)], dim=1).to(dtype)


@pytest.mark.parametrize("gather", [D.gather_no_grad, D.gather_variable])
def test_gathers_alone_return_the_tensor(no_group, gather):
    x = torch.randn(4, 3, requires_grad=True)
    assert gather(x) is x


@pytest.mark.parametrize("gather", [D.gather_no_grad, D.gather_variable])
@pytest.mark.parametrize("x", [_rows(0, 4), _rows(0, 1), torch.arange(5), _rows(0, 3, torch.float64)[:, 1:]],
                         ids=["rows", "one row", "int64 1-D", "float64 non-contiguous"])
def test_gathers_in_a_one_process_group(group, gather, x):
    y = gather(x.requires_grad_() if x.is_floating_point() else x)
    assert y is not x and y.dtype == x.dtype and y.shape == x.shape and torch.equal(y, x.detach())
    assert not y.requires_grad


def test_gather_no_grad_concatenates_in_rank_order(peers):
    got = peers(3).results(lambda r: D.gather_no_grad(_rows(r, 2).requires_grad_()))
    expected = torch.cat([_rows(r, 2) for r in range(3)])
    for y in got:
        assert y.shape == (6, 3) and torch.equal(y, expected) and not y.requires_grad


@pytest.mark.parametrize("sizes", [(3, 2), (2, 3), (0, 2), (3, 0), (1, 1), (3, 1, 2), (1, 4, 1)],
                         ids=lambda s: "-".join(map(str, s)))
def test_gather_variable_drops_padding_keeps_rank_order(peers, sizes):
    got = peers(len(sizes)).results(lambda r: D.gather_variable(_rows(r, sizes[r]).requires_grad_()))
    expected = torch.cat([_rows(r, n) for r, n in enumerate(sizes)])
    for y in got:  # every rank gets every row once, in rank order, no padding
        assert y.shape == (sum(sizes), 3) and torch.equal(y, expected) and not y.requires_grad


def test_gather_variable_keeps_dtype_and_trailing_shape(peers):
    labels = peers(2).results(lambda r: D.gather_variable(torch.arange(3 - r) + 10 * r))
    for y in labels:
        assert y.dtype == torch.int64 and torch.equal(y, torch.tensor([0, 1, 2, 10, 11]))
    maps = peers(2).results(lambda r: D.gather_variable(torch.full((r + 1, 2, 3), r, dtype=torch.float64)))
    for y in maps:
        assert y.dtype == torch.float64 and y.shape == (3, 2, 3)
        assert torch.equal(y[:, 0, 0], torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))


def test_gather_objects(no_group):
    assert D.gather_objects({"a": 1}) == [{"a": 1}]


def test_gather_objects_in_rank_order(peers):
    assert peers(3).results(lambda r: D.gather_objects({"rank": r})) == [[{"rank": r} for r in range(3)]] * 3


def test_gather_objects_one_process_group(group):
    assert D.gather_objects(("x", 1)) == [("x", 1)]


# --- reductions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", [True, False])
def test_any_rank_alone(no_group, flag):
    assert D.any_rank(flag, CPU) is flag


@pytest.mark.parametrize("flag", [True, False])
def test_any_rank_one_process_group(group, flag):
    assert D.any_rank(flag, CPU) is flag


@pytest.mark.parametrize("flags", [(False, False, False), (False, True, False), (True, False, False),
                                   (False, False, True), (True, True, True)])
def test_any_rank_is_true_everywhere_when_true_anywhere(peers, flags):
    assert peers(3).results(lambda r: D.any_rank(flags[r], CPU)) == [any(flags)] * 3


def test_mean_across_ranks(no_group):
    x = torch.tensor([1.0, 3.0])
    assert D.mean_across_ranks(x) is x


def test_mean_across_ranks_one_process_group(group):
    x = torch.tensor([1.0, 3.0])
    y = D.mean_across_ranks(x)
    assert torch.equal(y, x) and torch.equal(x, torch.tensor([1.0, 3.0]))


def test_mean_across_ranks_averages_without_touching_the_input(peers):
    xs = [torch.tensor([1.0, -2.0], requires_grad=True), torch.tensor([3.0, 4.0], requires_grad=True),
          torch.tensor([5.0, 7.0], requires_grad=True)]
    got = peers(3).results(lambda r: D.mean_across_ranks(xs[r] * 1))
    for y in got:
        assert torch.allclose(y, torch.tensor([3.0, 3.0])) and not y.requires_grad
    assert torch.equal(xs[0].detach(), torch.tensor([1.0, -2.0]))


# --- DistributedDataParallel -----------------------------------------------------------------------------


def test_wrap_ddp_is_a_no_op_alone_and_in_a_one_process_group(no_group):
    m = torch.nn.Linear(2, 2)
    assert D.wrap_ddp(m, CPU) is m
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        assert D.wrap_ddp(m, CPU) is m
    finally:
        dist.destroy_process_group()


def test_wrap_ddp_with_several_ranks_real_ddp(group, monkeypatch):
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated argument for this PyTorch
        ddp = D.wrap_ddp(m, CPU)
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and ddp.module is m
    assert ddp.device_ids is None and ddp.forward_sync_buffers is False


class _NewDDP:
    """Records its arguments; the signature of a PyTorch with ``forward_sync_buffers``."""

    def __init__(self, module, device_ids=None, broadcast_buffers=None, forward_sync_buffers=None):
        self.args = dict(module=module, device_ids=device_ids, broadcast_buffers=broadcast_buffers,
                         forward_sync_buffers=forward_sync_buffers)


class _OldDDP:
    """Records its arguments; the signature of a PyTorch before ``forward_sync_buffers``."""

    def __init__(self, module, device_ids=None, broadcast_buffers=True):
        self.args = dict(module=module, device_ids=device_ids, broadcast_buffers=broadcast_buffers)


@pytest.mark.parametrize("ddp, no_sync", [(_NewDDP, {"forward_sync_buffers": False, "broadcast_buffers": None}),
                                          (_OldDDP, {"broadcast_buffers": False})], ids=["new", "old"])
@pytest.mark.parametrize("device, ids", [(CPU, None), (torch.device("cuda", 0), [0]),
                                         (torch.device("cuda", 3), [3])])
def test_wrap_ddp_arguments(group, monkeypatch, ddp, no_sync, device, ids):
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", ddp)
    m = torch.nn.Linear(2, 2)
    wrapped = D.wrap_ddp(m, device)
    assert isinstance(wrapped, ddp)
    assert wrapped.args == {"module": m, "device_ids": ids, **no_sync}


def test_fakes_match_the_real_signatures():
    real = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    assert {"module", "device_ids", "broadcast_buffers"} <= set(real)
