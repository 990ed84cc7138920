"""Server side of low-rank layers: a strategy wrapper (and round hook) that sends factors.

``LowRankStrategy(inner, rank=8, start_round=1)`` wraps the rest of the chain, as
``PruningStrategy`` does. From ``start_round`` on, each round it

1. factorizes the global model by truncated SVD (:func:`fedsqueeze.models.lowrank.factorize`)
   at the ranks chosen once, in ``start_round``, from the global model then
   (:func:`~fedsqueeze.models.lowrank.choose_ranks`: a rank, or a fraction of each layer's
   energy), with each layer's constant scale ``c = 1 / sigma_max`` chosen then too
   (:func:`~fedsqueeze.models.lowrank.choose_scales`: without it the factors train at an
   effective learning rate several times the configured one and the federation collapsed),
   and hands the wrapped chain the factors — so the downlink codec, the uplink codec
   and secure aggregation all work on the smaller factor arrays without knowing about
   low rank — and names the layers and ranks in every train/evaluate message
   (``fedsqueeze.lowrank``, for ``lowrank_mod``);
2. the wrapped chain averages the clients' trained factors (each factor with FedAvg's
   weights), and this wrapper keeps those factors and returns the dense model ``c * U @ V`` to
   the round loop (evaluation, checkpoint, ``model.pt``), which is exactly of rank <= r.

The next round sends the kept factors (not a fresh SVD of the product, whose factors would
differ by a rotation from what the clients' optimizers just moved); only when the round loop
hands in other weights (a resumed run) are they factorized again — exactly, as they have
rank <= r.

The wrapped stock strategy must keep no per-coordinate state (FedAvgM's momentum, FedAdam's
moments have the dense shapes before ``start_round``). In the round before ``start_round``
downlink acknowledgements are withheld from the wrapped chain, so a compressed downlink
sends the factors in full rather than a delta against dense weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsqueeze.contracts.records import (
    DOWNLINK_ACK_KEY,
    LOWRANK_KEY,
    from_record,
    to_record,
    without,
)
from fedsqueeze.models.lowrank import (
    check_supported,
    choose_ranks,
    choose_scales,
    expand,
    factorize,
    parameter_counts,
)
from fedsqueeze.server.compose import refuse_below
from fedsqueeze.server.hooks import RoundHook
from fedsqueeze.server.pruning import STATEFUL_STRATEGIES

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


def _same(a: Arrays, b: Arrays) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


class LowRankStrategy(Strategy, RoundHook):
    """Clients train low-rank factors of the global model; see the module docstring.

    Parameters
    ----------
    inner
        The rest of the strategy chain.
    rank
        An integer rank ``>= 1`` (capped per layer at its full rank), or a fraction in
        ``(0, 1)`` of each layer's energy (sum of squared singular values) to keep.
    start_round
        First round trained on factors (before it, the dense model).
    """

    hook_name = "lowrank"

    def __init__(self, inner: Strategy, rank: float, start_round: int = 1) -> None:
        if not (rank >= 1 and float(rank).is_integer()) and not 0 < rank < 1:
            raise ValueError(f"rank must be an integer >= 1 or a fraction in (0, 1), got {rank}")
        if start_round < 1:
            raise ValueError(f"start_round must be >= 1, got {start_round}")
        self.inner, self.rank, self.start_round = inner, float(rank), int(start_round)
        refuse_below(
            self,
            STATEFUL_STRATEGIES,
            "its server state has the dense model's shapes, which the factors replace",
        )
        self.ranks: dict[str, int] | None = None
        self.scales: dict[str, float] | None = None
        self.counts: dict[str, tuple[int, int]] = {}
        self._factors: Arrays | None = None
        self._dense: Arrays | None = None

    def summary(self) -> None:
        log.info("LowRankStrategy(rank=%s, from round %d)", self.rank, self.start_round)
        self.inner.summary()

    # ---- factors ------------------------------------------------------------------------
    def _factors_of(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord | None:
        if server_round < self.start_round:
            return None
        dense = from_record(arrays)
        if self.ranks is None:
            self.ranks = choose_ranks(dense, self.rank)
        if self.scales is None:
            self.scales = choose_scales(dense, self.ranks)
        if not self.counts:
            self.counts = parameter_counts(dense, self.ranks)
            log.info("low-rank layers (rank, dense -> factor parameters): %s", self._layers())
        if self._factors is None or self._dense is None or not _same(dense, self._dense):
            self._factors, self._dense = factorize(dense, self.ranks, self.scales), dense
        return to_record(self._factors)

    def _layers(self) -> dict[str, dict[str, int]]:
        assert self.ranks is not None
        return {
            layer: {"rank": r, "dense": self.counts[layer][0], "factors": self.counts[layer][1]}
            for layer, r in self.ranks.items()
        }

    def _send(self, messages: Iterable[Message]) -> list[Message]:
        assert self.ranks is not None and self.scales is not None
        out = list(messages)
        for msg in out:
            msg.content[LOWRANK_KEY] = ConfigRecord(
                {
                    "layers": list(self.ranks),
                    "ranks": list(self.ranks.values()),
                    "scales": [self.scales[layer] for layer in self.ranks],
                }
            )
        return out

    def _receive(self, replies: Iterable[Message], server_round: int) -> list[Message]:
        replies = list(replies)
        if server_round + 1 == self.start_round:  # next round's weights have other shapes
            for msg in replies:
                if not msg.has_error() and DOWNLINK_ACK_KEY in msg.content:
                    msg.content = without(msg.content, DOWNLINK_ACK_KEY)
        return replies

    # ---- training and evaluation ---------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        factors = self._factors_of(server_round, arrays)
        if factors is None:
            return self.inner.configure_train(server_round, arrays, config, grid)
        return self._send(self.inner.configure_train(server_round, factors, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.inner.aggregate_train(
            server_round, self._receive(replies, server_round)
        )
        if arrays is None or server_round < self.start_round or self.ranks is None:
            return arrays, metrics
        self._factors = from_record(arrays)
        self._dense = expand(self._factors, self.ranks, self.scales)
        return to_record(self._dense), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        factors = self._factors_of(server_round, arrays)
        if factors is None:
            return self.inner.configure_evaluate(server_round, arrays, config, grid)
        return self._send(self.inner.configure_evaluate(server_round, factors, config, grid))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, self._receive(replies, server_round))

    # ---- round hook ----------------------------------------------------------------------
    def _sizes(self) -> dict[str, int]:
        if self._dense is None or self._factors is None:
            return {}
        return {
            "lowrank_params": int(sum(a.size for a in self._factors.values())),
            "model_bytes_dense": 4 * int(sum(a.size for a in self._dense.values())),
            "model_bytes_lowrank": 4 * int(sum(a.size for a in self._factors.values())),
        }

    def after_round(self, server_round: int, row: dict[str, Any]) -> None:
        row.update(self._sizes())

    def state(self) -> dict[str, Any]:
        return {
            "ranks": dict(self.ranks) if self.ranks is not None else None,
            "scales": dict(self.scales) if self.scales is not None else None,
        }

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("ranks") is not None:
            self.ranks = {str(k): int(v) for k, v in state["ranks"].items()}
        if state.get("scales") is not None:
            self.scales = {str(k): float(v) for k, v in state["scales"].items()}

    def summary_fields(self) -> dict[str, Any]:
        if self.ranks is None:
            return {}
        return {**self._sizes(), "lowrank_layers": self._layers()}


def lowrank_from_config(inner: Strategy, config: Any) -> Strategy:
    """``inner`` wrapped in :class:`LowRankStrategy` when the run config asks (``lowrank``)."""
    if float(config.get("lowrank", 0.0)) == 0.0:
        return inner
    from fedsqueeze.federation import new_model

    check_supported(new_model(config))  # a layer it cannot factor: one line, before round 1
    return LowRankStrategy(
        inner, rank=float(config["lowrank"]), start_round=int(config["lowrank-start-round"])
    )
