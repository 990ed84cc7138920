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
3. it checks every train and evaluate reply before using it (:mod:`fedsqueeze.server.replies`:
   record types, the model's exact names/dtypes/shapes, size before decoding, finite scalar
   metrics normalised to the keys every usable reply reported), drops a bad one, counts it
   in ``rejected_updates`` and names its sender and the reason (``rejected_reasons``);
4. it bounds each client's influence: the claimed weight is capped at ``max_weight`` (the
   largest partition), an update whose L2 norm exceeds ``max_update_norm`` (or
   ``norm_factor`` times the round's median update norm) is scaled down to it, an update
   that could overflow the aggregate is refused, and a non-finite aggregate never replaces
   the global model. Robust aggregators (Flower's FedMedian, FedTrimmedAvg, Krum,
   MultiKrum, Bulyan) work inside it on the decoded updates.

Record names and the weight key are the wrapped strategy's (``arrayrecord_key``,
``weighted_by_key``, ...), Flower's defaults when it declares none.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsqueeze import downlink
from fedsqueeze.compression import Codec, CodecError, parse_codec
from fedsqueeze.compression.dgc import DGCOptions, warmup_codec
from fedsqueeze.contracts.records import (
    CODEC_KEY,
    DOWNLINK_ACK_KEY,
    DOWNLINK_KEY,
    UPDATE_KEY,
    RecordNames,
    from_record,
    single_metrics,
    to_record,
    without,
)
from fedsqueeze.contracts.streams import Stream, round_seed
from fedsqueeze.server.compose import StrategyCompositionError, below, refuse_flower_dp_caller
from fedsqueeze.server.hooks import RoundHook
from fedsqueeze.server.replies import (
    Layout,
    ReplyError,
    all_finite,
    check_magnitude,
    clip_update,
    common_keys,
    layout_of,
    max_reply_bytes,
    read_array_record,
    read_metrics,
    record_size,
    update_norm,
)

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


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
    clipped: int = 0
    client_metrics: list[dict[str, float]] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)
    """Why each rejected reply was dropped, by the node that sent it (train and evaluate)."""

    def reject(self, server_round: int, node: int, err: Exception, phase: str = "train") -> None:
        self.rejected += phase == "train"
        self.reasons[node] = f"{phase}: {err}"
        log.warning("round %d: dropped %s reply from node %d: %s", server_round, phase, node, err)


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
    max_update_norm
        L2 bound on one client's update (its delta against the model it was sent): a larger
        one is scaled down to it before aggregation. ``0`` turns the bound off.
    norm_factor
        Tighter, relative bound: no update counts for more than ``norm_factor`` times the
        median update norm of its round (``0``: off). It holds while honest clients are the
        majority of a round, whatever the model's scale; it is off with user-level DP inside.
    max_weight
        The most examples any client can hold (the largest partition): a larger claimed
        ``num-examples`` counts as this much. ``None``: claims are not capped.
    warmup
        DGC's sparsity warm-up, ``(rounds, start density)``: round ``r``'s uplink codec is
        :func:`~fedsqueeze.compression.dgc.warmup_codec` of ``codec`` (``(0, 1.0)``: off).
    client_options
        DGC's client-side fixes (:class:`~fedsqueeze.compression.dgc.DGCOptions`), sent to
        ``compress_mod`` with the codec each round.
    """

    def __init__(
        self,
        inner: Strategy,
        codec: str = "none",
        downlink_codec: str = "none",
        seed: int = 0,
        *,
        max_update_norm: float = 0.0,
        norm_factor: float = 0.0,
        max_weight: int | None = None,
        warmup: tuple[int, float] = (0, 1.0),
        client_options: DGCOptions | None = None,
    ) -> None:
        if not (math.isfinite(max_update_norm) and max_update_norm >= 0):
            raise ValueError(f"max_update_norm must be finite and >= 0, not {max_update_norm}")
        if max_weight is not None and max_weight < 1:
            raise ValueError(f"max_weight must be >= 1, not {max_weight}")
        if not (math.isfinite(norm_factor) and norm_factor >= 0):
            raise ValueError(f"norm_factor must be finite and >= 0, not {norm_factor}")
        self.max_update_norm = float(max_update_norm)
        self.norm_factor = float(norm_factor)
        self.max_weight = max_weight
        self.inner = inner
        self.codec = parse_codec(codec)
        self.warmup = (int(warmup[0]), float(warmup[1]))
        warmup_codec(self.codec, 1, *self.warmup)  # a bad schedule fails here, not in round 1
        self.client_options = client_options or DGCOptions()
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
        self.private = any(getattr(s, "hook_name", "") == "privacy" for s in below(self))
        """User-level DP inside: which clients were sampled, rejected or clipped is secret, so
        ``metrics.jsonl`` gets counts only (the reasons stay in the server's log)."""
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
            content = without(msg.content, name)
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
                msg.content = without(msg.content, DOWNLINK_ACK_KEY)
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
                    "codec": self.codec_at(server_round).spec,
                    "codec-seed": round_seed(self.seed, server_round, Stream.UPLINK_CODEC),
                    **self.client_options.to_record(),
                }
            )
            for msg in messages:
                msg.content[CODEC_KEY] = instructions
        return messages

    def codec_at(self, server_round: int) -> Codec:
        """The uplink codec of ``server_round`` (the warm-up's density, then ``codec``)."""
        return warmup_codec(self.codec, server_round, *self.warmup)

    def _delta(self, msg: Message, server_round: int, layout: Layout) -> Arrays:
        """What the client's training changed, from its reply (raises ReplyError). Nothing
        is decoded or deserialized before the reply's size and record types are checked."""
        reference = self._sent[msg.metadata.src_node_id].reference
        content = msg.content
        size, limit = record_size(content), max_reply_bytes(layout)
        if size > limit:
            raise ReplyError(f"reply is {size} bytes; an update of this model is at most {limit}")
        payload_record = content.get(UPDATE_KEY)
        if payload_record is not None:
            payload = (
                payload_record.get("payload") if isinstance(payload_record, ConfigRecord) else None
            )
            if not isinstance(payload, bytes):
                raise ReplyError("compressed update without a bytes payload")
            # In the model's order, float32: what compress_mod encodes (layout="hash").
            expected = {k: (v.shape, "float32") for k, v in reference.items()}
            try:
                decoded = self.codec_at(server_round).decode(
                    payload,
                    seed=round_seed(self.seed, server_round, Stream.UPLINK_CODEC),
                    expected=expected,
                    state=self._server_codec_state.get(msg.metadata.src_node_id),
                )
            except CodecError as err:
                raise ReplyError(f"undecodable update: {err}") from None
            delta = decoded.arrays
            if list(delta) != list(reference):
                raise ReplyError("update names differ from the global model's")
            if not all_finite(delta):
                raise ReplyError("update contains NaN or Inf")
            if decoded.state:
                self._server_codec_state[msg.metadata.src_node_id] = decoded.state
            return delta
        if self.names.arrays not in content:
            raise ReplyError("reply holds neither weights nor a compressed update")
        local = read_array_record(content[self.names.arrays], layout)
        delta = {k: local[k].astype(np.float64) - reference[k] for k in local}
        if not all_finite(delta):  # float64: finite weights make a finite delta
            raise ReplyError("update contains NaN or Inf")
        return delta

    def _read_train(
        self, msg: Message, server_round: int, layout: Layout, seen: set[int]
    ) -> tuple[Arrays, str, dict[str, int | float]]:
        """The usable (clipped) delta of one reply, its metric record name and metrics."""
        node = msg.metadata.src_node_id
        if node not in self._sent or node in seen:
            raise ReplyError("reply from a node that was not sent a model this round (or twice)")
        seen.add(node)
        named = single_metrics(msg.content)
        if named is None:
            raise ReplyError("reply needs exactly one MetricRecord")
        metrics = read_metrics(named[1], self.names.weight, self.max_weight)
        return self._delta(msg, server_round, layout), named[0], metrics

    def _norm_bound(self, norms: list[float]) -> float:
        """This round's L2 bound on one update: ``max_update_norm``, tightened to
        ``norm_factor`` times the round's median update norm (0: no bound).

        The relative bound is off with user-level DP inside: there one client's update would
        change the others' bound, and so the sensitivity the accountant assumes."""
        bound = self.max_update_norm
        if self.norm_factor > 0 and norms and not self.private:
            relative = self.norm_factor * float(np.median(norms))
            bound = relative if bound <= 0 else min(bound, relative)
        return bound

    def _bounded(self, server_round: int, node: int, delta: Arrays, bound: float) -> Arrays:
        """``delta`` scaled down to ``bound``; refused if it could overflow the aggregate."""
        delta, norm = clip_update(delta, bound)
        if norm > bound > 0:
            self.stats.clipped += 1
            log.info("round %d: node %d's update norm %.3g clipped", server_round, node, norm)
        check_magnitude(self._global, delta)
        return delta

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = self._acknowledge(list(replies))
        if self.passthrough:
            self.stats = RoundStats()
            return self.inner.aggregate_train(server_round, replies)
        stats = RoundStats(replies=len(replies), failed=max(0, self._expected - len(replies)))
        self.stats = stats
        layout = layout_of(self._global)
        read: list[tuple[Message, Arrays, str, dict[str, int | float]]] = []
        seen: set[int] = set()
        for msg in replies:
            if msg.has_error():
                stats.failed += 1
                continue
            try:
                read.append((msg, *self._read_train(msg, server_round, layout, seen)))
            except ReplyError as err:
                stats.reject(server_round, msg.metadata.src_node_id, err)
        bound = self._norm_bound([update_norm(delta) for _, delta, *_ in read])
        usable = []
        for msg, delta, name, metrics in read:
            node = msg.metadata.src_node_id
            try:
                usable.append((msg, self._bounded(server_round, node, delta, bound), name, metrics))
            except ReplyError as err:
                stats.reject(server_round, node, err)
        stats.accepted = len(usable)
        if not usable:
            return None, None
        # Flower's strategies need one key set: the keys every usable reply reported.
        keys = common_keys(m for *_, m in usable)
        for msg, delta, name, metrics in usable:
            kept = {k: metrics[k] for k in keys}
            stats.client_metrics.append({k: float(v) for k, v in kept.items()})
            local = {k: (self._global[k] + delta[k]).astype(np.float32) for k in self._global}
            msg.content = RecordDict(
                {self.names.arrays: to_record(local), name: MetricRecord(kept)}
            )
        arrays, metrics = self.inner.aggregate_train(server_round, [u[0] for u in usable])
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
        """The wrapped strategy's aggregate of the usable evaluation replies: finite scalar
        metrics normalised to the keys all of them report. A reply with ``num-examples = 0``
        (a client whose test slice is empty) carries no evaluation and is left out; a
        malformed one is dropped and its sender named in ``rejected_reasons``."""
        replies = self._acknowledge(list(replies))
        usable: list[tuple[Message, str, dict[str, int | float]]] = []
        seen: set[int] = set()
        for msg in replies:
            if msg.has_error():
                continue
            node = msg.metadata.src_node_id
            try:
                if node not in self._sent or node in seen:
                    raise ReplyError("reply from a node that was not sent the model (or twice)")
                seen.add(node)
                if len(msg.content) != 1 or (named := single_metrics(msg.content)) is None:
                    raise ReplyError("evaluation reply must hold exactly one MetricRecord")
                metrics = read_metrics(named[1], self.names.weight, self.max_weight, True)
            except ReplyError as err:
                self.stats.reject(server_round, node, err, phase="evaluate")
                continue
            if metrics[self.names.weight] > 0:
                usable.append((msg, named[0], metrics))
        if not usable:
            return None
        keys = common_keys(m for *_, m in usable)
        for msg, name, metrics in usable:
            msg.content = RecordDict({name: MetricRecord({k: metrics[k] for k in keys})})
        return self.inner.aggregate_evaluate(server_round, [u[0] for u in usable])

    # ---- round hook ---------------------------------------------------------------------
    def after_round(self, server_round: int, row: dict[str, Any]) -> None:
        s = self.stats
        if s.reasons and not self.private:
            row["rejected_reasons"] = {str(node): why for node, why in s.reasons.items()}
        if self.passthrough:
            return
        row.update(
            {"clients": s.accepted, "rejected_updates": s.rejected, "dropped_clients": s.failed}
        )
        if (self.max_update_norm > 0 or self.norm_factor > 0) and not self.private:
            row["clipped_updates"] = s.clipped
