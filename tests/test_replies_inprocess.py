"""Hostile replies from one client, through the real mods and CompressedStrategy on the in-process
grid: the server never raises, the round goes on with the honest clients, and the culprit is
named. Each probe is one of issue findings 1, 3, 8 and 9 (plain and compressed paths, train and
federated evaluation).
"""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, Strategy
from inprocess import InProcessGrid

from fedsqueeze.client.mods import compress_mod, downlink_mod
from fedsqueeze.contracts.records import UPDATE_KEY, to_record
from fedsqueeze.server import CompressedStrategy, CountingGrid
from fedsqueeze.server.rounds import evaluate_round, train_round

N = 4
NODES = [1000 + i for i in range(N)]
HOSTILE = NODES[0]
SHAPES = {"w": (8, 4), "b": (4,)}
STEP = 0.1  # every honest client adds this to every weight


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


Edit = Callable[[RecordDict], RecordDict]


def app(
    train_edit: Edit | None = None,
    eval_edit: Edit | None = None,
    who: tuple[int, ...] = (HOSTILE,),
    inside: bool = False,
) -> ClientApp:
    """Honest clients add STEP to the weights; the outermost mod of the nodes ``who`` edits
    their replies (``inside``: the innermost one, so compress_mod encodes the edited weights)."""

    def hostile(msg: Message, context: Context, call_next: Any) -> Message:
        reply = call_next(msg, context)
        edit = train_edit if msg.metadata.message_type == "train" else eval_edit
        if context.node_id in who and edit is not None and not reply.has_error():
            reply.content = edit(reply.content)
        return reply

    mods = (
        [downlink_mod, compress_mod, hostile] if inside else [hostile, downlink_mod, compress_mod]
    )
    client = ClientApp(mods=mods)

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        local = {k: v.numpy() + STEP for k, v in msg.content["arrays"].items()}
        metrics = MetricRecord({"num-examples": 10, "train-loss": 1.0})
        return Message(RecordDict({"arrays": to_record(local), "metrics": metrics}), reply_to=msg)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": 5, "eval-loss": 0.5, "eval-acc": 0.75})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return client


def _strategy(codec: str = "none", inner: Strategy | None = None, **kw: Any) -> CompressedStrategy:
    inner = inner or FedAvg(fraction_train=1.0, min_train_nodes=N, min_available_nodes=N)
    return CompressedStrategy(inner, codec=codec, **kw)


def train(strategy: CompressedStrategy, client: ClientApp) -> tuple[Any, dict[str, float]]:
    grid = CountingGrid(InProcessGrid(client, N), NODES)
    return train_round(strategy, grid, 1, _global(), 60.0)


def _assert_honest_mean(arrays: dict[str, np.ndarray] | None, atol: float = 1e-5) -> None:
    assert arrays is not None
    for k, v in _global().items():
        np.testing.assert_allclose(arrays[k], v + STEP, atol=atol)


def _npy(header: str, body: bytes) -> bytes:
    text = header.encode("latin1")
    text += b" " * (64 - (10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + body


def _set_array(name: str, array: Array) -> Edit:
    def edit(content: RecordDict) -> RecordDict:
        content["arrays"][name] = array
        return content

    return edit


def _set_metric(**values: Any) -> Edit:
    def edit(content: RecordDict) -> RecordDict:
        metrics = content["metrics"]
        for k, v in values.items():
            if v is None:
                del metrics[k]
            else:
                metrics[k] = v
        return content

    return edit


def _arrays_as_config(content: RecordDict) -> RecordDict:
    return RecordDict({"arrays": ConfigRecord({"w": 1.0}), "metrics": content["metrics"]})


def _scale(factor: float, shift: float = 0.0) -> Edit:
    def edit(content: RecordDict) -> RecordDict:
        arrays = {k: v.numpy() * factor + shift for k, v in content["arrays"].items()}
        content["arrays"] = to_record(arrays)
        return content

    return edit


TRAIN_PROBES: dict[str, Edit] = {
    "arrays-as-config": _arrays_as_config,
    "torch-stype": _set_array("b", Array("float32", (4,), "torch.Tensor", b"\0" * 16)),
    "garbage-npy": _set_array("b", Array("float32", (4,), "numpy.ndarray", b"junk" * 40)),
    "object-dtype": _set_array(
        "b",
        Array(
            "float32",
            (4,),
            "numpy.ndarray",
            _npy("{'descr': '|O', 'fortran_order': False, 'shape': (4,), }", b"\0" * 32),
        ),
    ),
    "2^33-elements": _set_array(
        "b",
        Array(
            "float32",
            (4,),
            "numpy.ndarray",
            _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (8589934592,), }", b"\0" * 16),
        ),
    ),
    "int32": _set_array("b", Array(np.ones(4, np.int32) * 1000)),
    "bool": _set_array("b", Array(np.ones(4, np.bool_))),
    "complex": _set_array("b", Array(np.ones(4, np.complex64) * 1000)),
    "extra-metric": _set_metric(extra=3.0),
    "missing-metric": _set_metric(**{"train-loss": None}),
    "list-train-loss": _set_metric(**{"train-loss": [1.0, 2.0]}),
    "nan-train-loss": _set_metric(**{"train-loss": math.nan}),
    "zero-examples": _set_metric(**{"num-examples": 0}),
    "three-e38": _scale(0.0, 3e38),
}
"""Each crashed the server, corrupted the model or reached Flower's consistency check on main
(except the metric-key probes, which now keep the reply but normalise its metrics)."""

KEPT = {"extra-metric", "missing-metric"}


@pytest.mark.parametrize("probe", list(TRAIN_PROBES))
def test_hostile_train_reply_is_dropped_and_named(probe: str) -> None:
    strategy = _strategy()
    arrays, metrics = train(strategy, app(train_edit=TRAIN_PROBES[probe]))
    _assert_honest_mean(arrays)
    if probe in KEPT:  # usable update; its metrics normalised to the common keys
        assert strategy.stats.accepted == N and strategy.stats.rejected == 0
        assert set(metrics) <= {"num-examples", "train-loss"}
        return
    assert strategy.stats.rejected == 1 and strategy.stats.accepted == N - 1
    assert list(strategy.stats.reasons) == [HOSTILE]
    row: dict[str, Any] = {}
    strategy.after_round(1, row)
    assert row["rejected_updates"] == 1 and str(HOSTILE) in row["rejected_reasons"]
    assert all(math.isfinite(v) for v in metrics.values())


def test_three_e38_without_a_norm_bound_rejects_only_that_client() -> None:
    """Finding 3: the 3e38 client made round 2 non-finite and the honest ones were dropped."""
    strategy = _strategy(max_update_norm=0.0)
    arrays, _ = train(strategy, app(train_edit=_scale(0.0, 3e38)))
    _assert_honest_mean(arrays)
    assert (
        list(strategy.stats.reasons) == [HOSTILE] and "overflow" in strategy.stats.reasons[HOSTILE]
    )


def test_every_reply_with_zero_examples_keeps_the_model_without_dividing_by_zero() -> None:
    strategy = _strategy()
    arrays, _ = train(
        strategy, app(train_edit=_set_metric(**{"num-examples": 0}), who=tuple(NODES))
    )
    assert arrays is None and strategy.stats.rejected == N


def test_compressed_reply_probes_are_dropped() -> None:
    """The same checks on the compressed path: a payload in the wrong record, an oversized one."""

    def as_array(content: RecordDict) -> RecordDict:
        payload = content[UPDATE_KEY]["payload"]
        return RecordDict(
            {
                UPDATE_KEY: ArrayRecord(),
                "metrics": content["metrics"],
                "p": ConfigRecord({"p": payload}),
            }
        )

    def huge(content: RecordDict) -> RecordDict:
        content[UPDATE_KEY]["payload"] = b"\0" * (8 << 20)
        return content

    for edit in (as_array, huge, _set_metric(**{"train-loss": [1.0]})):
        strategy = _strategy("q8")
        arrays, _ = train(strategy, app(train_edit=edit))
        _assert_honest_mean(arrays, atol=2e-3)
        assert list(strategy.stats.reasons) == [HOSTILE]


# ---- bounded influence ---------------------------------------------------------------------
def test_huge_norm_update_is_clipped_to_the_bound() -> None:
    bound = 1.0
    strategy = _strategy(max_update_norm=bound)
    arrays, _ = train(strategy, app(train_edit=_scale(1e6)))
    assert arrays is not None and strategy.stats.clipped == 1 and strategy.stats.accepted == N
    g = _global()
    step = math.sqrt(sum(float(((arrays[k] - g[k]) ** 2).sum()) for k in g))
    honest = STEP * math.sqrt(36)  # each honest update's norm (36 weights)
    assert step <= (3 * honest + bound) / N + 1e-4  # the attacker moved the mean by <= bound/N


def test_relative_bound_clips_the_attacker_to_the_rounds_median_norm() -> None:
    """No absolute bound: the attacker's update counts for at most the median honest one."""
    strategy = _strategy(norm_factor=1.0)
    arrays, _ = train(strategy, app(train_edit=_scale(1e6)))
    assert arrays is not None and strategy.stats.clipped == 1 and strategy.stats.accepted == N
    g = _global()
    step = math.sqrt(sum(float(((arrays[k] - g[k]) ** 2).sum()) for k in g))
    honest = STEP * math.sqrt(36)
    assert step <= (3 * honest + honest) / N + 1e-4


def test_norm_bound_is_the_tighter_one_and_off_under_user_level_dp() -> None:
    strategy = _strategy(max_update_norm=10.0, norm_factor=2.0)
    assert strategy._norm_bound([1.0, 2.0, 100.0]) == 4.0  # 2 x median 2 < 10
    assert strategy._norm_bound([20.0, 30.0, 40.0]) == 10.0
    strategy.private = True  # one client's update would move the others' bound: sensitivity
    assert strategy._norm_bound([1.0, 2.0, 100.0]) == 10.0


def test_huge_claimed_weight_is_capped() -> None:
    """Finding 3: num-examples = 10**12 with a constant model replaced the global outright."""
    strategy = _strategy(max_weight=10)
    arrays, _ = train(
        strategy, app(train_edit=lambda c: _set_metric(**{"num-examples": 10**12})(_scale(0.0)(c)))
    )
    assert arrays is not None
    g = _global()
    for k in g:  # weight 10 like the others: a quarter of the way to zero, not all of it
        np.testing.assert_allclose(arrays[k], (3 * (g[k] + STEP) + 0.0) / 4, atol=1e-5)


@pytest.mark.parametrize("codec", ["none", "q8"])  # q8: the attacker sits inside compress_mod
@pytest.mark.parametrize("robust", [FedMedian, FedTrimmedAvg, Krum])
def test_robust_strategies_under_compression_ignore_the_attacker(codec: str, robust: type) -> None:
    kw: dict[str, Any] = {"num_malicious_nodes": 1} if robust is Krum else {}
    if robust is FedTrimmedAvg:
        kw["beta"] = 0.25
    inner = robust(fraction_train=1.0, min_train_nodes=N, min_available_nodes=N, **kw)
    strategy = _strategy(codec, inner)
    arrays, _ = train(strategy, app(train_edit=_scale(1.0, 50.0), inside=codec != "none"))
    _assert_honest_mean(arrays, atol=2e-3 if codec != "none" else 1e-5)


# ---- federated evaluation (every mode goes through CompressedStrategy.aggregate_evaluate) -----
EVAL_PROBES: dict[str, Edit] = {
    "extra-key": _set_metric(extra=1.0),
    "missing-key": _set_metric(**{"eval-acc": None}),
    "list-value": _set_metric(**{"eval-acc": [1.0, 0.0]}),
    "nan": _set_metric(**{"eval-loss": math.nan}),
    "huge-weight": _set_metric(**{"num-examples": 10**12, "eval-acc": 0.0}),
    "arrays-record": lambda c: RecordDict({**dict(c.items()), "a": to_record(_global())}),
    "config-metrics": lambda c: RecordDict({"metrics": ConfigRecord({"num-examples": 5})}),
}


@pytest.mark.parametrize("probe", list(EVAL_PROBES))
def test_hostile_evaluation_reply_never_crashes_the_round(probe: str) -> None:
    inner = FedAvg(fraction_evaluate=1.0, min_evaluate_nodes=N, min_available_nodes=N)
    strategy = CompressedStrategy(inner, max_weight=5)
    grid = CountingGrid(InProcessGrid(app(eval_edit=EVAL_PROBES[probe]), N), NODES)
    metrics = evaluate_round(strategy, grid, 1, _global(), 60.0)
    assert all(math.isfinite(v) for v in metrics.values())
    if probe == "huge-weight":  # counted as 5 examples like the others
        assert metrics["eval-acc"] == pytest.approx(0.75 * 3 / 4)
    elif probe in ("extra-key", "missing-key"):
        assert metrics["eval-loss"] == pytest.approx(0.5)
    else:
        assert metrics["eval-acc"] == pytest.approx(0.75)
        assert list(strategy.stats.reasons) == [HOSTILE]


def test_evaluation_with_empty_test_slices_is_not_a_division_by_zero() -> None:
    """An honest client whose test slice is empty replies num-examples = 0 and NaN metrics."""
    empty = _set_metric(**{"num-examples": 0, "eval-loss": math.nan, "eval-acc": math.nan})
    inner = FedAvg(fraction_evaluate=1.0, min_evaluate_nodes=1, min_available_nodes=1)
    strategy = CompressedStrategy(inner)
    grid = CountingGrid(InProcessGrid(app(eval_edit=empty), N), NODES)
    assert evaluate_round(strategy, grid, 1, _global(), 60.0)["eval-acc"] == pytest.approx(0.75)
    assert not strategy.stats.reasons  # honest: left out, not blamed
    grid = CountingGrid(InProcessGrid(app(eval_edit=empty), N), [HOSTILE])
    assert evaluate_round(strategy, grid, 1, _global(), 60.0) == {}


# ---- bounded memory (finding 8) ----------------------------------------------------------------
def test_large_unused_record_costs_no_second_copy() -> None:
    """A 64 MiB extra record in one reply: counting and rejecting it allocates < 1 MiB (main
    serialized the whole reply again to count its bytes, and decoded before checking size)."""
    junk = b"\0" * (64 << 20)

    def extra(content: RecordDict) -> RecordDict:
        content["junk"] = ConfigRecord({"x": junk})
        return content

    strategy = _strategy()
    grid = CountingGrid(InProcessGrid(app(train_edit=extra), N), NODES)
    messages = list(strategy.configure_train(1, to_record(_global()), ConfigRecord(), grid))
    replies = list(grid.inner.send_and_receive(messages))  # the replies as they arrive
    tracemalloc.start()
    grid._count_in(replies)
    arrays, _ = strategy.aggregate_train(1, replies)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    _assert_honest_mean(None if arrays is None else {k: v.numpy() for k, v in arrays.items()})
    assert grid.uplink_bytes > len(junk)
    assert "bytes" in strategy.stats.reasons[HOSTILE]
    assert peak < 1 << 20, f"peak {peak} bytes"


def test_large_compressed_payload_is_refused_without_a_copy() -> None:
    """The issue's 300 MiB junk payload (here 64 MiB) in the compressed update record: rejected
    from its size before it is decoded, counting and rejecting it allocates < 1 MiB."""
    junk = b"\0" * (64 << 20)

    def huge(content: RecordDict) -> RecordDict:
        content[UPDATE_KEY]["payload"] = junk
        return content

    strategy = _strategy("q8")
    grid = CountingGrid(InProcessGrid(app(train_edit=huge), N), NODES)
    messages = list(strategy.configure_train(1, to_record(_global()), ConfigRecord(), grid))
    replies = list(grid.inner.send_and_receive(messages))
    tracemalloc.start()
    grid._count_in(replies)
    arrays, _ = strategy.aggregate_train(1, replies)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    _assert_honest_mean(None if arrays is None else {k: v.numpy() for k, v in arrays.items()}, 2e-3)
    assert grid.uplink_bytes > len(junk)
    assert list(strategy.stats.reasons) == [HOSTILE] and "bytes" in strategy.stats.reasons[HOSTILE]
    assert peak < 1 << 20, f"peak {peak} bytes"
