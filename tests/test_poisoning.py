"""One hostile client in a real run (the ClientApp's training, the round loop, the strategy chain
the run config builds) over the in-process grid: it cannot take over the model, it cannot
crash or stall a round, and what it sent never puts invalid JSON in metrics.jsonl.

simulations/poisoning/run.py measures the same attacks with 10 clients over several seeds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import inprocess
import numpy as np
import pytest
from flwr.app import Message

from fedsqueeze.client.app import build_client_app
from fedsqueeze.config import resolve_config
from fedsqueeze.contracts.records import from_record, to_record
from fedsqueeze.server.rounds import run_federation
from fedsqueeze.server.rundir import RunDir

pytestmark = pytest.mark.e2e  # real training: a few seconds per run (more on a loaded machine)

RUN = {
    "dataset": "digits",
    "model": "logreg",
    "num-clients": 4,
    "clients-per-round": 4,
    "num-rounds": 2,
    "local-epochs": 1,
}


def _hostile(edit: Any) -> Any:
    """An outermost client mod: partition 0 rewrites its train reply with ``edit``."""

    def mod(msg: Message, context: Any, call_next: Any) -> Message:
        reply = call_next(msg, context)
        if context.node_config["partition-id"] == 0 and msg.metadata.message_type == "train":
            edit(msg, reply)
        return reply

    return mod


def _flip_and_scale(msg: Message, reply: Message) -> None:
    sent, local = from_record(msg.content["arrays"]), from_record(reply.content["arrays"])
    reply.content["arrays"] = to_record(
        {k: (sent[k] - 1000.0 * (local[k] - sent[k])).astype(np.float32) for k in sent}
    )


def _claim_everything(msg: Message, reply: Message) -> None:
    reply.content["arrays"] = to_record(
        {k: np.zeros_like(v) for k, v in from_record(reply.content["arrays"]).items()}
    )
    reply.content["metrics"]["num-examples"] = 10**12


def _nan_loss(msg: Message, reply: Message) -> None:
    reply.content["metrics"]["train-loss"] = math.nan


def _run(path: Path, edit: Any = None, **overrides: Any) -> list[dict[str, Any]]:
    cfg = resolve_config(RUN, overrides)
    mods = [] if edit is None else [_hostile(edit)]
    grid = inprocess.InProcessGrid(build_client_app(cfg, extra_mods=mods), int(cfg["num-clients"]))
    run_federation(grid, cfg, RunDir(path), node_timeout=5)

    def strict(token: str) -> None:
        raise AssertionError(f"metrics.jsonl holds {token}, which is not JSON")

    text = (path / "metrics.jsonl").read_text()
    return [json.loads(line, parse_constant=strict) for line in text.splitlines()]


def test_one_hostile_client_does_not_take_over(tmp_path: Path) -> None:
    """Finding 3: a constant model with num-examples = 10**12 replaced the global outright
    (now capped at the largest partition); a huge-norm update took accuracy from 0.88 to
    0.08 — with one attacker in four clients the default norm bound alone does not stop it
    (measured: 0.08); a robust rule does."""
    clean = _run(tmp_path / "clean")[-1]["accuracy"]
    assert clean > 0.8
    attacks = [
        (_claim_everything, {}),
        (_flip_and_scale, {"strategy": "fedmedian"}),
    ]
    for edit, overrides in attacks:
        rows = _run(tmp_path / edit.__name__, edit, **overrides)
        assert rows[-1]["accuracy"] >= clean - 0.05, edit.__name__
        assert all(r["rejected_updates"] == 0 and r["clients"] == 4 for r in rows)
        if edit is _flip_and_scale:
            assert all(r["clipped_updates"] >= 1 for r in rows)


def test_nan_train_loss_is_rejected_and_metrics_stay_json(tmp_path: Path) -> None:
    """Finding 9: a NaN train-loss wrote NaN (invalid JSON) into metrics.jsonl."""
    rows = _run(tmp_path, _nan_loss)
    assert all(r["rejected_updates"] == 1 and len(r["rejected_reasons"]) == 1 for r in rows)
    assert all(math.isfinite(r["train_loss"]) for r in rows)


def test_fewer_test_samples_than_clients_with_federated_evaluation(tmp_path: Path) -> None:
    """Finding 1, honest variant: clients whose test slice is empty crashed round 1."""
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(
        data,
        x_train=rng.normal(size=(80, 6)).astype(np.float32),
        y_train=rng.integers(0, 3, 80),
        x_test=rng.normal(size=(2, 6)).astype(np.float32),
        y_test=np.array([0, 1]),
    )
    rows = _run(tmp_path / "run", dataset=f"npz:{data}", **{"fraction-evaluate": 0.75})
    assert len(rows) == 2
    assert all("rejected_reasons" not in r for r in rows)
    assert all(0 <= r.get("federated_accuracy", 0.0) <= 1 for r in rows)
