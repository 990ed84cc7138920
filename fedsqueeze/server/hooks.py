"""Round hooks: how a capability joins the server's round loop without a new branch in it.

A hook is told when a round starts and ends, may stop the run before a round (a privacy
budget), adds its fields to the round's ``metrics.jsonl`` row, keeps state for the
checkpoint and adds fields to ``summary.json``. fedsqueeze's strategy wrappers are hooks
themselves (the loop finds them in the strategy chain with :func:`hooks_in`); a pruning
schedule, a distillation step or an export is another hook passed to the loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class RoundHook:
    """No-op base: override what the capability needs."""

    hook_name: str = ""
    """Key of this hook's state in the checkpoint (empty: the hook keeps no state)."""

    def before_round(self, server_round: int) -> str:
        """``""`` to run round ``server_round``, else why the run stops before it."""
        return ""

    def after_round(self, server_round: int, row: dict[str, Any]) -> None:
        """Add this hook's fields to the round's metrics row (after aggregation)."""

    def state(self) -> dict[str, Any]:
        """State for the checkpoint: JSON values (``None``, bool, int, float, str, lists and
        string-keyed dicts of them), numpy arrays and bytes — nothing else, since the
        checkpoint is JSON plus an ``.npz`` archive, never a pickle
        (:func:`~fedsqueeze.server.rundir.pack_state` refuses any other type). Tuples come
        back as lists, numpy scalars as Python numbers."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` as read back from a checkpoint."""

    def summary_fields(self) -> dict[str, Any]:
        """Fields for ``summary.json``."""
        return {}


def strategy_chain(strategy: Any) -> list[Any]:
    """``strategy`` and every strategy it wraps (fedsqueeze's ``.inner``, Flower's
    ``.strategy``), outermost first."""
    chain: list[Any] = []
    while strategy is not None and len(chain) < 64 and all(s is not strategy for s in chain):
        chain.append(strategy)
        strategy = getattr(strategy, "inner", None) or getattr(strategy, "strategy", None)
    return chain


def hooks_in(strategy: Any, extra: Iterable[RoundHook] = ()) -> list[RoundHook]:
    """The hooks of a strategy chain (outermost first), then ``extra``."""
    return [s for s in strategy_chain(strategy) if isinstance(s, RoundHook)] + list(extra)
