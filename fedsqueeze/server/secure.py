"""Server side of secure aggregation: ``SecAggStrategy``, a wrapper for any Flower strategy.

``SecAggStrategy(FedAvg(), clip=1.0)`` runs SecAgg+ inside Flower's own round loop
(``strategy.start(grid=..., ...)``): ``configure_train`` adds the setup to the wrapped
strategy's train messages; ``aggregate_train`` receives the public keys, drives the other
four stages over the same grid (``grid.send_and_receive``, so a byte-counting grid counts
them), unmasks the sum and hands the wrapped strategy one reply, ``global + mean delta``::

    setup (= the train message)  → public keys        SecAggServer.collect_keys
    share (neighbours' keys)     → encrypted shares    SecAggServer.collect_shares
    mask  (shares for me)        → masked input        SecAggServer.collect_masked
    check (survivor set U3)      → signature over U3   SecAggServer.collect_signatures
    unmask (who survived, sigs)  → shares to unmask    SecAggServer.finish

The server learns only the sum over the clients whose masked input was included. What the
clients sum is a summable encoding (:mod:`fedsqueeze.contracts.summable`): by default each
update clipped to ``clip`` and weighted by ``min(n_i, weight_cap)`` inside the mask (or
unweighted with ``weight_cap = 0``); with ``CentralDP`` or ``DistributedDP`` directly inside,
the encoding is theirs and the decoded sum goes to them (they noise, divide and account).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsqueeze.compression.sketch import MAX_GAIN, SketchAccumulator, default_k
from fedsqueeze.compression.stages import Hadamard, Sketch
from fedsqueeze.contracts.records import RecordNames, flatten, from_record, unflatten
from fedsqueeze.contracts.secure_wire import (
    CHECK,
    ENCODING_PREFIX,
    MASK,
    REPLY_KEY,
    SECAGG_KEY,
    SETUP,
    SHARE,
    STAGES,
    UNMASK,
    WIRE_FIELD,
    SecureWireError,
    stage_record,
    to_fields,
    unpack_reply,
)
from fedsqueeze.contracts.streams import Stream, round_rng, round_seed
from fedsqueeze.contracts.summable import (
    ClippedSum,
    HadamardQuantSum,
    Projected,
    SketchSum,
    SummableEncoding,
    WeightedSum,
    choose_integer_encoding,
    random_k,
    sketched,
)
from fedsqueeze.secagg import (
    SecAggAbort,
    SecAggConfig,
    SecAggConfigError,
    SecAggServer,
)
from fedsqueeze.secagg.config import DEFAULT_CORRUPT, DEFAULT_DROPOUT, protocol_params
from fedsqueeze.secagg.field import from_field
from fedsqueeze.server.compose import (
    FLOWER_DP,
    DelegatingStrategy,
    StrategyCompositionError,
    below,
    refuse_below,
    refuse_flower_dp_caller,
)
from fedsqueeze.server.dp import DistributedDP, LocalDP
from fedsqueeze.server.hooks import RoundHook
from fedsqueeze.server.strategy import CompressedStrategy, mean_metric, merge_delta

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


class SecureSumAggregator(Protocol):
    """A DP mode that works on a secure sum (``CentralDP``, ``DistributedDP``)."""

    def summable_encoding(
        self, *, dim: int, num_clients: int, bits: int, scale: float, rotation_seed: int
    ) -> SummableEncoding:
        """The encoding clients use for a ``dim``-long (sub-)vector this round."""

    def aggregate_secure_sum(
        self,
        server_round: int,
        total: Arrays,
        contributors: int,
        template: Message,
        metrics: Mapping[str, float],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate from the decoded sum of ``contributors`` clients' encoded updates."""


def outside_honest_range(encoding: SummableEncoding, int_sum: np.ndarray, count: int) -> str:
    """Why the decoded sum of ``count`` clients is one no honest clients produce ("" if not).

    For the clipped encodings (:class:`ClippedSum`, :class:`WeightedSum`, inside random-k)
    each honest client sends ``x_i = round(scale * w_i / cap * clip(u_i))`` (``w_i / cap = 1``
    unweighted) and, weighted, its weight ``w_i`` in ``[0, cap]``. So honest sums satisfy:
    the summed weight ``W`` in ``[1, count * cap]`` (``count`` unweighted); every coordinate
    ``|s_j| <= scale * clip * W / cap + count`` (rounding moves each by < 1); and
    ``||s|| <= scale * clip * W / cap + count * sqrt(d)`` (triangle inequality). Outside
    that, at least one included client sent something no honest client could, and the
    round's sum is refused. Inside it the mean has norm at most ``clip`` plus rounding:
    a forged weight or a huge vector cannot scale the update up. ``hadamard+qB`` has its own
    bounds (:meth:`~fedsqueeze.contracts.summable.HadamardQuantSum.outside_range`). DP
    encodings return "": their wrappers bound (and noise) the sum.
    """
    enc = encoding.inner if isinstance(encoding, Projected) else encoding
    if isinstance(enc, HadamardQuantSum):
        return enc.outside_range(int_sum, count)
    if not isinstance(enc, ClippedSum):
        return ""
    s = np.asarray(int_sum, dtype=np.int64)
    if isinstance(enc, WeightedSum):
        vec, weight = s[:-1], int(s[-1])
        if not 1 <= weight <= count * enc.weight_cap:
            return (
                f"summed weight {weight} of {count} clients is outside the honest range "
                f"[1, {count * enc.weight_cap}] (a forged hidden weight)"
            )
        units = weight / enc.weight_cap
    else:
        vec, units = s, float(count)
    reach = enc.scale * enc.clip * units
    worst = int(np.abs(vec).max()) if vec.size else 0
    if worst > reach + count:
        return (
            f"a coordinate sum ({worst}) exceeds what {count} clients clipped to {enc.clip:g} "
            f"can produce ({reach + count:.0f})"
        )
    norm = float(np.linalg.norm(vec.astype(np.float64)))
    if norm > reach + count * math.sqrt(vec.size):
        return (
            f"the sum's norm ({norm:.0f}) exceeds what {count} clients clipped to {enc.clip:g} "
            f"can produce ({reach + count * math.sqrt(vec.size):.0f})"
        )
    return ""


def simulated_dropouts(
    seed: int, server_round: int, node_ids: Sequence[int], fraction: float
) -> dict[int, str]:
    """Which sampled clients fail this round, and at which stage (seeded by seed and round)."""
    if fraction <= 0 or not node_ids:
        return {}
    rng = round_rng(seed, server_round, Stream.SIMULATED_DROPOUT)
    count = round(fraction * len(node_ids))
    ids = sorted(node_ids)
    chosen = rng.choice(len(ids), size=count, replace=False) if count else []
    return {ids[int(i)]: STAGES[int(rng.integers(len(STAGES)))] for i in chosen}


def _collect(
    replies: Iterable[Message], stage: str, requests: Mapping[int, Mapping[str, Any]]
) -> tuple[dict[int, dict[str, Any]], list[Message]]:
    """Stage replies by node, in the core's form; error replies count as dropouts.

    A reply whose wire form does not fit the request reaches the core as an empty message,
    so the core rejects that client and lists it in ``rejected``.
    """
    out: dict[int, dict[str, Any]] = {}
    ok: list[Message] = []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error() or REPLY_KEY not in reply.content.config_records:
            continue
        blob = reply.content.config_records[REPLY_KEY].get(WIRE_FIELD)
        try:
            if not isinstance(blob, bytes):
                raise SecureWireError(f"field {WIRE_FIELD!r} is not bytes")
            out[node] = unpack_reply(stage, blob, requests.get(node, {}))
        except SecureWireError as exc:
            log.warning("client %d: malformed %s reply (%s); rejected", node, stage, exc)
            out[node] = {}
        ok.append(reply)
    return out, ok


@dataclass
class _Round:
    """One round's protocol: its server core, encoding and global model."""

    server_round: int
    server: SecAggServer
    encoding: SummableEncoding
    global_arrays: Arrays
    started: float
    report: dict[str, Any] = field(default_factory=dict)


class SecAggStrategy(DelegatingStrategy, RoundHook):
    """SecAgg+ around ``inner`` (any weighted-mean Flower strategy, or a DP mode).

    Parameters
    ----------
    inner
        FedAvg and its family, or ``CentralDP`` / ``DistributedDP`` wrapping one.
    clip
        L2 bound of each client's update (without a DP mode; a DP mode brings its own).
    bits, scale
        Field width b and integer scale; 0 = the other one's complement (see
        :func:`~fedsqueeze.contracts.summable.choose_integer_encoding`).
    neighbours, threshold
        SecAgg+ graph degree k and Shamir threshold t (0 = automatic: the degree bound of
        Bell et al. for the round's n, which is the full graph for small n, and the smallest
        threshold safe against an active server). A k below the bound is refused.
    dropout, corrupt
        Dropout rate and corrupted-client fraction the degree bound assumes (the larger of
        ``dropout`` and ``simulate_dropout`` is used).
    weight_cap
        Weight each update by ``min(n_i, weight_cap)`` inside the mask (``n_i`` = the
        strategy's weight key in the client's reply); 0 = the unweighted mean.
    randk
        Shared-seed random-k: only this fraction (or count) of coordinates is masked and sent.
    error_feedback
        Clients keep what random-k and rounding did not send, in their own state.
    sketch
        FetchSGD instead of random-k: clients send a count sketch (the ``sketch(F)`` codec
        stage), the server unsketches the summed sketch with its momentum and error
        (:class:`~fedsqueeze.compression.sketch.SketchAccumulator`). With
        :class:`~fedsqueeze.server.dp.DistributedDP` inside, each client's sketch is clipped
        and noised as a dense update of ``rows x cols`` coordinates would be, the hashes are
        the round's and the server applies its estimate of every coordinate (``k`` = d
        unless given) with no state between rounds.
    hadamard
        ``(Hadamard stage, B)`` for the ``hadamard+qB`` codec: the integer encoding (alone,
        of the random-k positions or of the sketch table) is
        :class:`~fedsqueeze.contracts.summable.HadamardQuantSum` — rotated with the round's
        seed, B bits per coordinate, a field of ``B + ceil(log2 n)`` bits; ``bits`` and
        ``scale`` are then unused (its scale comes from ``clip``). Not with a DP mode.
    seed
        Run seed for the reproducible per-round streams (graph, random-k, rotation).
    timeout
        Seconds to wait for each stage's replies.
    simulate_dropout
        Tell this fraction of sampled clients to fail at a random stage (tests, studies).
    """

    secure_sum = True
    """Marks a wrapper that aggregates by secure sum (what ``CompressedStrategy`` checks)."""

    def __init__(
        self,
        inner: Strategy,
        *,
        clip: float = 1.0,
        bits: int = 0,
        scale: float = 0.0,
        neighbours: int = 0,
        threshold: int = 0,
        weight_cap: int = 0,
        randk: float | int = 1.0,
        error_feedback: bool = False,
        sketch: Sketch | None = None,
        hadamard: tuple[Hadamard, int] | None = None,
        seed: int = 0,
        timeout: float = 600.0,
        simulate_dropout: float = 0.0,
        dropout: float = DEFAULT_DROPOUT,
        corrupt: float = DEFAULT_CORRUPT,
    ) -> None:
        self.inner = inner
        refuse_below(
            self,
            (CompressedStrategy, LocalDP, *FLOWER_DP),
            "the server never sees a client's update under secure aggregation; use "
            "fedsqueeze's CentralDP or DistributedDP directly inside SecAggStrategy, and "
            "CompressedStrategy (downlink only) and LocalDP outside it",
        )
        summers = [s for s in below(self) if hasattr(s, "summable_encoding")]
        if summers and summers[0] is not inner:
            raise StrategyCompositionError(
                f"{type(summers[0]).__name__} must be directly inside SecAggStrategy"
            )
        self.dp: SecureSumAggregator | None = inner if summers else None  # type: ignore[assignment]
        if summers:
            inner.attach_secure_sum()  # type: ignore[attr-defined]
        self.names = RecordNames.of(inner)
        self.clip, self.bits, self.scale = float(clip), int(bits), float(scale)
        self.neighbours, self.threshold = int(neighbours), int(threshold)
        self.weight_cap = int(weight_cap)
        self.randk = randk
        self.feedback = f"secagg:randk({randk})+ef" if error_feedback else ""
        if sketch is not None and (error_feedback or randk != 1.0):
            raise StrategyCompositionError(
                "sketch(F) keeps its error on the server: not with random-k or client error "
                "feedback"
            )
        if sketch is not None and self.dp is not None and not isinstance(inner, DistributedDP):
            # Central DP noises the decoded sum, i.e. the unsketched step, whose sensitivity
            # the clip does not bound; distributed DP noises each clipped sketch (see below).
            raise StrategyCompositionError(
                "sketch(F) under a DP mode needs DistributedDP (clients noise the clipped "
                f"sketch), not {type(inner).__name__}"
            )
        if isinstance(inner, DistributedDP) and inner.sketch != sketch:
            raise StrategyCompositionError(
                "give DistributedDP the same sketch stage as SecAggStrategy (it predicts the "
                "noised length from it)"
            )
        if sketch is not None and self.dp is not None and sketch.momentum:
            raise StrategyCompositionError(
                "sketch(F) under distributed DP draws fresh hashes every round and keeps no "
                "sketch-space state: no sketch momentum (use a server-momentum strategy)"
            )
        if hadamard is not None and self.dp is not None:
            raise StrategyCompositionError(
                f"hadamard+qB is its own integer encoding; not under {type(inner).__name__} "
                "(distributed DP already rotates and rounds)"
            )
        self.hadamard = hadamard
        self.sketch = sketch
        self._unsketch: SketchAccumulator | None = None
        self._unsketch_saved: dict[str, Any] = {}  # from a checkpoint, until the first round
        self.seed, self.timeout = int(seed), float(timeout)
        self.simulate_dropout = float(simulate_dropout)
        self.dropout, self.corrupt = float(dropout), float(corrupt)
        if self.neighbours < 0 or self.threshold < 0:
            raise SecAggConfigError("neighbours and threshold must be >= 0 (0 = automatic)")
        self._grid: Grid | None = None
        self._round: _Round | None = None
        self.report: dict[str, Any] = {}

    def summary(self) -> None:
        log.info("SecAggStrategy(clip=%s, bits=%s, randk=%s)", self.clip, self.bits, self.randk)
        self.inner.summary()

    # ---- setup ------------------------------------------------------------------------
    def _encoding(self, d: int, n: int, server_round: int) -> SummableEncoding:
        rotation_seed = round_seed(self.seed, server_round, Stream.ROTATION)

        def inner_for(length: int) -> SummableEncoding:
            if self.dp is not None:
                return self.dp.summable_encoding(
                    dim=length,
                    num_clients=n,
                    bits=self.bits,
                    scale=self.scale,
                    rotation_seed=rotation_seed,
                )
            if self.hadamard is not None:
                stage, levels_bits = self.hadamard
                return HadamardQuantSum(
                    length, self.clip, levels_bits, n, rotation_seed, stage.block or 0,
                    self.weight_cap,
                )  # fmt: skip
            return choose_integer_encoding(
                dim=length,
                num_clients=n,
                clip=self.clip,
                bits=self.bits,
                scale=self.scale,
                weight_cap=self.weight_cap,
            )

        if self.sketch is not None:
            # Without DP: one set of hashes per run, so the server's error adds up across
            # rounds. Under DP every cell carries noise of the order of the whole signal, so
            # heavy hitters cannot be told apart and the server applies the unbiased estimate
            # of every coordinate (k = d); fresh hashes every round then make the sketch's
            # collision error average out over rounds instead of confining the model to one
            # fixed F·d-dimensional subspace (see simulations/README.md).
            hash_round = server_round if self.dp is not None else 0
            seed = round_seed(self.seed, hash_round, Stream.SKETCH)
            return sketched(inner_for, d, self.sketch, seed)
        randk_seed = round_seed(self.seed, server_round, Stream.SECURE_RANDK)
        return random_k(inner_for, d, self.randk, randk_seed)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        refuse_flower_dp_caller(self)
        self._grid = grid
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        nodes = sorted(m.metadata.dst_node_id for m in messages)
        if len(nodes) < 2:
            log.warning("round %d: secure aggregation needs >= 2 clients", server_round)
            self._round = None
            return []
        global_arrays = from_record(arrays)
        encoding = self._encoding(int(flatten(global_arrays).size), len(nodes), server_round)
        k, t = protocol_params(
            self.neighbours,
            self.threshold,
            len(nodes),
            max(self.dropout, self.simulate_dropout),
            self.corrupt,
        )
        sa_config = SecAggConfig(
            num_clients=len(nodes),
            neighbours=k,
            threshold=t,
            bits=encoding.bits,
            vector_len=encoding.vector_len,
            round_seed=round_seed(self.seed, server_round, Stream.SECAGG_GRAPH),
        )
        server = SecAggServer(sa_config, nodes)
        setup = server.setup()
        drops = simulated_dropouts(self.seed, server_round, nodes, self.simulate_dropout)
        fields = to_fields(encoding.to_fields(), ENCODING_PREFIX)
        for msg in messages:
            node = msg.metadata.dst_node_id
            content = RecordDict(dict(msg.content.items()))  # broadcasts share one RecordDict
            content[SECAGG_KEY] = stage_record(
                SETUP,
                server_round,
                setup[node],
                **fields,
                **{"weight-key": self.names.weight, "feedback": self.feedback},
                **{"drop-stage": drops.get(node, "")},
            )
            msg.content = content
        self._round = _Round(server_round, server, encoding, global_arrays, time.perf_counter())
        self._round.report = {
            "secagg_bits": encoding.bits,
            "secagg_vector_len": encoding.vector_len,
            "secagg_neighbours": k,
            "secagg_threshold": t,
        }
        return messages

    # ---- the other stages and the sum ---------------------------------------------------
    def _exchange(
        self, server_round: int, stage: str, requests: Mapping[int, Mapping[str, Any]]
    ) -> dict[int, dict[str, Any]]:
        assert self._grid is not None
        messages = [
            Message(
                content=RecordDict({SECAGG_KEY: stage_record(stage, server_round, request)}),
                message_type=MessageType.TRAIN,
                dst_node_id=node,
            )
            for node, request in requests.items()
        ]
        replies = self._grid.send_and_receive(messages, timeout=self.timeout)
        return _collect(replies, stage, requests)[0]

    def _run_protocol(
        self, r: _Round, keys: dict[int, dict[str, Any]]
    ) -> tuple[np.ndarray, list[int]]:
        """``(signed integer sum, included clients)``; raises SecAggAbort."""
        t_train = time.perf_counter()
        shares = self._exchange(r.server_round, SHARE, r.server.collect_keys(keys))
        masked = self._exchange(r.server_round, MASK, r.server.collect_shares(shares))
        checks = self._exchange(r.server_round, CHECK, r.server.collect_masked(masked))
        out = r.server.collect_signatures(checks)
        answers = self._exchange(r.server_round, UNMASK, out)
        t_unmask = time.perf_counter()
        result = r.server.finish(answers)
        r.report["secagg_unmask_s"] = round(time.perf_counter() - t_unmask, 4)
        r.report["secagg_s"] = round(time.perf_counter() - t_train, 4)
        r.report.update(
            {
                "secagg_included": len(result.included),
                # Sent the masked input (so it is in the sum) but not its unmasking shares.
                "secagg_late_dropouts": len(set(result.included) - set(answers)),
            }
        )
        return from_field(result.total, r.encoding.bits), result.included

    def _count(self, r: _Round, included: Sequence[int]) -> None:
        """Every selected client counted once (:meth:`SecAggServer.counts`), culprits named."""
        c = r.server.counts(included)
        r.report.update(
            {
                "clients": c["clients"],
                "rejected_updates": c["rejected"],
                "dropped_clients": c["dropped"],
                "secagg_discarded": c["discarded"],
                "secagg_flagged": c["flagged"],
            }
        )
        if r.server.rejected:
            log.warning("round %d: secagg rejected %s", r.server_round, r.server.rejected)
            r.report["secagg_rejected"] = {str(k): v for k, v in sorted(r.server.rejected.items())}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r = self._round
        if r is None or r.server_round != server_round:
            return None, None
        self.report = r.report
        keys, ok = _collect(replies, SETUP, {})
        client_metrics = [
            {k: float(v) for k, v in rec.items() if isinstance(v, int | float)}
            for msg in ok
            for rec in msg.content.metric_records.values()
        ]
        metrics = mean_metric(client_metrics, "train-loss")
        try:
            total, ids = self._run_protocol(r, keys)
        except SecAggAbort as exc:
            log.warning("round %d: %s; global model kept", server_round, exc)
            r.report["secagg_aborted"] = 1
            self._count(r, [])
            return None, None
        r.report["secagg_round_s"] = round(time.perf_counter() - r.started, 4)
        included = len(ids)
        refused = "" if self.dp is not None else outside_honest_range(r.encoding, total, included)
        if refused:
            log.warning("round %d: %s; global model kept", server_round, refused)
            r.report["secagg_refused"] = 1
            self._count(r, [])
            return None, None
        self._count(r, ids)
        sum_flat, weight = r.encoding.decode_sum(total, included)
        template = ok[0]
        if self.dp is not None:
            if isinstance(r.encoding, SketchSum):
                # Post-processing of the noised sum; a fresh accumulator (this round's
                # hashes, no state) on the sum, which the DP mode divides by its fixed
                # denominator (the step is homogeneous: step(c·S) = c·step(S)).
                sum_flat = self._accumulator(r.encoding, r.encoding.dim).step(sum_flat)
            total_arrays = unflatten(sum_flat, r.global_arrays)
            return self.dp.aggregate_secure_sum(
                server_round, total_arrays, included, template, metrics
            )
        # Divide by at least one per included client: a summed weight forged small (a
        # negative hidden weight) cannot scale the update up (honest weights are >= 1).
        mean_flat = sum_flat / max(weight, included)
        if isinstance(r.encoding, SketchSum):
            mean_flat = self._unsketcher(r.encoding).step(mean_flat)
        mean = unflatten(mean_flat, r.global_arrays)
        return merge_delta(
            self.inner, server_round, r.global_arrays, mean, template, self.names, metrics
        )

    def _accumulator(self, encoding: SketchSum, k: int = 0) -> SketchAccumulator:
        """A fresh accumulator for ``encoding``'s sketch: the stage's ``k``, else ``k``, else
        :func:`~fedsqueeze.compression.sketch.default_k`."""
        assert self.sketch is not None
        k = self.sketch.k or k or default_k(encoding.dim, encoding.rows, encoding.cols)
        gain = self.sketch.gain or MAX_GAIN
        return SketchAccumulator(encoding.sketch, k, self.sketch.momentum or 0.0, gain)

    def _unsketcher(self, encoding: SketchSum) -> SketchAccumulator:
        acc = self._unsketch
        if acc is None or acc.sketch.key != encoding.sketch.key:
            acc = self._accumulator(encoding)
            if self._unsketch_saved:  # a resumed run: the hashes come from the run's seed
                acc.restore(self._unsketch_saved)
                self._unsketch_saved = {}
            self._unsketch = acc
        return acc

    # ---- round hook ---------------------------------------------------------------------
    hook_name = "secagg"

    def after_round(self, server_round: int, row: dict[str, Any]) -> None:
        row.update(self.report)
        self.report = {}

    def state(self) -> dict[str, Any]:
        """The sketch's server-side momentum and error (``sketch(F)``); nothing otherwise —
        every other SecAgg+ secret is per round and dies with it."""
        if self._unsketch is not None:
            return self._unsketch.state()
        return dict(self._unsketch_saved)

    def restore(self, state: dict[str, Any]) -> None:
        self._unsketch, self._unsketch_saved = None, dict(state)
