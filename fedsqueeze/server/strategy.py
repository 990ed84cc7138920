"""Strategy wrapper: compressed downlink/uplink around any weighted-mean Flower strategy.

``CompressedStrategy(FedAvg())`` (or FedProx, FedAdam, ``CentralDP(...)``, Flower's DP
wrappers, ...) does three things around the wrapped strategy and nothing else:

1. ``configure_train`` asks clients for a compressed update (a ``fedsqueeze.codec`` record)
   and, with a ``downlink_codec``, replaces the broadcast weights by an encoded payload (the
   full model, or a delta against the version the client acknowledged holding); federated
   evaluation's broadcast is compressed the same way;
2. ``aggregate_train`` turns every reply into ``global + delta_i``, where ``delta_i`` is what
   the client's training changed (decoded from its payload, or its weights minus the model it
   was sent), so the wrapped strategy sees ordinary Flower replies and the new global model
   is the server's exact global plus the aggregated delta — never the lossy reconstruction a
   client started from (the same step as the secure path, :func:`merge_delta`);
3. it drops any reply that is malformed, mismatched or non-finite, counts it in
   ``rejected_updates`` and never lets a non-finite aggregate replace the global model.

Record names and the weight key are the wrapped strategy's (``arrayrecord_key``,
``weighted_by_key``, ...), Flower's defaults when it declares none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsqueeze import downlink
from fedsqueeze.compression import CodecError, parse_codec
from fedsqueeze.contracts.records import (
    CODEC_KEY,
    DOWNLINK_ACK_KEY,
    DOWNLINK_KEY,
    UPDATE_KEY,
    RecordNames,
    from_record,
    single_metrics,
    to_record,
)
from fedsqueeze.contracts.streams import Stream, round_seed
from fedsqueeze.server.compose import StrategyCompositionError, below, refuse_flower_dp_caller
from fedsqueeze.server.hooks import RoundHook

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


class RejectedUpdate(ValueError):
    """A client's train reply cannot be used this round."""


def all_finite(arrays: Mapping[str, np.ndarray]) -> bool:
    return all(bool(np.isfinite(a).all()) for a in arrays.values())


def merge_delta(
    inner: Strategy,
    server_round: int,
    global_arrays: Arrays,
    delta: Mapping[str, np.ndarray],
    template: Message,
    names: RecordNames,
    metrics: Mapping[str, float] | None = None,
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """Hand ``inner`` one reply holding ``global + delta`` (weight 1); its aggregate, or None
    when either is not finite. The one "global + aggregated delta" step of every path that
    aggregates before the wrapped strategy does (secure sums, central DP)."""
    merged = {k: (global_arrays[k] + delta[k]).astype(np.float32) for k in global_arrays}
    if not all_finite(merged):
        log.warning("round %d: aggregate is not finite; global model kept", server_round)
        return None, None
    record = MetricRecord({names.weight: 1})
    for key, value in (metrics or {}).items():
        record[key] = float(value)
    template.content = RecordDict({names.arrays: to_record(merged), "metrics": record})
    arrays, out = inner.aggregate_train(server_round, [template])
    if arrays is not None and not all_finite(from_record(arrays)):
        log.warning("round %d: aggregate is not finite; global model kept", server_round)
        return None, out
    return arrays, out


def mean_metric(rows: list[dict[str, float]], key: str) -> dict[str, float]:
    """``{key: mean}`` over the rows that report ``key`` (empty when none do)."""
    values = [r[key] for r in rows if key in r]
    return {key: float(np.mean(values))} if values else {}


@dataclass
class RoundStats:
    """What happened to the replies of the last training round."""

    replies: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    client_metrics: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Sent:
    version: int
    reference: Arrays


class CompressedStrategy(Strategy, RoundHook):
    """Wrap ``inner`` so replies may be compressed deltas and bad replies are dropped.

    Parameters
    ----------
    inner
        Any Flower strategy that aggregates replies holding one ArrayRecord and a
        MetricRecord with its weight key (FedAvg and its family, ``CentralDP``, Flower's DP
        wrappers), or — with ``codec = "none"``, to compress only the downlink — a
        ``SecAggStrategy``.
    codec, downlink_codec
        Codec spec strings (see ``fedsqueeze.compression``); ``"none"`` sends fp32.
    seed
        Run seed; per-round codec seeds derive from it.
    """

    def __init__(
        self, inner: Strategy, codec: str = "none", downlink_codec: str = "none", seed: int = 0
    ) -> None:
        self.inner = inner
        self.codec = parse_codec(codec)
        self.downlink = parse_codec(downlink_codec)
        if self.downlink.stateful_client or self.downlink.stateful_server:
            raise CodecError("downlink-codec cannot keep state (error feedback is uplink-only)")
        self.seed = seed
        self.names = RecordNames.of(inner)
        self.passthrough = any(getattr(s, "secure_sum", False) for s in below(self))
        """A SecAggStrategy inside aggregates: this wrapper only compresses the downlink."""
        if self.passthrough and self.codec.spec != "none":
            raise StrategyCompositionError(
                f"CompressedStrategy(codec={self.codec.spec!r}) cannot wrap SecAggStrategy: "
                "masked updates are summed, not decoded; give SecAggStrategy randk=... or "
                "feedback=... instead (CompressedStrategy may wrap it for the downlink only)"
            )
        self.stats = RoundStats()
        self._global: Arrays = {}
        self._sent: dict[int, _Sent] = {}
        self._expected = 0
        self._views: dict[int, _Sent] = {}
        self._server_codec_state: dict[int, Arrays] = {}

    def summary(self) -> None:
        log.info("CompressedStrategy(codec=%s, downlink=%s)", self.codec.spec, self.downlink.spec)
        self.inner.summary()

    # ---- the broadcast ------------------------------------------------------------------
    def _compress_downlink(
        self, messages: list[Message], arrays: ArrayRecord, version: int, server_round: int
    ) -> None:
        """Record what each node is sent; replace its weights by a downlink payload."""
        self._global = from_record(arrays)
        self._sent = {}
        if self.downlink.spec == "none":
            for msg in messages:
                self._sent[msg.metadata.dst_node_id] = _Sent(version, self._global)
            return
        seed = round_seed(self.seed, server_round, Stream.DOWNLINK_CODEC)
        full: tuple[bytes, Arrays] | None = None  # the same for every node
        for msg in messages:
            node = msg.metadata.dst_node_id
            view = self._views.get(node)
            if view is None and full is not None:
                payload, reference = full
            else:
                base = None if view is None else view.reference
                payload = downlink.encode(self.downlink, self._global, seed, base)
                reference = downlink.reconstruct(self.downlink, payload, seed, base)
                if view is None:
                    full = (payload, reference)
            self._sent[node] = _Sent(version, reference)
            name = next(k for k, v in msg.content.items() if isinstance(v, ArrayRecord))
            content = RecordDict({k: v for k, v in msg.content.items() if k != name})
            content[DOWNLINK_KEY] = ConfigRecord(
                {
                    "payload": payload,
                    "codec": self.downlink.spec,
                    "seed": seed,
                    "version": version,
                    "base-version": downlink.FULL if view is None else view.version,
                    "arrays": name,
                }
            )
            msg.content = content

    def _acknowledge(self, replies: list[Message]) -> list[Message]:
        """Track which model each client holds; strip the acknowledgement from the replies."""
        if self.downlink.spec == "none":
            return replies
        for msg in replies:
            node = msg.metadata.src_node_id
            sent = self._sent.get(node)
            ack = None if msg.has_error() else msg.content.config_records.get(DOWNLINK_ACK_KEY)
            if sent is not None and ack is not None and ack.get("version") == sent.version:
                self._views[node] = sent
                msg.content = RecordDict(
                    {k: v for k, v in msg.content.items() if k != DOWNLINK_ACK_KEY}
                )
            elif ack is None:
                self._views.pop(node, None)  # it may hold anything now: send it the full model
        return replies

    # ---- training -------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        refuse_flower_dp_caller(self)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._expected = len(messages)
        self._compress_downlink(messages, arrays, server_round - 1, server_round)
        if self.codec.spec != "none":
            instructions = ConfigRecord(
                {
                    "codec": self.codec.spec,
                    "codec-seed": round_seed(self.seed, server_round, Stream.UPLINK_CODEC),
                }
            )
            for msg in messages:
                msg.content[CODEC_KEY] = instructions
        return messages

    def _delta(self, msg: Message, server_round: int) -> Arrays:
        """What the client's training changed, from its reply (raises RejectedUpdate)."""
        node = msg.metadata.src_node_id
        sent = self._sent.get(node)
        if sent is None:
            raise RejectedUpdate(f"reply from node {node}, which was not sent a model this round")
        reference = sent.reference
        metrics = single_metrics(msg.content)
        num = None if metrics is None else metrics[1].get(self.names.weight)
        if not isinstance(num, int) or num < 0:
            raise RejectedUpdate(f"reply lacks a non-negative integer {self.names.weight!r} metric")
        if UPDATE_KEY in msg.content.config_records:
            payload = msg.content.config_records[UPDATE_KEY].get("payload")
            if not isinstance(payload, bytes):
                raise RejectedUpdate("compressed update without a bytes payload")
            # In the model's order, float32: what compress_mod encodes (layout="hash").
            expected = {k: (v.shape, "float32") for k, v in reference.items()}
            try:
                decoded = self.codec.decode(
                    payload,
                    seed=round_seed(self.seed, server_round, Stream.UPLINK_CODEC),
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
        elif self.names.arrays in msg.content.array_records:
            local = from_record(msg.content.array_records[self.names.arrays])
            if list(local) != list(reference) or any(
                local[k].shape != reference[k].shape for k in reference
            ):
                raise RejectedUpdate("weights do not match the global model's names/shapes")
            delta = {k: np.asarray(local[k], dtype=np.float32) - reference[k] for k in local}
        else:
            raise RejectedUpdate("reply holds neither weights nor a compressed update")
        if not all_finite(delta):
            raise RejectedUpdate("update contains NaN or Inf")
        return delta

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = self._acknowledge(list(replies))
        if self.passthrough:
            return self.inner.aggregate_train(server_round, replies)
        stats = RoundStats(replies=len(replies), failed=max(0, self._expected - len(replies)))
        self.stats = stats
        usable: list[Message] = []
        for msg in replies:
            if msg.has_error():
                stats.failed += 1
                continue
            try:
                delta = self._delta(msg, server_round)
            except RejectedUpdate as err:
                stats.rejected += 1
                node = msg.metadata.src_node_id
                log.warning("round %d: dropped update from node %d: %s", server_round, node, err)
                continue
            name, metrics = single_metrics(msg.content) or ("metrics", MetricRecord())
            stats.client_metrics.append(
                {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            )
            local = {k: (self._global[k] + delta[k]).astype(np.float32) for k in self._global}
            msg.content = RecordDict({self.names.arrays: to_record(local), name: metrics})
            usable.append(msg)
        stats.accepted = len(usable)
        if not usable:
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, usable)
        if arrays is not None and not all_finite(from_record(arrays)):
            log.warning("round %d: aggregate is not finite; global model kept", server_round)
            return None, metrics
        return arrays, metrics

    # ---- evaluation: the same downlink -----------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        self._compress_downlink(messages, arrays, server_round, server_round)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = self._acknowledge(list(replies))
        return self.inner.aggregate_evaluate(server_round, replies)

    # ---- round hook ---------------------------------------------------------------------
    def after_round(self, server_round: int, row: dict[str, Any]) -> None:
        if self.passthrough:
            return
        s = self.stats
        row.update(
            {"clients": s.accepted, "rejected_updates": s.rejected, "dropped_clients": s.failed}
        )
