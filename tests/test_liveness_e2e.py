"""Dead and hanging clients in Flower's Simulation Engine (Ray): later rounds keep the others."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message

from fedsqueeze.cli import simulate
from fedsqueeze.config import resolve_config

pytestmark = pytest.mark.e2e

NODE_TIMEOUT = 10.0
RUN_DIR_ENV = "FEDSQUEEZE_TEST_RUN_DIR"  # Ray's workers inherit the driver's environment


def _round(msg: Message) -> int:
    return next(
        (
            int(c["server-round"])
            for c in msg.content.config_records.values()
            if "server-round" in c
        ),
        0,
    )


def _hostile_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Partition 0's worker process dies on every train message (as an OOM kill does);
    partition 1 hangs in round 1 until the server has finished round 2 (at most 120 s)."""
    if msg.metadata.message_type == "train":
        pid = int(context.node_config["partition-id"])
        if pid == 0:
            os._exit(1)
        if pid == 1 and _round(msg) == 1:
            metrics = Path(os.environ[RUN_DIR_ENV]) / "metrics.jsonl"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not (
                metrics.is_file() and len(metrics.read_text().splitlines()) >= 2
            ):
                time.sleep(0.2)
    return call_next(msg, context)


def test_dead_and_hanging_clients_do_not_starve_later_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsqueeze.client import app as client_app_module

    cfg = resolve_config(
        {
            "dataset": "digits",
            "model": "logreg",
            "num-clients": 4,
            "clients-per-round": 4,
            "num-rounds": 3,
            "local-epochs": 1,
            "node-timeout": NODE_TIMEOUT,
            "client-cpus": 0.5,  # 4 Ray actors on 2 CPUs: one may hang, one restart
        }
    )
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "run"))
    original = client_app_module.build_client_app
    monkeypatch.setattr(
        client_app_module,
        "build_client_app",
        lambda config: original(config, extra_mods=[_hostile_mod]),
    )
    summary = simulate(cfg, tmp_path / "run", quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    # Partitions 2 and 3 answer in every round; on main, rounds 2.. had no client left.
    assert all(r["clients"] >= 2 and r["min_clients_met"] for r in rows), rows
    # Round 1: partition 0's error reply and partition 1's missing reply.
    assert rows[0]["dropped_clients"] == 2
    # Round 2 leaves partition 1 out while it still works on round 1's message.
    assert rows[1]["unavailable_clients"] == 1
    assert all(r["dropped_clients"] >= 1 for r in rows)  # partition 0 dies every round
    assert summary["rounds_below_min_clients"] == 0
