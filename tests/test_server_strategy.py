"""CompressedStrategy: decoding, rejection of bad updates, and the aggregate it hands on.

These tests build Flower Messages by hand (no engine) to probe one reply at a time; the
real Simulation Engine is exercised in test_simulation.py.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsqueeze.compression import parse_codec
from fedsqueeze.contracts.records import CODEC_KEY, UPDATE_KEY, from_record, to_record
from fedsqueeze.contracts.streams import Stream, round_seed
from fedsqueeze.server.strategy import CompressedStrategy

NODES = [11, 22, 33]


class _NodesOnly:
    """The only Grid method FedAvg.configure_train needs."""

    def get_node_ids(self) -> Iterable[int]:
        return list(NODES)


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(6, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}


def _reply(to: Message, content: RecordDict) -> Message:
    reply = Message(content=content, reply_to=to)
    return reply


def _configure(strategy: CompressedStrategy, rnd: int = 1) -> list[Message]:
    return list(strategy.configure_train(rnd, to_record(_global()), ConfigRecord(), _NodesOnly()))


def _metrics(n: int) -> MetricRecord:
    return MetricRecord({"num-examples": n})


def test_plain_replies_aggregate_to_weighted_mean() -> None:
    strategy = CompressedStrategy(FedAvg(min_train_nodes=3, min_available_nodes=3))
    msgs = _configure(strategy)
    g = _global()
    locals_ = [{k: v + i for k, v in g.items()} for i in range(3)]
    replies = [
        _reply(m, RecordDict({"arrays": to_record(loc), "metrics": _metrics(n)}))
        for m, loc, n in zip(msgs, locals_, [1, 1, 2], strict=True)
    ]
    agg, _ = strategy.aggregate_train(1, replies)
    assert agg is not None
    expected = {k: (g[k] * 1 + (g[k] + 1) + 2 * (g[k] + 2)) / 4 for k in g}
    for k, v in from_record(agg).items():
        np.testing.assert_allclose(v, expected[k], rtol=1e-6)
    assert strategy.stats.accepted == 3 and strategy.stats.rejected == 0


def test_compressed_replies_are_decoded_against_the_reference() -> None:
    spec = "q8"
    strategy = CompressedStrategy(FedAvg(min_train_nodes=3, min_available_nodes=3), codec=spec)
    msgs = _configure(strategy, rnd=5)
    assert msgs[0].content[CODEC_KEY]["codec"] == parse_codec(spec).spec
    seed = msgs[0].content[CODEC_KEY]["codec-seed"]
    assert seed == round_seed(0, 5, Stream.UPLINK_CODEC)
    g = _global()
    delta = {k: np.full_like(v, 0.5) for k, v in g.items()}
    codec = parse_codec(spec)
    replies = []
    for m in msgs:
        payload = codec.encode(delta, seed=seed, state=None).payload
        content = RecordDict(
            {UPDATE_KEY: ConfigRecord({"payload": payload}), "metrics": _metrics(3)}
        )
        replies.append(_reply(m, content))
    agg, _ = strategy.aggregate_train(5, replies)
    assert agg is not None
    for k, v in from_record(agg).items():
        np.testing.assert_allclose(v, g[k] + 0.5, atol=1e-2)


@pytest.mark.parametrize(
    "bad",
    ["nan", "inf", "shape", "names", "garbage", "truncated", "no-metrics", "neg-examples"],
)
def test_bad_reply_is_dropped_and_counted(bad: str) -> None:
    strategy = CompressedStrategy(FedAvg(min_train_nodes=3, min_available_nodes=3), codec="q8")
    msgs = _configure(strategy)
    g = _global()
    codec = parse_codec("q8")
    seed = msgs[0].content[CODEC_KEY]["codec-seed"]
    good_delta = {k: np.full_like(v, 0.25) for k, v in g.items()}

    def good(m: Message) -> Message:
        payload = codec.encode(good_delta, seed=seed, state=None).payload
        return _reply(
            m, RecordDict({UPDATE_KEY: ConfigRecord({"payload": payload}), "metrics": _metrics(2)})
        )

    payload = codec.encode(good_delta, seed=seed, state=None).payload
    metrics = _metrics(2)
    if bad == "nan":
        content = RecordDict(
            {"arrays": to_record({k: v * np.nan for k, v in g.items()}), "metrics": metrics}
        )
    elif bad == "inf":
        content = RecordDict(
            {"arrays": to_record({k: v + np.inf for k, v in g.items()}), "metrics": metrics}
        )
    elif bad == "shape":
        content = RecordDict(
            {
                "arrays": to_record({"w": np.zeros((4, 6), np.float32), "b": g["b"]}),
                "metrics": metrics,
            }
        )
    elif bad == "names":
        content = RecordDict({"arrays": to_record({"x": g["w"], "b": g["b"]}), "metrics": metrics})
    elif bad == "garbage":
        content = RecordDict(
            {UPDATE_KEY: ConfigRecord({"payload": b"\x00" * 64}), "metrics": metrics}
        )
    elif bad == "truncated":
        content = RecordDict(
            {UPDATE_KEY: ConfigRecord({"payload": payload[:-5]}), "metrics": metrics}
        )
    elif bad == "no-metrics":
        content = RecordDict({UPDATE_KEY: ConfigRecord({"payload": payload})})
    else:
        content = RecordDict(
            {UPDATE_KEY: ConfigRecord({"payload": payload}), "metrics": _metrics(-1)}
        )
    replies = [good(msgs[0]), good(msgs[1]), _reply(msgs[2], content)]
    agg, _ = strategy.aggregate_train(1, replies)
    assert strategy.stats.rejected == 1
    assert strategy.stats.accepted == 2
    assert agg is not None
    for k, v in from_record(agg).items():
        assert np.isfinite(v).all()
        np.testing.assert_allclose(v, g[k] + 0.25, atol=1e-2)


def test_all_replies_bad_keeps_the_global_model() -> None:
    strategy = CompressedStrategy(FedAvg(min_train_nodes=3, min_available_nodes=3))
    msgs = _configure(strategy)
    g = _global()
    replies = [
        _reply(
            m,
            RecordDict(
                {"arrays": to_record({k: v * np.nan for k, v in g.items()}), "metrics": _metrics(1)}
            ),
        )
        for m in msgs
    ]
    agg, _ = strategy.aggregate_train(1, replies)
    assert agg is None
    assert strategy.stats.rejected == 3


def test_downlink_full_then_delta_matches_client_reconstruction() -> None:
    """The server's record of each client's starting weights equals what the client rebuilt,
    and the new global is the server's exact global plus the mean delta (not the clients'
    lossy reconstruction plus it)."""
    from fedsqueeze import downlink
    from fedsqueeze.contracts.records import DOWNLINK_ACK_KEY, DOWNLINK_KEY

    strategy = CompressedStrategy(
        FedAvg(min_train_nodes=3, min_available_nodes=3), downlink_codec="q8"
    )
    client_views: dict[int, dict[str, np.ndarray]] = {}
    g = _global()
    for rnd in (1, 2):
        arrays = {k: v + rnd for k, v in g.items()}
        msgs = list(strategy.configure_train(rnd, to_record(arrays), ConfigRecord(), _NodesOnly()))
        replies = []
        for m in msgs:
            rec = m.content[DOWNLINK_KEY]
            assert "arrays" not in m.content
            node = m.metadata.dst_node_id
            base_version = rec["base-version"]
            assert base_version == (downlink.FULL if rnd == 1 else 0)
            base = None if base_version == downlink.FULL else client_views[node]
            view = downlink.reconstruct(
                parse_codec(str(rec["codec"])), rec["payload"], rec["seed"], base
            )
            client_views[node] = view
            for k in arrays:  # q8 of the model: close to, not equal to, the global weights
                np.testing.assert_allclose(view[k], arrays[k], atol=0.05)
            trained = {k: v + 0.25 * (node % 3) for k, v in view.items()}
            ack = ConfigRecord({"version": rec["version"]})
            content = {"arrays": to_record(trained), "metrics": _metrics(1), DOWNLINK_ACK_KEY: ack}
            replies.append(_reply(m, RecordDict(content)))
        agg, _ = strategy.aggregate_train(rnd, replies)
        assert strategy.stats.accepted == 3
        mean_delta = np.mean([0.25 * (n % 3) for n in NODES])
        for k, v in from_record(agg).items():
            np.testing.assert_allclose(v, arrays[k] + mean_delta, atol=1e-5)
