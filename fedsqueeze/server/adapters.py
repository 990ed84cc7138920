"""Server side of low-rank adapters (``lowrank-adapter = R``): clients train and send only
the adapters of a frozen base.

``AdapterStrategy(inner, rank=4, seed=0)`` wraps the rest of the chain. In its first round
the global model it is handed (a fresh one, or ``init-model``: a deployed model) becomes the
frozen **base**, and it makes rank-``R`` adapters for every Linear/Conv layer
(:func:`fedsqueeze.models.adapters.init_adapters`: ``B = 0``, so round 1 starts exactly at
the base). Each round it

1. hands the wrapped chain only the adapter arrays — so the downlink codec, clipping, DP
   noise, SecAgg masking and the uplink codec act on the adapters alone — and adds to each
   train message the frozen base (``fedsqueeze.frozen``, the record ``train-layers`` uses,
   counted in the downlink bytes) and the adapted layers and ranks
   (:data:`~fedsqueeze.models.adapters.ADAPTER_KEY`). On the client ``layers_mod`` joins base
   and adapters and freezes the base, ``adapter_mod`` makes the handler build the adapted
   architecture, and the reply carries the adapters only;
2. the wrapped chain averages the clients' adapters — ``A`` and ``B`` each with FedAvg's
   weights — and this wrapper keeps them and returns the merged model ``W + B @ A`` to the
   round loop, so evaluation, the checkpoint, ``model.pt`` and ``fedsqueeze export`` see
   the plain architecture (export needs no adapter code).

Averaging ``A`` and ``B`` separately is what federated LoRA does (FedIT, and FedAvg over
PEFT adapters generally): the message stays ``r * (out + in)`` numbers per layer and works
with every uplink stage, SecAgg included (the server only ever needs sums). It is not the
average of the clients' products: ``mean(B_i) @ mean(A_i) != mean(B_i @ A_i)``, the cross
terms ``(B_i - mean B) @ (A_j - mean A)`` are lost (or added). Every client starts from the
same ``A, B`` and moves them a little per round, so the error is second order in the
clients' drift; averaging products instead would need the full ``out x in`` update (no
uplink saving) or a re-factorization of a rank ``n * r`` sum on the server.

The base, the adapters and their ranks are checkpoint state: a resumed run continues the same
adapters on the same base. Weights the round loop hands in that are not the last merged model
(another hook changed them) become the new base with fresh adapters (the model is continuous;
the adapters restart).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsqueeze.contracts.records import from_record, to_record
from fedsqueeze.models.adapters import (
    ADAPTER_KEY,
    bytes_per_round,
    choose_ranks,
    init_adapters,
    merge,
)
from fedsqueeze.models.retrain import FROZEN_KEY, encode_arrays
from fedsqueeze.server.compose import DelegatingStrategy
from fedsqueeze.server.hooks import RoundHook

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


def _same(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


class AdapterStrategy(DelegatingStrategy, RoundHook):
    """Clients train rank-``rank`` adapters of a frozen base; see the module docstring."""

    hook_name = "adapters"

    def __init__(self, inner: Strategy, rank: int, seed: int = 0) -> None:
        if int(rank) < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank}")
        self.inner, self.rank, self.seed = inner, int(rank), int(seed)
        self.ranks: dict[str, int] = {}
        self.base: Arrays | None = None
        self.adapters: Arrays | None = None
        self._merged: Arrays | None = None

    def summary(self) -> None:
        log.info("AdapterStrategy(rank=%d)", self.rank)
        self.inner.summary()

    def _start(self, arrays: ArrayRecord) -> None:
        """Take ``arrays`` as the base (with fresh adapters) unless it is our last merge."""
        given = from_record(arrays)
        if self._merged is not None and _same(given, self._merged):
            return
        self.base = given
        self.ranks = choose_ranks(given, self.rank)
        self.adapters = init_adapters(given, self.ranks, self.seed)
        self._merged = None
        log.info("adapters (layer: rank): %s", self.ranks)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._start(arrays)
        assert self.base is not None and self.adapters is not None
        messages = list(
            self.inner.configure_train(server_round, to_record(self.adapters), config, grid)
        )
        frozen = ConfigRecord({"payload": encode_arrays(self.base)})
        layers = ConfigRecord({"layers": list(self.ranks), "ranks": list(self.ranks.values())})
        for msg in messages:
            msg.content[FROZEN_KEY] = frozen
            msg.content[ADAPTER_KEY] = layers
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        agg, metrics = self.inner.aggregate_train(server_round, replies)
        if agg is None or self.base is None or self.adapters is None:
            return agg, metrics
        new = from_record(agg)
        shapes = {k: np.shape(v) for k, v in self.adapters.items()}
        if {k: np.shape(v) for k, v in new.items()} != shapes or not all(
            np.all(np.isfinite(v)) for v in new.values()
        ):  # never corrupt the global model: keep the adapters we have
            log.warning("round %d: the aggregate is not this round's adapters; kept", server_round)
        else:
            self.adapters = {k: np.asarray(v, dtype=np.float32) for k, v in new.items()}
        self._merged = merge(self.base, self.adapters, self.ranks)
        return to_record(self._merged), metrics

    # ---- round hook ----------------------------------------------------------------------
    def after_round(self, server_round: int, row: dict[str, Any]) -> None:
        if self.base is not None:
            row.update(bytes_per_round(self.base, self.ranks))

    def state(self) -> dict[str, Any]:
        if self.base is None or self.adapters is None:
            return {}
        return {"base": dict(self.base), "adapters": dict(self.adapters), "ranks": self.ranks}

    def restore(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.base = {k: np.asarray(v) for k, v in state["base"].items()}
        self.adapters = {k: np.asarray(v, dtype=np.float32) for k, v in state["adapters"].items()}
        self.ranks = {str(k): int(r) for k, r in state["ranks"].items()}
        self._merged = merge(self.base, self.adapters, self.ranks)

    def summary_fields(self) -> dict[str, Any]:
        if self.base is None:
            return {}
        return {**bytes_per_round(self.base, self.ranks), "adapter_layers": dict(self.ranks)}


def adapters_from_config(inner: Strategy, config: Any) -> Strategy:
    """``inner`` wrapped in :class:`AdapterStrategy` when the run config asks
    (``lowrank-adapter``; the combinations it refuses are checked with the run config:
    :func:`fedsqueeze.contracts.checks.check_adapter_config`)."""
    rank = int(config.get("lowrank-adapter", 0))
    if rank == 0:
        return inner
    from fedsqueeze.federation import new_model
    from fedsqueeze.models.adapters import check_supported

    check_supported(new_model(config))  # a layer it cannot adapt: one line, before round 1
    return AdapterStrategy(inner, rank=rank, seed=int(config["seed"]))
