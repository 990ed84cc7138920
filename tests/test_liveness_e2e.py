"""A client whose worker process dies, in Flower's Simulation Engine (Ray): later rounds keep
the other clients. (A client that hangs past ``node-timeout`` is left out while busy:
tests/test_liveness.py, in process, since a short timeout in a Ray test measures the machine's
load rather than the code.)"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message

from fedsqueeze.cli import simulate
from fedsqueeze.config import resolve_config

pytestmark = pytest.mark.e2e


def _dying_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Partition 0's worker process dies on every train message, as an OOM kill does."""
    if msg.metadata.message_type == "train" and int(context.node_config["partition-id"]) == 0:
        os._exit(1)
    return call_next(msg, context)


def test_a_dying_client_does_not_starve_later_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On main Flower put the dead Ray actor back into its pool, where it failed every later
    message it got: rounds 2.. lost most or all of their clients."""
    from fedsqueeze.client import app as client_app_module

    cfg = resolve_config(
        {
            "dataset": "digits",
            "model": "logreg",
            "num-clients": 4,
            "clients-per-round": 4,
            "num-rounds": 3,
            "local-epochs": 1,
            "min-clients": 3,
        }
    )
    original = client_app_module.build_client_app
    monkeypatch.setattr(
        client_app_module,
        "build_client_app",
        lambda config: original(config, extra_mods=[_dying_mod]),
    )
    summary = simulate(cfg, tmp_path / "run", quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    # Partitions 1-3 answer in every round; partition 0 dies in every round.
    assert [(r["clients"], r["dropped_clients"]) for r in rows] == [(3, 1)] * 3
    assert summary["rounds_below_min_clients"] == 0
