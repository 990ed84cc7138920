"""``flwr run .``: what the user sees, and the local simulation SuperLink it starts.

The e2e test runs ``flwr run .`` against the local simulation SuperLink that ``flwr run``
starts by itself. That SuperLink is detached and outlives the command: the test finds it
by PID and stops it (and the SuperExec it spawned) at the end. The unit tests drive the
ServerApp's handshake and round log in process.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from deployment import REPO, local_simulation, marked_processes
from flwr.app import Context, Message, RecordDict
from inprocess import InProcessGrid

from fedsqueeze.client.app import build_client_app
from fedsqueeze.config import resolve_config
from fedsqueeze.server.app import build_server_app, round_line
from fedsqueeze.server.rounds import FederationError, handshake

TINY = {"model": "logreg", "local-epochs": 1, "num-rounds": 1}


class GrowingGrid(InProcessGrid):
    """Nodes connect one at a time (every ``get_node_ids`` call shows one more)."""

    def __init__(self, app: Any, num_nodes: int, num_partitions: int) -> None:
        super().__init__(app, num_nodes)
        for ctx in self.contexts.values():
            ctx.node_config["num-partitions"] = num_partitions
        self.calls = 0
        self.queried: list[int] = []

    def get_node_ids(self) -> Iterable[int]:
        self.calls += 1
        return list(self.contexts)[: self.calls]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        self.queried += [m.metadata.dst_node_id for m in messages]
        return super().send_and_receive(messages, timeout=timeout)


def test_a_federation_of_another_size_fails_at_once_with_one_line() -> None:
    """`flwr run .` simulates 2 nodes by default; num-clients is 10. main waited for 10
    nodes for the whole timeout (600 s) and then raised; now the first node's answer ends it."""
    config = resolve_config(TINY)
    grid = GrowingGrid(build_client_app(config), num_nodes=2, num_partitions=2)
    t0 = time.monotonic()
    with pytest.raises(FederationError) as info:
        handshake(grid, num_clients=10, timeout=300)
    assert time.monotonic() - t0 < 60  # not the 300 s timeout (generous: the machine is shared)
    message = str(info.value)
    assert "num-partitions=2, but num-clients=10" in message
    assert "num-supernodes=10" in message and "\n" not in message


def test_nodes_that_connect_late_are_asked_too() -> None:
    config = resolve_config({**TINY, "num-clients": 3, "clients-per-round": 3})
    grid = GrowingGrid(build_client_app(config), num_nodes=3, num_partitions=3)
    assert handshake(grid, num_clients=3, timeout=60) == {0: 1000, 1: 1001, 2: 1002}
    assert sorted(grid.queried) == [1000, 1001, 1002]  # each asked exactly once


def test_two_nodes_claiming_one_partition_are_refused() -> None:
    config = resolve_config({**TINY, "num-clients": 2, "clients-per-round": 2})
    grid = InProcessGrid(build_client_app(config), 2)
    grid.contexts[1001].node_config["partition-id"] = 0
    with pytest.raises(FederationError, match="both say partition-id=0"):
        handshake(grid, num_clients=2, timeout=60)


def test_the_server_app_logs_each_round_and_a_failed_handshake_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = resolve_config({**TINY, "num-clients": 2, "clients-per-round": 2, "num-rounds": 2})
    run_config = {**config, "out-dir": str(tmp_path / "run")}
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    server = build_server_app()  # as `flwr run` loads it: config from the Context
    caplog.set_level(logging.INFO, logger="flwr")
    server(InProcessGrid(build_client_app(config), 2), context)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fedsqueeze")]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [round_line(row, 2) for row in rows]
    assert lines[1].startswith("fedsqueeze round 2/2: accuracy ")
    assert f"uplink {rows[1]['uplink_bytes']} B" in lines[1]

    caplog.clear()
    grid = InProcessGrid(build_client_app(config), 2)
    for ctx in grid.contexts.values():
        ctx.node_config["num-partitions"] = 5
    with pytest.raises(FederationError):
        server(grid, context)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith("fedsqueeze: run stopped before round 1: node ")


@pytest.mark.e2e
def test_flwr_run_dot_in_the_local_simulation(tmp_path: Path) -> None:
    run = {
        "dataset": "digits",
        "model": "logreg",
        "num-clients": 3,
        "clients-per-round": 3,
        "num-rounds": 2,
        "local-epochs": 1,
        "lr": 0.1,
    }
    with local_simulation(tmp_path / "sim", num_supernodes=3, app=REPO) as sim:
        result = sim.run(run, timeout=170)
        superlinks = sim.superlinks()
        # Exactly one local SuperLink, on our free port, with its state in our FLWR_HOME.
        assert len(superlinks) == 1
        home = Path(sim.cli_env["FLWR_HOME"])
        assert (home / "local-superlink" / "superlink.log").is_file()
        assert str(tmp_path) in str(home)

    assert sim.survivors() == []
    assert marked_processes(sim.group.marker) == []
    assert not superlinks[0].alive()

    rows = result.metrics()
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] == 3 for r in rows)
    # `--stream` shows each round's accuracy and bytes (the ServerApp's log).
    streamed = (tmp_path / "sim" / "logs" / "flwr-run-1.log").read_text(errors="replace")
    for row in rows:
        assert round_line(row, 2) in streamed
    assert rows[-1]["accuracy"] > 0.8
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["num_rounds"] == 2
    print(f"flwr run . (simulation): {result.wall_s:.1f} s")
