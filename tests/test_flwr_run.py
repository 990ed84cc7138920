"""``flwr run .`` with the local simulation SuperLink that ``flwr run`` starts by itself.

That SuperLink is detached and outlives the command: the test finds it by PID and
stops it (and the SuperExec it spawned) at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from deployment import REPO, local_simulation, marked_processes

pytestmark = pytest.mark.e2e


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
    assert rows[-1]["accuracy"] > 0.8
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["num_rounds"] == 2
    print(f"flwr run . (simulation): {result.wall_s:.1f} s")
