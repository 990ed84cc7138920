"""Strategy wrapper: compressed downlink/uplink around any weighted-mean Flower strategy.

``CompressedStrategy(FedAvg())`` (or FedProx, FedAdam, ...) does three things around the
wrapped strategy and nothing else:

1. ``configure_train`` tells clients which codec and round seed to use and, with a
   ``downlink_codec``, replaces the broadcast weights by an encoded payload (the full
   model, or a delta against the version the client confirmed it holds);
2. ``aggregate_train`` turns every reply back into dense local weights
   (``reference + decode(payload)``), so the wrapped strategy sees ordinary Flower replies;
3. it drops any reply that is malformed, mismatched or non-finite, counts it in
   ``rejected_updates`` and never lets a non-finite aggregate replace the global model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsqueeze import downlink
from fedsqueeze.compression import CodecError, parse_codec
from fedsqueeze.records import DOWNLINK_KEY, UPDATE_KEY, from_record, to_record

log = logging.getLogger(__name__)


class RejectedUpdate(ValueError):
    """A client's train reply cannot be used this round."""


UPLINK, DOWNLINK = 0, 1


def round_seed(seed: int, server_round: int, stream: int = UPLINK) -> int:
    """The shared per-round seed handed to clients (31 bits, the same for all clients)."""
    entropy = [seed, server_round, stream, 0x5EED]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] >> 1)


@dataclass
class RoundStats:
    """What happened to the replies of the last training round."""

    replies: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    aggregate_rejected: bool = False
    aggregator_applied: bool = False
    """The ``aggregator`` hook (central DP: clip + sum + noise) computed this round's delta."""
    client_metrics: list[dict[str, float]] = field(default_factory=list)


UpdateAggregator = Callable[[int, list[dict[str, np.ndarray]], list[int]], dict[str, np.ndarray]]
"""``(server_round, client_deltas, num_examples) -> delta to apply`` (e.g. central DP's
clip + sum + noise + average). Replaces the wrapped strategy's weighted mean of the
clients' weights; the wrapped strategy then sees one reply, ``global + delta``."""


def all_finite(arrays: dict[str, np.ndarray]) -> bool:
    return all(bool(np.isfinite(a).all()) for a in arrays.values())


class CompressedStrategy(Strategy):
    """Wrap ``inner`` so replies may be compressed deltas and bad replies are dropped.

    Parameters
    ----------
    inner
        Any Flower strategy that aggregates replies holding one ``"arrays"`` ArrayRecord
        and a ``"metrics"`` MetricRecord with ``num-examples`` (FedAvg and its family).
    codec, downlink_codec
        Codec spec strings (see ``fedsqueeze.compression``); ``"none"`` sends fp32.
    seed
        Run seed; per-round codec seeds derive from it.
    aggregator
        Optional :data:`UpdateAggregator` (central DP) applied to the decoded deltas.
    """

    def __init__(
        self,
        inner: Strategy,
        codec: str = "none",
        downlink_codec: str = "none",
        seed: int = 0,
        aggregator: UpdateAggregator | None = None,
    ) -> None:
        self.inner = inner
        self.codec = parse_codec(codec)
        self.downlink = parse_codec(downlink_codec)
        if self.downlink.stateful_client or self.downlink.stateful_server:
            raise CodecError("downlink-codec cannot keep state (error feedback is uplink-only)")
        self.seed = seed
        self.aggregator = aggregator
        self.stats = RoundStats()
        self._global: dict[str, np.ndarray] = {}
        self._references: dict[int, dict[str, np.ndarray]] = {}
        self._views: dict[int, tuple[int, dict[str, np.ndarray]]] = {}
        self._server_codec_state: dict[int, dict[str, np.ndarray]] = {}

    def summary(self) -> None:
        log.info("CompressedStrategy(codec=%s, downlink=%s)", self.codec.spec, self.downlink.spec)
        self.inner.summary()

    # ---- training -------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["codec"] = self.codec.spec
        config["codec-seed"] = round_seed(self.seed, server_round)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._global = from_record(arrays)
        self._references = {}
        compress_downlink = self.downlink.spec != "none"
        seed = round_seed(self.seed, server_round, DOWNLINK)
        full: tuple[bytes, dict[str, np.ndarray]] | None = None  # the same for every node
        for msg in messages:
            node = msg.metadata.dst_node_id
            if not compress_downlink:
                self._references[node] = self._global
                continue
            version, base = self._views.get(node, (downlink.FULL, None))
            if base is None and full is not None:
                payload, reference = full
            else:
                payload = downlink.encode(self.downlink, self._global, seed, base)
                reference = downlink.reconstruct(self.downlink, payload, seed, base)
                if base is None:
                    full = (payload, reference)
            self._references[node] = reference
            content = RecordDict({k: v for k, v in msg.content.items() if k != "arrays"})
            content[DOWNLINK_KEY] = ConfigRecord(
                {
                    "payload": payload,
                    "codec": self.downlink.spec,
                    "seed": seed,
                    "version": server_round,
                    "base-version": version,
                }
            )
            msg.content = content
        return messages

    def _local_weights(self, msg: Message, server_round: int) -> dict[str, np.ndarray]:
        node = msg.metadata.src_node_id
        content = msg.content
        reference = self._references.get(node)
        if reference is None:
            raise RejectedUpdate(f"reply from node {node}, which was not sent a model this round")
        metrics = content.metric_records.get("metrics")
        num = None if metrics is None else metrics.get("num-examples")
        if not isinstance(num, int) or num < 0:
            raise RejectedUpdate("reply lacks a non-negative integer 'num-examples' metric")
        if UPDATE_KEY in content:
            payload = content[UPDATE_KEY].get("payload")
            if not isinstance(payload, bytes):
                raise RejectedUpdate("compressed update without a bytes payload")
            # In the model's order, float32: what compress_mod encodes (layout="hash").
            expected = {k: (v.shape, "float32") for k, v in reference.items()}
            try:
                decoded = self.codec.decode(
                    payload,
                    seed=round_seed(self.seed, server_round),
                    expected=expected,
                    state=self._server_codec_state.get(node),
                )
            except CodecError as err:
                raise RejectedUpdate(f"undecodable update: {err}") from None
            if decoded.state:
                self._server_codec_state[node] = decoded.state
            delta = decoded.arrays
            if list(delta) != list(reference):
                raise RejectedUpdate("update names differ from the global model's")
            local = {k: (reference[k] + delta[k]).astype(np.float32) for k in reference}
        elif "arrays" in content:
            local = from_record(content["arrays"])
            if list(local) != list(reference) or any(
                local[k].shape != reference[k].shape for k in reference
            ):
                raise RejectedUpdate("weights do not match the global model's names/shapes")
            local = {k: np.asarray(v, dtype=np.float32) for k, v in local.items()}
        else:
            raise RejectedUpdate("reply holds neither weights nor a compressed update")
        if not all_finite(local):
            raise RejectedUpdate("update contains NaN or Inf")
        return local

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        stats = RoundStats(replies=len(replies))
        usable: list[Message] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                stats.failed += 1
                self._views.pop(node, None)
                continue
            try:
                local = self._local_weights(msg, server_round)
            except RejectedUpdate as err:
                stats.rejected += 1
                self._views.pop(node, None)
                log.warning("round %d: dropped update from node %d: %s", server_round, node, err)
                continue
            metrics = msg.content["metrics"]
            stats.client_metrics.append(
                {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            )
            msg.content = RecordDict({"arrays": to_record(local), "metrics": metrics})
            if self.downlink.spec != "none":
                self._views[node] = (server_round, self._references[node])
            usable.append(msg)
        stats.accepted = len(usable)
        self.stats = stats
        if not usable:
            return None, None
        if self.aggregator is not None:
            usable = self._aggregate_with(server_round, usable)
            stats.aggregator_applied = True
        arrays, metrics = self.inner.aggregate_train(server_round, usable)
        if arrays is not None and not all_finite(from_record(arrays)):
            log.warning("round %d: aggregate is not finite; global model kept", server_round)
            stats.aggregate_rejected = True
            return None, metrics
        return arrays, metrics

    def _aggregate_with(self, server_round: int, usable: list[Message]) -> list[Message]:
        """Replace the replies by one reply holding ``global + aggregator(deltas)``."""
        assert self.aggregator is not None
        deltas, weights = [], []
        for msg in usable:
            local = from_record(msg.content["arrays"])
            ref = self._references[msg.metadata.src_node_id]
            deltas.append({k: local[k] - ref[k] for k in local})
            weights.append(int(msg.content["metrics"]["num-examples"]))
        delta = self.aggregator(server_round, deltas, weights)
        merged = {k: (self._global[k] + delta[k]).astype(np.float32) for k in self._global}
        loss = [m.get("train-loss") for m in self.stats.client_metrics]
        metrics = MetricRecord({"num-examples": 1})
        if loss and all(v is not None for v in loss):
            metrics["train-loss"] = float(np.mean(loss))
        first = usable[0]
        first.content = RecordDict({"arrays": to_record(merged), "metrics": metrics})
        return [first]

    # ---- evaluation: unchanged ---------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
