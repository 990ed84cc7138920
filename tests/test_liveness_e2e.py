"""Dead and slow clients in Flower's Simulation Engine (Ray), in one run: a client whose worker
process dies in every round, and one that sleeps past ``node-timeout`` (until the run's last
round is written, so past the timeout however loaded the machine is). Later rounds keep the
other clients; the sleeper is dropped from its round, counted, and not sent more work while
it is busy. (tests/test_liveness.py covers the sampling and the stop rule in process.)"""

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
SLEEP_CAP_S = 900.0
"""The sleeper never hangs the test forever: it gives up after this even if no row appears."""


def _dying_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Partition 0's worker process dies on every train message, as an OOM kill does."""
    if msg.metadata.message_type == "train" and int(context.node_config["partition-id"]) == 0:
        os._exit(1)
    return call_next(msg, context)


def _sleeping_mod(metrics: str, msg: Message, context: Context, call_next: Any) -> Message:
    """Partition 1 answers its first train message only once the run's last round is in
    ``metrics`` (the run directory's metrics.jsonl): far past ``node-timeout``, yet it
    returns before the run shuts down (Flower's shutdown waits for every Ray task)."""
    if msg.metadata.message_type == "train" and int(context.node_config["partition-id"]) == 1:
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
            # Generous for the honest clients' few milliseconds of training on a loaded machine.
            "node-timeout": 30,
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
    # Partitions 2 and 3 answer in every round. Round 1 drops partition 0 (dead) and the
    # sleeper (no reply within node-timeout) and goes on without them.
    assert [r["clients"] for r in rows] == [2] * ROUNDS
    assert (rows[0]["dropped_clients"], rows[0]["unavailable_clients"]) == (2, 0)
    # Later rounds do not wait for the busy sleeper: it is left out (and, if its late error
    # reply had not been collected yet, partition 0 too), never sent another message.
    for r in rows[1:]:
        assert 1 <= r["unavailable_clients"] <= 2
        assert r["dropped_clients"] + r["unavailable_clients"] == 2
    assert summary["rounds_below_min_clients"] == 0
