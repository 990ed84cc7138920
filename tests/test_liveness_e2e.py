"""Dead and slow clients in Flower's Simulation Engine (Ray), in one run: a client whose worker
process dies in round 1 (on the message and on Ray's retry of it), and one that sleeps past
``node-timeout`` (until the run's last round is written, so past the timeout however loaded
the machine is). Later rounds keep the other clients, and the dead one is back once Ray has
restarted its worker; the sleeper is dropped from its round, counted, and sent no more work
while it is busy. (tests/test_liveness.py covers the sampling and the stop rule in process.)"""

from __future__ import annotations

import functools
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

ROUNDS = 3
NODE_TIMEOUT = 40.0
"""Generous for the honest clients' first train message (data loading, a few seconds on an idle
machine); the sleeper is past it by construction."""
SLEEP_CAP_S = 3 * NODE_TIMEOUT
"""The sleeper never hangs the test for long: it gives up after this even if no row appears."""


def _train_of(msg: Message, context: Context, partition: int) -> bool:
    return (
        msg.metadata.message_type == "train"
        and int(context.node_config["partition-id"]) == partition
    )


def _dying_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Partition 0's worker process dies on its round-1 train message, as an OOM kill does."""
    if _train_of(msg, context, 0) and int(msg.content["config"]["server-round"]) == 1:
        os._exit(1)
    return call_next(msg, context)


def _sleeping_mod(metrics: str, msg: Message, context: Context, call_next: Any) -> Message:
    """Partition 1 answers its first train message only once the run's last round is in
    ``metrics`` (the run directory's metrics.jsonl): far past ``node-timeout``, yet it
    returns before the run shuts down (Flower's shutdown waits for every Ray task)."""
    if _train_of(msg, context, 1):
        deadline = time.monotonic() + SLEEP_CAP_S
        path = Path(metrics)
        while time.monotonic() < deadline:
            if path.is_file() and len(path.read_text().splitlines()) >= ROUNDS:
                break
            time.sleep(0.2)
    return call_next(msg, context)


def test_dying_and_sleeping_clients_do_not_starve_later_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On main Flower put the dead Ray actor back into its pool, where it failed every later
    message it got, and sent the sleeping client a message every round, each one taking
    another worker: rounds 2.. lost most or all of their clients."""
    from fedsqueeze.client import app as client_app_module

    run_dir = tmp_path / "run"
    cfg = resolve_config(
        {
            "dataset": "digits",
            "model": "logreg",
            "num-clients": 4,
            "clients-per-round": 4,
            "num-rounds": ROUNDS,
            "local-epochs": 1,
            "min-clients": 2,
            # An actor per client (2 CPUs here): the sleeper holds one for the whole run.
            "client-cpus": 0.5,
            "node-timeout": NODE_TIMEOUT,
        }
    )
    sleeper = functools.partial(_sleeping_mod, str(run_dir / "metrics.jsonl"))
    original = client_app_module.build_client_app
    monkeypatch.setattr(
        client_app_module,
        "build_client_app",
        lambda config: original(config, extra_mods=[_dying_mod, sleeper]),
    )
    summary = simulate(cfg, run_dir, quiet=True)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    # Round 1 goes on without partition 0 (dead) and the sleeper (no reply within
    # node-timeout): both counted as dropped; partitions 2 and 3 answer.
    assert (rows[0]["clients"], rows[0]["dropped_clients"]) == (2, 2)
    for r in rows[1:]:
        # Every partition is accounted for; the busy sleeper is never sent another message.
        assert r["clients"] + r["dropped_clients"] + r["unavailable_clients"] == 4
        assert r["unavailable_clients"] >= 1 and r["clients"] >= 2
    # Partition 0 answers again once Ray has restarted its worker (on main its dead actor
    # stayed in the pool and failed every message it was given).
    assert max(r["clients"] for r in rows[1:]) == 3
    assert summary["rounds_below_min_clients"] == 0
