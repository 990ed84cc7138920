"""Liveness of the federation, in process: busy nodes are left out, empty rounds end the run.

A grid whose nodes can hang stands in for the engine (Flower's grids leave a message nobody
answered in time in the link state and hand its reply over later, when pulled); the
Simulation Engine itself is exercised in tests/test_liveness_e2e.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

import inprocess
import pytest
from flwr.app import Context, Message, RecordDict

from fedsqueeze import cli
from fedsqueeze.client.app import build_client_app
from fedsqueeze.config import ConfigError, resolve_config
from fedsqueeze.server.liveness import FederationStalled
from fedsqueeze.server.rounds import ClientSampler, run_federation, sample_partitions
from fedsqueeze.server.rundir import SUMMARY, RunDir

RUN = {
    "dataset": "digits",
    "model": "logreg",
    "num-clients": 4,
    "clients-per-round": 3,
    "num-rounds": 3,
    "local-epochs": 1,
    "batch-size": 64,
    "lr": 0.1,
}


class _HangingGrid(inprocess.InProcessGrid):
    """Train messages to ``hanging`` partitions get no reply in their round; the reply can be
    pulled later once the partition is ``released``."""

    def __init__(self, app: Any, n: int, hanging: Iterable[int]) -> None:
        super().__init__(app, n)
        self.hanging = {1000 + p for p in hanging}
        self.released: set[int] = set()
        self.unanswered: dict[str, Message] = {}
        self.trained: list[list[int]] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:  # as Flower's grids do when they push a message
            msg.metadata.__dict__["_message_id"] = uuid4().hex
        if messages and messages[0].metadata.message_type == "train":
            self.trained.append(sorted(m.metadata.dst_node_id - 1000 for m in messages))
            hung = [m for m in messages if m.metadata.dst_node_id in self.hanging]
            self.unanswered.update({m.metadata.message_id: m for m in hung})
            messages = [m for m in messages if m not in hung]
        return super().send_and_receive(messages, timeout=timeout)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        late = [self.unanswered[i] for i in message_ids if i in self.unanswered]
        late = [m for m in late if m.metadata.dst_node_id in self.released]
        for m in late:
            del self.unanswered[m.metadata.message_id]
        return [Message(RecordDict(), reply_to=m) for m in late]


def test_a_hanging_client_is_left_out_until_it_answers(tmp_path: Path) -> None:
    cfg = resolve_config(RUN)
    samples = [sample_partitions(int(cfg["seed"]), r, 4, 3) for r in (1, 2, 3)]
    hung = min(set(samples[0]) & set(samples[1]))
    grid = _HangingGrid(build_client_app(cfg), 4, hanging=[hung])

    def on_round(row: dict[str, Any]) -> None:
        grid.hanging.clear()  # it only hangs on round 1's message...
        if row["round"] == 2:
            grid.released.add(1000 + hung)  # ...which it answers during round 2

    run_federation(grid, cfg, RunDir(tmp_path), on_round=on_round, node_timeout=5)
    rows = RunDir(tmp_path).read_metrics()
    assert grid.trained[0] == samples[0]
    # Round 2: the seeded sample without the busy partition, topped up to 3 from the rest.
    assert hung not in grid.trained[1] and len(grid.trained[1]) == 3
    assert set(samples[1]) - {hung} <= set(grid.trained[1])
    # Round 3: its late reply was collected; sampling is back to the seeded one.
    assert grid.trained[2] == samples[2]
    assert [r["clients"] for r in rows] == [2, 3, 3]
    assert [r["dropped_clients"] for r in rows] == [1, 0, 0]
    assert [r["unavailable_clients"] for r in rows] == [0, 1, 0]
    assert all(r["min_clients_met"] for r in rows)


def _failing_mod(msg: Message, context: Context, call_next: Any) -> Message:
    if msg.metadata.message_type == "train":
        raise RuntimeError("out of memory")
    return call_next(msg, context)


def test_rounds_without_usable_replies_end_the_run(tmp_path: Path) -> None:
    """On main the run went on over empty rounds and wrote a normal summary."""
    cfg = resolve_config(RUN, {"num-rounds": 5, "max-failed-rounds": 2})
    grid = inprocess.InProcessGrid(build_client_app(cfg, extra_mods=[_failing_mod]), 4)
    with pytest.raises(FederationStalled, match=r"2 rounds in a row .* min-clients = 1"):
        run_federation(grid, cfg, RunDir(tmp_path), node_timeout=5)
    rows = RunDir(tmp_path).read_metrics()
    assert [(r["round"], r["clients"], r["min_clients_met"]) for r in rows] == [(1, 0, False)]
    assert not (tmp_path / SUMMARY).exists()


def test_empty_rounds_are_counted_and_never_block(tmp_path: Path) -> None:
    """Every node hangs: in round 3 no node is available and the round shows the strategy
    none (Flower's sampler would wait forever for its minimum); max-failed-rounds = 0 only
    reports."""
    cfg = resolve_config(RUN, {"min-clients": 2, "max-failed-rounds": 0})
    grid = _HangingGrid(build_client_app(cfg), 4, hanging=range(4))
    summary = run_federation(grid, cfg, RunDir(tmp_path), node_timeout=5)
    rows = RunDir(tmp_path).read_metrics()
    first = sample_partitions(int(cfg["seed"]), 1, 4, 3)
    assert [r["unavailable_clients"] for r in rows] == [0, 3, 4]
    # Round 2 trains the one partition left (it hangs too); round 3 sends nothing.
    assert grid.trained == [first, sorted(set(range(4)) - set(first))]
    assert [r["min_clients_met"] for r in rows] == [False] * 3
    assert summary["rounds_below_min_clients"] == 3


@pytest.mark.parametrize("dp", ["none", "central"])
def test_sampling_leaves_out_unavailable_partitions(dp: str) -> None:
    sampler = ClientSampler({"seed": 3, "dp": dp})
    for rnd in range(1, 30):
        if dp == "none":
            assert sampler.sample(rnd, 10, 4, set(range(10))) == sample_partitions(3, rnd, 10, 4)
        full = sampler.sample(rnd, 10, 4)
        available = set(range(10)) - {full[0]}
        got = sampler.sample(rnd, 10, 4, available)
        assert full[0] not in got and set(full[1:]) <= set(got)
        # Without DP topped up to 4; under DP not (it would raise the others' sampling rate).
        assert len(got) == (4 if dp == "none" else 3)


def test_min_clients_above_clients_per_round_is_refused() -> None:
    with pytest.raises(ConfigError, match="min-clients = 4 exceeds clients-per-round = 3"):
        resolve_config(RUN, {"min-clients": 4})


def test_cli_exits_3_with_one_line_and_keeps_the_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def stalled(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise FederationStalled("3 rounds in a row had fewer than min-clients = 1 usable replies")

    monkeypatch.setattr(cli, "simulate", stalled)
    out = tmp_path / "run"
    status = cli.main(["simulate", "--quiet", "--set", "model=logreg", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == cli.EXIT_STALLED == 3
    assert err.count("\n") == 1 and "min-clients" in err
    assert out.is_dir()  # resumable: --resume retries from the last good round


def _handshake_failing_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Partition 2 cannot start (its data, say): it fails the start-of-run query."""
    if msg.metadata.message_type == "query" and int(context.node_config["partition-id"]) == 2:
        raise RuntimeError("Traceback (most recent call last):\n  ...\nOSError: no data here")
    return call_next(msg, context)


@pytest.mark.parametrize("resume", [False, True])
def test_failed_handshake_is_one_line_exit_3(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    resume: bool,
) -> None:
    """The real handshake on the in-process grid, where run_simulation would re-raise the
    ServerApp's exception: on main a FederationError was a traceback out of the CLI. A new run
    directory is removed (no round ran); a resumed one is kept."""

    def simulate(config: Any, run_dir: Path, quiet: bool = False) -> dict[str, Any]:
        app = build_client_app(config, extra_mods=[_handshake_failing_mod])
        grid = inprocess.InProcessGrid(app, int(config["num-clients"]))
        return run_federation(grid, config, RunDir(run_dir), node_timeout=5)

    monkeypatch.setattr(cli, "simulate", simulate)
    out = tmp_path / "run"
    args = ["simulate", "--quiet", "--set", "model=logreg", "--set", "num-clients=4"]
    if resume:
        assert cli._create_run_dir(out, resolve_config(RUN)) is not None
        args += ["--resume", str(out)]
    else:
        args += ["--set", "clients-per-round=3", "--out", str(out)]
    status = cli.main(args)
    err = capsys.readouterr().err
    assert status == cli.EXIT_STALLED == 3
    assert err.count("\n") == 1 and err.startswith("fedsqueeze: run stopped before round 1:")
    assert "failed the handshake" in err and "no data here" in err
    assert out.is_dir() == resume


def test_late_replies_through_flowers_in_memory_grid() -> None:
    """What WatchedGrid relies on, on the grid the Simulation Engine gives the ServerApp: a
    message nobody answered in time stays in Flower's link state, and its reply, when it
    comes, is handed over by ``pull_messages``."""
    import secrets

    from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    from fedsqueeze.server.liveness import Liveness, WatchedGrid

    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    state = factory.state()
    run = Run.create_empty(run_id=1)
    run.primary_task_id, run.federation_id = 7, NOOP_FEDERATION_ID
    state.run_ids[1] = RunRecord(run=run)
    state.task_store[7] = Task(task_id=7, run_id=1)
    nodes = []
    for _ in range(2):
        node = state.create_node(
            NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32), HEARTBEAT_INTERVAL_INF
        )
        state.acknowledge_node_heartbeat(node, HEARTBEAT_INTERVAL_INF)
        nodes.append(node)
    inner = InMemoryGrid(factory, pull_interval=0.01)
    inner.set_run(run)
    grid = WatchedGrid(inner)
    liveness = Liveness({}, grid, {0: nodes[0], 1: nodes[1]})
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]
    assert list(grid.send_and_receive(msgs, timeout=0.05)) == []  # nobody answered in time
    assert liveness.available() == set()
    # Node 0 answers late, as the engine's worker does when the ClientApp returns.
    (delivered,) = state.get_message_ins(node_id=nodes[0], limit=1)
    reply = Message(RecordDict(), reply_to=delivered)
    reply.metadata.__dict__["_message_id"] = uuid4().hex
    assert state.store_message_res(reply) is not None
    liveness.before_round(2)
    assert liveness.available() == {0} and liveness.unavailable == 1
