"""Deployment Engine smoke test: a real SuperLink and two SuperNodes on loopback.

The app goes through ``flwr run`` exactly as a user would submit it to real devices;
every Flower process started for it is stopped by PID at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from deployment import deployment, marked_processes, run_config_arg

pytestmark = pytest.mark.e2e

RUN = {
    "dataset": "digits",
    "model": "logreg",
    "num-clients": 2,
    "clients-per-round": 2,
    "num-rounds": 2,
    "local-epochs": 1,
    "lr": 0.1,
}


def test_two_supernodes_learn_through_flwr_run(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with deployment(tmp_path / "dep", num_nodes=2) as dep:
        assert dep.superlink_address.startswith("127.0.0.1:")
        started = {name for name, _, _ in dep.group.started}
        assert started == {"superlink", "supernode0", "supernode1"}
        result = dep.run(RUN, timeout=170)
    elapsed = time.monotonic() - t0

    # Every process started here, and everything it spawned, is gone.
    assert dep.survivors() == []
    assert marked_processes(dep.group.marker) == []
    assert all(proc.poll() is not None for _, proc, _ in dep.group.started)

    rows = result.metrics()
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] == 2 for r in rows)
    assert rows[1]["accuracy"] > rows[0]["accuracy"], rows
    assert rows[1]["accuracy"] > 0.8
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["num_rounds"] == 2
    assert result.run_dir == tmp_path / "dep" / "run-1"
    # The SuperNodes trained on their own partitions: node config, not simulation.
    clients = json.loads((result.run_dir / "clients.json").read_text())
    assert clients, "clients.json is empty"
    print(f"deployment: run {result.wall_s:.1f} s, total with start/stop {elapsed:.1f} s")


def test_processes_are_stopped_when_the_body_fails(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="boom"),
        deployment(tmp_path / "dep", num_nodes=2) as dep,
    ):
        assert len(dep.group.remember()) >= 3  # SuperLink + 2 SuperNodes (+ their SuperExecs)
        raise RuntimeError("boom")
    assert dep.survivors() == []
    assert marked_processes(dep.group.marker) == []


def test_run_config_arg_quotes_strings_and_keeps_numbers() -> None:
    arg = run_config_arg(
        {"model": "logreg", "num-rounds": 2, "lr": 0.1, "secagg": False, "out-dir": "/tmp/a b"}
    )
    assert arg == 'model="logreg" num-rounds=2 lr=0.1 secagg=false out-dir="/tmp/a b"'
    with pytest.raises(TypeError, match="not bool/int/float/str"):
        run_config_arg({"x": [1]})
