"""A Grid view for one round: only the sampled nodes are visible, and every byte is counted.

Stock Flower strategies sample with ``random.sample`` over ``grid.get_node_ids()``;
showing them only the nodes fedsqueeze sampled (reproducibly, by seed and partition id)
keeps any strategy's own ``configure_train`` in use while making runs repeatable.

Bytes are counted from the records' sizes (:func:`~fedsqueeze.server.replies.record_size`,
equal to the serialized size) without serializing a message a second time: a client that
attaches a 512 MiB record nobody asked for costs the server no second copy of it.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedsqueeze.server.replies import record_size


def query_nodes(grid: Grid, nodes: Iterable[int], timeout: float) -> Iterable[Message]:
    """Ask ``nodes`` the query every fedsqueeze client answers (its node config: partition id
    and count, in the reply's ``node`` record); the replies, as the grid returns them."""
    messages = [
        Message(
            content=RecordDict({"config": ConfigRecord()}),
            message_type=MessageType.QUERY,
            dst_node_id=n,
        )
        for n in nodes
    ]
    return grid.send_and_receive(messages, timeout=timeout) if messages else ()


class GridWrapper(Grid):
    """A Grid that delegates every call to ``inner``; subclasses override what they watch."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)


class CountingGrid(GridWrapper):
    """Delegates to ``inner``; restricts ``get_node_ids`` and counts message bytes."""

    def __init__(self, inner: Grid, node_ids: Iterable[int] | None = None) -> None:
        super().__init__(inner)
        self.node_ids = None if node_ids is None else list(node_ids)
        self.downlink_bytes = 0
        self.uplink_bytes = 0
        self.messages_sent = 0
        self.replies_received = 0

    def add_counts(self, other: CountingGrid) -> None:
        """Add ``other``'s byte and message counts to this one's."""
        self.downlink_bytes += other.downlink_bytes
        self.uplink_bytes += other.uplink_bytes
        self.messages_sent += other.messages_sent
        self.replies_received += other.replies_received

    def get_node_ids(self) -> Iterable[int]:
        if self.node_ids is not None:
            return list(self.node_ids)
        return self.inner.get_node_ids()

    def _count_out(self, messages: list[Message]) -> None:
        # A broadcast shares one RecordDict between messages: serialize it once.
        sizes: dict[int, int] = {}
        for msg in messages:
            if msg.has_content():
                key = id(msg.content)
                if key not in sizes:
                    sizes[key] = record_size(msg.content)
                self.downlink_bytes += sizes[key]
        self.messages_sent += len(messages)

    def _count_in(self, replies: list[Message]) -> None:
        for msg in replies:
            if msg.has_content():
                self.uplink_bytes += record_size(msg.content)
        self.replies_received += len(replies)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._count_out(messages)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self._count_in(replies)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        self._count_out(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self._count_in(replies)
        return replies
