"""Deployment Engine: a real SuperLink with TLS and SuperNode authentication on loopback.

The app goes through ``flwr run`` exactly as a user would submit it to real devices, the
devices are started with the documented ``fedsqueeze device`` command; every Flower
process started for it is stopped by PID at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from deployment import deployment, marked_processes, run_config_arg

pytestmark = pytest.mark.e2e

RUN = {
    "dataset": "digits",  # the server's own evaluation data; the devices bring theirs
    "client-data": "device",
    "model": "logreg",
    "num-clients": 2,
    "clients-per-round": 2,
    "num-rounds": 2,
    "local-epochs": 1,
    "lr": 0.1,
}


def _device_files(root: Path) -> list[Path]:
    """A device's own training data (half of digits' training split, in the device's own
    directory) and a second device whose file is malformed (no ``y_train``)."""
    from fedsqueeze.data import load_dataset

    data = load_dataset("digits")
    idx = np.arange(0, len(data.y_train), 2)
    good, bad = root / "device0" / "data.npz", root / "device1" / "data.npz"
    for path in (good, bad):
        path.parent.mkdir(parents=True)
    np.savez(good, x_train=data.x_train[idx], y_train=data.y_train[idx])
    np.savez(bad, x_train=data.x_train[:50])
    return [good, bad]


def test_devices_train_on_their_own_data_over_tls_with_node_authentication(
    tmp_path: Path,
) -> None:
    """The issue's acceptance run: a real SuperLink with TLS and SuperNode authentication,
    two devices started with `fedsqueeze device` (each its own key, registered, and its own
    data file), the second one's file malformed, plus a stranger whose key was never
    registered. Two devices, not three: each message starts a ClientApp process that
    imports torch, and the e2e suite is at its time budget."""
    t0 = time.monotonic()
    files = _device_files(tmp_path / "devices")
    # The body ends by raising: the harness must stop everything on failure too (one
    # deployment for both claims keeps the e2e budget).
    with (
        pytest.raises(RuntimeError, match="body failed"),
        deployment(tmp_path / "dep", data_paths=files, auth=True) as dep,
    ):
        assert dep.superlink_address.startswith("127.0.0.1:")
        started = {name for name, _, _ in dep.group.started}
        assert started == {"superlink", "device0", "device1"}
        stranger = dep.device("stranger", files[0], register=False, daemon=False)
        result = dep.run(RUN, timeout=400)
        stranger_code = stranger.wait(timeout=60)
        stranger_log = (dep.group.root / "logs" / "stranger.log").read_text(errors="replace")
        assert len(dep.group.remember()) >= 3  # SuperLink + 2 SuperNodes (+ SuperExecs)
        raise RuntimeError("body failed")
    elapsed = time.monotonic() - t0

    # Every process started here, and everything it spawned, is gone.
    assert dep.survivors() == []
    assert marked_processes(dep.group.marker) == []
    assert all(proc.poll() is not None for _, proc, _ in dep.group.started)

    # The unregistered SuperNode was refused by the SuperLink and exited.
    assert stranger_code != 0, stranger_log
    assert "Failed to activate SuperNode" in stranger_log, stranger_log
    rows = result.metrics()
    assert [r["round"] for r in rows] == [1, 2]
    # Each round completed with the good device; the malformed one is reported.
    assert all(r["clients"] == 1 for r in rows), rows
    assert all(r["dropped_clients"] + r["rejected_updates"] >= 1 for r in rows), rows
    assert rows[1]["accuracy"] > rows[0]["accuracy"], rows
    assert rows[1]["accuracy"] > 0.8
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["num_rounds"] == 2
    assert result.run_dir == tmp_path / "dep" / "run-1"
    # The malformed device said why, in one line of its own log.
    bad_log = (tmp_path / "dep" / "logs" / "device1.log").read_text(errors="replace")
    assert f"device data {files[1]}: missing array(s) y_train" in bad_log
    print(f"deployment (TLS + auth): run {result.wall_s:.1f} s, total {elapsed:.1f} s")


def test_run_config_arg_quotes_strings_and_keeps_numbers() -> None:
    arg = run_config_arg(
        {"model": "logreg", "num-rounds": 2, "lr": 0.1, "secagg": False, "out-dir": "/tmp/a b"}
    )
    assert arg == 'model="logreg" num-rounds=2 lr=0.1 secagg=false out-dir="/tmp/a b"'
    with pytest.raises(TypeError, match="not bool/int/float/str"):
        run_config_arg({"x": [1]})
