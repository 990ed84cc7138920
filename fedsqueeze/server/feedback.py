"""Server-side error accumulation: DGC's momentum correction and error feedback, on the server.

``ServerFeedback(inner, momentum=0.9, density=0.1)`` wraps any strategy that aggregates
into new global weights. Each round it turns the wrapped strategy's aggregate into the
update ``aggregate - global`` and hands it to a
:class:`~fedsqueeze.compression.dgc.ServerAccumulator`: velocity ``u <- m*u + update``, error
``e <- e + u``, and only the ``density`` largest coordinates of ``e`` are applied to the
global model; the rest waits on the server. A client's residual waits on the client until
it is sampled again (many rounds under partial participation); the server's error is
applied as soon as it is large enough, every round. Momentum-factor masking clears ``u``
where a sparse step applied. ``momentum = 0, density = 1`` is the identity;
``momentum > 0, density = 1`` is server momentum (FedAvgM with server learning rate 1).

Inside :class:`~fedsqueeze.server.strategy.CompressedStrategy` it sees the decoded updates'
aggregate on the server's exact global model. Its state (velocity, error) is checkpointed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsqueeze.compression.dgc import ServerAccumulator
from fedsqueeze.contracts.records import from_record, to_record
from fedsqueeze.server.compose import DelegatingStrategy
from fedsqueeze.server.hooks import RoundHook


class ServerFeedback(DelegatingStrategy, RoundHook):
    """Apply the wrapped strategy's aggregate through a server-side DGC accumulator.

    Parameters
    ----------
    inner
        Any strategy whose ``aggregate_train`` returns the new global weights.
    momentum, density, masking
        See :class:`~fedsqueeze.compression.dgc.ServerAccumulator`.
    """

    hook_name = "server-feedback"

    def __init__(
        self, inner: Strategy, momentum: float = 0.0, density: float = 1.0, masking: bool = True
    ) -> None:
        self.inner = inner
        self.accumulator = ServerAccumulator(momentum, density, masking)
        self._global: dict[str, np.ndarray] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = from_record(arrays)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None or not self._global:
            return arrays, metrics
        return to_record(self.apply(from_record(arrays))), metrics

    def apply(self, aggregate: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The new global weights: the last global plus the accumulator's step."""
        names = list(self._global)
        update = np.concatenate(
            [np.zeros(0)]
            + [(aggregate[k].astype(np.float64) - self._global[k]).ravel() for k in names]
        )
        step = self.accumulator.step(update)
        out, start = {}, 0
        for k in names:
            g = self._global[k]
            out[k] = (g + step[start : start + g.size].reshape(g.shape)).astype(g.dtype)
            start += g.size
        return out

    # ---- round hook ----------------------------------------------------------------------
    def after_round(self, server_round: int, row: dict[str, Any]) -> None:
        error = self.accumulator.error
        row["server_error_norm"] = float(np.linalg.norm(error)) if error is not None else 0.0

    def state(self) -> dict[str, Any]:
        return self.accumulator.state()

    def restore(self, state: dict[str, Any]) -> None:
        self.accumulator.restore(state)


def server_feedback_from_config(inner: Strategy, config: Mapping[str, Any]) -> Strategy:
    """``inner`` wrapped in :class:`ServerFeedback` when the run config turns it on
    (``server-ef-momentum > 0`` or ``server-ef-density < 1``)."""
    momentum = float(config.get("server-ef-momentum", 0.0))
    density = float(config.get("server-ef-density", 1.0))
    if momentum == 0.0 and density >= 1.0:
        return inner
    return ServerFeedback(
        inner, momentum=momentum, density=density, masking=bool(config.get("dgc-masking", True))
    )
