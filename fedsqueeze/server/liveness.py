"""Liveness of the federation: busy nodes are not sampled, empty rounds end the run.

Flower's engines answer a message nobody replied to in time with nothing: the server's
``send_and_receive`` returns without it, but the node keeps working on it (a ClientApp
sleeping in the Simulation Engine holds its Ray actor, and every later message for that
node queues behind it; a SuperNode handles one message at a time too). Sending such a node
more work only takes more workers out of service: in the Simulation Engine, a node that
hangs in every round takes one more actor each round until no actor is left and every later
round is empty. So a node with an unanswered message is *busy*: :class:`WatchedGrid`
remembers the message, pulls its late reply before each round (and drops it: it was
trained on an old model), and the round samples only from nodes that are connected and not
busy (:meth:`Liveness.available`).

A round with fewer usable replies than ``min-clients`` is reported (a warning and
``"min_clients_met": false`` in ``metrics.jsonl``); ``max-failed-rounds`` such rounds in a
row end the run with :class:`FederationStalled` (``fedsqueeze simulate`` exits with status
3) instead of a summary over empty rounds. ``max-failed-rounds = 0`` only reports.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedsqueeze.server.grid import GridWrapper
from fedsqueeze.server.hooks import RoundHook

log = logging.getLogger(__name__)


class FederationStalled(RuntimeError):
    """Too many rounds in a row had fewer usable replies than ``min-clients``."""


class WatchedGrid(GridWrapper):
    """Delegates to ``inner``; remembers, per node, a message that got no reply in time."""

    def __init__(self, inner: Grid) -> None:
        super().__init__(inner)
        self.pending: dict[int, str] = {}
        """node id -> id of a message it has not answered yet."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        answered = {r.metadata.reply_to_message_id for r in replies}
        # Flower's grids set each message's id when they push it.
        for msg in messages:
            msg_id = msg.metadata.message_id
            if msg_id and msg_id not in answered:
                self.pending[msg.metadata.dst_node_id] = msg_id
        return replies

    def collect_late_replies(self) -> int:
        """Pull the replies that arrived after their round; those nodes are free again."""
        if not self.pending:
            return 0
        late = list(self.inner.pull_messages(list(self.pending.values())))
        done = {r.metadata.reply_to_message_id for r in late}
        self.pending = {n: m for n, m in self.pending.items() if m not in done}
        return len(late)


class Liveness(RoundHook):
    """Which partitions can take part in a round; the ``min-clients`` rule."""

    hook_name = "liveness"

    def __init__(
        self, config: Mapping[str, Any], grid: WatchedGrid, partition_nodes: Mapping[int, int]
    ) -> None:
        self.min_clients = int(config.get("min-clients", 1))
        self.max_failed = int(config.get("max-failed-rounds", 3))
        self.grid = grid
        self.partition_nodes = dict(partition_nodes)
        self.failed_in_a_row = 0
        self.failed_total = 0
        self.unavailable = 0

    def available(self) -> set[int]:
        """Partitions whose node is connected and has no unanswered message."""
        online = set(self.grid.get_node_ids())
        busy = set(self.grid.pending)
        return {p for p, n in self.partition_nodes.items() if n in online and n not in busy}

    def before_round(self, server_round: int) -> str:
        late = self.grid.collect_late_replies()
        if late:
            log.info("round %d: %d late replies from earlier rounds dropped", server_round, late)
        self.unavailable = len(self.partition_nodes) - len(self.available())
        if self.unavailable:
            log.warning(
                "round %d: %d clients unavailable (disconnected or still busy)",
                server_round,
                self.unavailable,
            )
        return ""

    def after_round(self, server_round: int, row: dict[str, Any]) -> None:
        usable = int(row.get("clients", 0))
        met = usable >= self.min_clients
        row["unavailable_clients"] = self.unavailable
        row["min_clients_met"] = met
        if met:
            self.failed_in_a_row = 0
            return
        self.failed_in_a_row += 1
        self.failed_total += 1
        log.warning(
            "round %d: %d usable replies, fewer than min-clients = %d (%d such rounds in a row)",
            server_round,
            usable,
            self.min_clients,
            self.failed_in_a_row,
        )
        if self.max_failed and self.failed_in_a_row >= self.max_failed:
            raise FederationStalled(
                f"{self.failed_in_a_row} rounds in a row (last: round {server_round}) had fewer "
                f"than min-clients = {self.min_clients} usable replies; stopping "
                f"(max-failed-rounds = {self.max_failed})"
            )

    def state(self) -> dict[str, Any]:
        return {"failed_in_a_row": self.failed_in_a_row, "failed_total": self.failed_total}

    def restore(self, state: dict[str, Any]) -> None:
        self.failed_in_a_row = int(state.get("failed_in_a_row", 0))
        self.failed_total = int(state.get("failed_total", 0))

    def summary_fields(self) -> dict[str, Any]:
        return {"rounds_below_min_clients": self.failed_total}
