"""Which wrapper orders are correct, and a clear error for the others.

fedsqueeze's wrappers and Flower's own compose in one way per meaning:

- ``CompressedStrategy`` is outside whatever aggregates: it turns compressed replies back into
  ordinary ``global + delta`` replies, so anything inside it (``CentralDP``, Flower's
  ``DifferentialPrivacy*`` wrappers, FedAvg, FedAdam, ...) sees plain weights;
- ``SecAggStrategy`` is outside the DP mode whose encoding its clients use (``CentralDP`` or
  ``DistributedDP``, directly inside it); a ``CompressedStrategy`` may wrap it only to
  compress the downlink;
- ``LocalDP`` only reads what clients report, so it goes outermost.

Refused, with :class:`StrategyCompositionError`: a DP wrapper outside the wrapper that
decodes or securely sums (it would clip compressed payloads or key advertisements — Flower's
server-side clipping then clips nothing while logging that it did); any of Flower's DP
wrappers inside ``SecAggStrategy`` (the server never sees a client's update there); a codec
other than random-k under secure aggregation. Our wrappers check the chain below them when
built; Flower's wrappers outside ours are caught when they call into ours, at round 1,
before any message is sent.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedsqueeze.server.hooks import strategy_chain

FLOWER_DP = (
    DifferentialPrivacyServerSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyClientSideAdaptiveClipping,
)


log = logging.getLogger(__name__)


class DelegatingStrategy(Strategy):
    """A strategy wrapper whose evaluation and summary pass through to ``self.inner``."""

    inner: Strategy

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log.info("%s", type(self).__name__)
        self.inner.summary()


class StrategyCompositionError(ValueError):
    """Strategy wrappers were composed in an order that would silently do the wrong thing."""


def below(strategy: Any) -> list[Any]:
    """Every strategy ``strategy`` wraps (not itself), outermost first."""
    return strategy_chain(strategy)[1:]


def refuse_below(wrapper: Any, kinds: Iterable[type], why: str) -> None:
    """Raise if any strategy wrapped by ``wrapper`` is one of ``kinds``."""
    kinds = tuple(kinds)
    for inner in below(wrapper):
        if isinstance(inner, kinds):
            raise StrategyCompositionError(
                f"{type(wrapper).__name__} cannot wrap {type(inner).__name__}: {why}"
            )


def refuse_flower_dp_caller(wrapper: Any) -> None:
    """Raise if one of Flower's DP wrappers is calling ``wrapper``'s ``configure_train``.

    Flower's wrappers call ``self.strategy.configure_train(...)`` directly, so the frame two
    above this one belongs to the wrapper outside ours, if any.
    """
    frame = inspect.currentframe()
    caller = frame.f_back.f_back if frame is not None and frame.f_back is not None else None
    outer = caller.f_locals.get("self") if caller is not None else None
    del frame, caller
    if isinstance(outer, FLOWER_DP):
        name = type(wrapper).__name__
        raise StrategyCompositionError(
            f"{type(outer).__name__} cannot wrap {name}: it would clip or noise what {name} "
            f"has not decoded yet (compressed payloads or SecAgg+ keys). Put it inside: "
            f"CompressedStrategy({type(outer).__name__}(FedAvg(...)), ...); under secure "
            "aggregation use fedsqueeze.server.CentralDP inside SecAggStrategy"
        )
