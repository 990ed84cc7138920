"""The public building blocks composed as a plain Flower app would compose them.

A ClientApp that knows nothing of fedsqueeze (its train handler adds a per-node step to the
weights it is sent) gets fedsqueeze's mods; the server side is a stock FedAvg inside our
wrappers — or inside / around Flower's own DP wrappers. Rounds run through the real mods and
wrappers over an in-process grid; every order either aggregates correctly or is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from inprocess import InProcessGrid

from fedsqueeze.client.mods import compress_mod, downlink_mod
from fedsqueeze.client.secure import secagg_mod
from fedsqueeze.contracts.records import DOWNLINK_KEY, to_record
from fedsqueeze.server import (
    CentralDP,
    CompressedStrategy,
    CountingGrid,
    DistributedDP,
    LocalDP,
    SecAggStrategy,
    StrategyCompositionError,
)
from fedsqueeze.server.rounds import evaluate_round, train_round

N = 4
NODES = [1000 + i for i in range(N)]
SHAPES = {"w": (8, 4), "b": (4,)}


def _step(node: int) -> float:
    return 0.1 * (node - 999)  # 0.1, 0.2, 0.3, 0.4


def plain_app(weight_key: str = "num-examples", sizes: Callable[[int], int] = lambda n: 10):
    """An ordinary Flower ClientApp: adds ``_step(node)`` to every weight it is sent."""
    app = ClientApp(mods=[downlink_mod, secagg_mod, compress_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        name, record = next(iter(msg.content.array_records.items()))
        node = int(context.node_id)
        local = {k: v.numpy() + _step(node) for k, v in record.items()}
        metrics = MetricRecord({weight_key: sizes(node), "train-loss": 1.0})
        return Message(
            content=RecordDict({name: to_record(local), "metrics": metrics}), reply_to=msg
        )

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        _, record = next(iter(msg.content.array_records.items()))
        total = float(sum(v.numpy().sum() for v in record.values()))
        metrics = MetricRecord({weight_key: 1, "weight-sum": total})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def fedavg(**kw: Any) -> FedAvg:
    args = {"fraction_evaluate": 0.0, "min_evaluate_nodes": N, **kw}
    return FedAvg(fraction_train=1.0, min_train_nodes=N, min_available_nodes=N, **args)


def run(strategy: Strategy, app: ClientApp | None = None, rounds: int = 1) -> tuple[Any, Any]:
    """``rounds`` rounds through the real mods; (arrays before the last round, after it)."""
    grid = InProcessGrid(app or plain_app(), N)
    arrays, new, metrics = _global(), None, {}
    for rnd in range(1, rounds + 1):
        before = arrays
        new, metrics = train_round(strategy, CountingGrid(grid, NODES), rnd, arrays, 60.0)
        assert new is not None, f"round {rnd} kept the global model"
        arrays = new
    return before, (new, metrics)


def _step_norm(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in before)))


# ---- the shared "global + aggregated delta" step ------------------------------------------


@pytest.mark.parametrize("secure", [False, True])
def test_lossy_downlink_gives_global_plus_mean_delta_on_both_paths(secure: bool) -> None:
    inner: Strategy = fedavg()
    if secure:
        inner = SecAggStrategy(inner, clip=100.0, bits=40)
    strategy = CompressedStrategy(inner, downlink_codec="q4")
    before, (after, _) = run(strategy, rounds=2)  # round 2 sends deltas against views
    mean_step = np.mean([_step(n) for n in NODES])
    for k in before:
        # q4 of the model is off by ~1e-1; "reconstruction + mean delta" would show it.
        np.testing.assert_allclose(after[k], before[k] + mean_step, atol=1e-4)


def test_federated_evaluation_gets_the_compressed_downlink() -> None:
    arrays = _global()
    sizes = {}
    for codec in ("none", "q8"):
        strategy = CompressedStrategy(fedavg(fraction_evaluate=1.0), downlink_codec=codec)
        grid = CountingGrid(InProcessGrid(plain_app(), N), NODES)
        metrics = evaluate_round(strategy, grid, 1, arrays, 60.0)
        # each client evaluated (its reconstruction of) the model it was sent
        expected = float(sum(v.sum() for v in arrays.values()))
        assert metrics["weight-sum"] == pytest.approx(expected, abs=0.5 if codec == "q8" else 1e-3)
        sizes[codec] = grid.downlink_bytes
    assert sizes["q8"] < sizes["none"] / 2


# ---- Flower's DP wrappers, both orders ----------------------------------------------------


@pytest.mark.parametrize("ours", ["compressed", "secagg"])
@pytest.mark.parametrize(
    "flower",
    [DifferentialPrivacyServerSideFixedClipping, DifferentialPrivacyServerSideAdaptiveClipping],
)
def test_flower_dp_outside_ours_is_refused_before_anything_is_sent(ours: str, flower: type) -> None:
    inner: Strategy = (
        CompressedStrategy(fedavg(), codec="q8")
        if ours == "compressed"
        else SecAggStrategy(fedavg())
    )
    kwargs: dict[str, Any] = {"noise_multiplier": 0.0, "num_sampled_clients": N}
    if flower is DifferentialPrivacyServerSideFixedClipping:
        kwargs["clipping_norm"] = 0.01
    outer = flower(inner, **kwargs)
    grid = InProcessGrid(plain_app(), N)
    with pytest.raises(StrategyCompositionError, match="Put it inside"):
        outer.configure_train(1, to_record(_global()), ConfigRecord(), CountingGrid(grid, NODES))
    assert all(len(c.state) == 0 for c in grid.contexts.values())  # no client was contacted


def test_flower_fixed_clipping_inside_ours_clips_the_decoded_updates() -> None:
    flower = DifferentialPrivacyServerSideFixedClipping(
        fedavg(), noise_multiplier=0.0, clipping_norm=0.01, num_sampled_clients=N
    )
    before, (after, _) = run(CompressedStrategy(flower, codec="q8", downlink_codec="fp16"))
    assert _step_norm(before, after) <= 0.01 + 1e-6  # unclipped it would be ~1.5


def test_flower_dp_inside_secagg_is_refused() -> None:
    flower = DifferentialPrivacyServerSideFixedClipping(
        fedavg(), noise_multiplier=0.0, clipping_norm=0.01, num_sampled_clients=N
    )
    with pytest.raises(StrategyCompositionError, match="CentralDP or DistributedDP"):
        SecAggStrategy(flower)


# ---- our DP wrappers ----------------------------------------------------------------------


def _dp(kind: type, inner: Strategy | None = None, **kw: Any) -> Strategy:
    return kind(
        inner or fedavg(),
        clip=0.01,
        clients_per_round=N,
        num_clients=N,
        noise_multiplier=kw.pop("z", 1e-6),
        **kw,
    )


@pytest.mark.parametrize("secure", [False, True])
def test_central_dp_clips_noises_and_reports_epsilon(secure: bool) -> None:
    dp = _dp(CentralDP)
    strategy = SecAggStrategy(dp, bits=32) if secure else CompressedStrategy(dp, codec="q8")
    before, (after, metrics) = run(strategy)
    assert _step_norm(before, after) <= 0.01 + 1e-4
    assert metrics["epsilon"] > 0 and metrics["epsilon"] == dp.epsilon


def test_distributed_dp_under_secagg_reports_epsilon() -> None:
    dp = _dp(DistributedDP, z=1.0, bits=20)
    _, (_, metrics) = run(SecAggStrategy(dp))
    assert np.isfinite(metrics["epsilon"]) and metrics["epsilon"] > 0


@pytest.mark.parametrize(
    "build",
    [
        lambda: _dp(CentralDP, CompressedStrategy(fedavg())),
        lambda: _dp(CentralDP, SecAggStrategy(fedavg())),
        lambda: _dp(DistributedDP, SecAggStrategy(fedavg())),
        lambda: CompressedStrategy(SecAggStrategy(fedavg()), codec="q8"),
        lambda: SecAggStrategy(CompressedStrategy(fedavg())),
        lambda: SecAggStrategy(LocalDP(fedavg())),
        lambda: SecAggStrategy(CompressedStrategy(_dp(CentralDP))),
        lambda: SecAggStrategy(_dp(CentralDP, adaptive_quantile=0.5)),
    ],
)
def test_wrong_orders_are_refused_when_built(build: Callable[[], Strategy]) -> None:
    with pytest.raises(StrategyCompositionError):
        build()


@pytest.mark.parametrize("outer", [lambda s: s, lambda s: CompressedStrategy(s)])
def test_distributed_dp_outside_secagg_is_refused_at_round_one(outer: Callable) -> None:
    strategy = outer(_dp(DistributedDP))
    grid = CountingGrid(InProcessGrid(plain_app(), N), NODES)
    with pytest.raises(StrategyCompositionError, match="SecAggStrategy"):
        strategy.configure_train(1, to_record(_global()), ConfigRecord(), grid)
    assert grid.messages_sent == 0


# ---- record names are the strategy's ----------------------------------------------------


def _sizes(node: int) -> int:
    return 1 if node < 1003 else 5  # weights 1, 1, 1, 5


@pytest.mark.parametrize("secure", [False, True])
def test_weighted_by_key_is_honoured(secure: bool) -> None:
    inner = fedavg(weighted_by_key="n-samples")
    strategy: Strategy = (
        SecAggStrategy(inner, clip=100.0, bits=40, weight_cap=10)
        if secure
        else CompressedStrategy(inner, codec="q8")
    )
    before, (after, _) = run(strategy, plain_app("n-samples", _sizes))
    weights = np.array([_sizes(n) for n in NODES], dtype=float)
    expected = float(np.dot(weights, [_step(n) for n in NODES]) / weights.sum())
    for k in before:
        np.testing.assert_allclose(after[k], before[k] + expected, atol=2e-3)


def test_arrayrecord_key_is_honoured_through_a_compressed_downlink() -> None:
    strategy = CompressedStrategy(fedavg(arrayrecord_key="params"), codec="q8", downlink_codec="q8")
    before, (after, _) = run(strategy, rounds=2)
    mean_step = np.mean([_step(n) for n in NODES])
    for k in before:
        np.testing.assert_allclose(after[k], before[k] + mean_step, atol=5e-3)


# ---- mods reply with Flower errors --------------------------------------------------------


def _train_message(content: RecordDict) -> Message:
    return Message(content=content, message_type="train", dst_node_id=1000)


def test_a_mod_whose_precondition_fails_replies_with_an_error() -> None:
    grid = InProcessGrid(plain_app(), 1)
    context = grid.contexts[1000]
    stale = ConfigRecord(
        {"payload": b"x", "codec": "q8", "seed": 1, "version": 3, "base-version": 2}
    )
    reply = grid.app(_train_message(RecordDict({DOWNLINK_KEY: stale})), context)
    assert reply.has_error() and reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert "holds None" in reply.error.reason

    two = RecordDict(
        {
            "a": to_record(_global()),
            "b": to_record(_global()),
            "fedsqueeze.codec": ConfigRecord({"codec": "q8", "codec-seed": 1}),
        }
    )
    reply = grid.app(_train_message(two), context)
    assert reply.has_error() and reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert "exactly one ArrayRecord" in reply.error.reason
