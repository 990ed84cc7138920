"""A Grid that delivers each message to a ClientApp in this process (one Context per node).

The ClientApp, its mods, the strategy chain, the byte accounting and the seeds are the same
as in Flower's engines; only the transport is a function call (each message deep-copied, as
the wire would). Tests drive the real mods and strategy wrappers with it in milliseconds (the
engines themselves are exercised by the e2e tests), and ``fedsqueeze compare --engine
sequential`` and the simulation suites use it for measurements on a machine too loaded for
Ray's process pool.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid


class InProcessGrid(Grid):
    """Nodes ``1000 + i`` with node config ``partition-id = i`` (plus ``node_configs[i]``,
    e.g. a ``data-path``) run ``app``."""

    def __init__(
        self,
        app: ClientApp,
        num_nodes: int,
        node_configs: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> None:
        self.app = app
        extra = node_configs or {}
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes, **extra.get(i, {})},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            wire = copy.deepcopy(msg)  # the client gets its own copy, as over the network
            try:
                reply = self.app(wire, self.contexts[node])
            except Exception as exc:  # the engine turns a ClientApp exception into an error
                reply = Message(Error(code=0, reason=str(exc)), reply_to=wire)
            replies.append(reply)
        return replies

    # Unused by the round; required by the ABC.
    def set_run(self, run_id: int) -> None: ...  # type: ignore[override]
    def create_message(self, *args: Any, **kwargs: Any) -> Message: ...  # type: ignore[override]
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]: ...  # type: ignore[override]
    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]: ...  # type: ignore[override]

    @property
    def run(self) -> Any:  # type: ignore[override]
        return None
