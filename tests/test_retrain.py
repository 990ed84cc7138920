"""Retraining a deployed model: ``init-model`` (round 0 = its evaluation) and
``train-layers`` (only the trained tensors travel, are noised and change), with compression,
local DP and distributed DP under SecAgg."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from inprocess import InProcessGrid

import fedsqueeze.cli as cli
from fedsqueeze.cli import EXIT_USAGE, main
from fedsqueeze.client.app import build_client_app
from fedsqueeze.client.layers import layers_mod
from fedsqueeze.config import ConfigError, resolve_config
from fedsqueeze.contracts.records import to_record
from fedsqueeze.federation import dataset_for, new_model
from fedsqueeze.models.retrain import FROZEN_KEY
from fedsqueeze.models.weights import evaluate, load_numpy_state
from fedsqueeze.server.rounds import run_federation
from fedsqueeze.server.rundir import RunDir
from fedsqueeze.server.strategies import build_chain

BASE = {
    "dataset": "digits",
    "model": "mlp",
    "num-clients": 2,
    "clients-per-round": 2,
    "num-rounds": 1,
    "local-epochs": 1,
    "batch-size": 64,
    "lr": 0.1,
}
LAST = ["fc3.weight", "fc3.bias"]


def _run(cfg: dict[str, Any], out: Path, extra_mods: Any = ()) -> list[dict[str, Any]]:
    grid = InProcessGrid(build_client_app(cfg, extra_mods=extra_mods), int(cfg["num-clients"]))
    run_federation(grid, cfg, RunDir(out), node_timeout=60)
    return RunDir(out).read_metrics()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model.pt from an earlier (one-round) run."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    out = tmp_path_factory.mktemp("deployed") / "run"
    _run(resolve_config(BASE), out)
    return out / "model.pt"


def _state(path: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}


def test_round_zero_is_the_init_model_and_training_starts_from_it(
    deployed: Path, tmp_path: Path
) -> None:
    cfg = resolve_config(BASE, {"init-model": str(deployed), "num-rounds": 2})
    rows = _run(cfg, tmp_path / "run")
    model = new_model(cfg)
    load_numpy_state(model, _state(deployed))
    ds = dataset_for(cfg)
    _, acc = evaluate(model, ds.x_test, ds.y_test)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["accuracy"] == acc and rows[0]["uplink_bytes"] == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_rounds"] == 2
    # The run dir and the export.json of a run are accepted as the same model.
    report = tmp_path / "export.json"
    report.write_text(json.dumps({"run_dir": str(deployed.parent)}))
    for i, source in enumerate((deployed.parent, report)):
        again = _run(resolve_config(cfg, {"init-model": str(source)}), tmp_path / f"again{i}")
        assert again[0]["accuracy"] == acc


def _bad_models(deployed: Path, tmp: Path) -> dict[str, Path]:
    other = tmp / "logreg"
    _run(resolve_config(BASE, {"model": "logreg"}), other)
    nan = {k: v.copy() for k, v in _state(deployed).items()}
    nan["fc1.weight"][0, 0] = np.nan
    np.savez(tmp / "nan.npz", **nan)
    (tmp / "junk.pt").write_bytes(b"not a checkpoint")
    return {
        "missing": tmp / "none.pt",
        "another architecture": other / "model.pt",
        "NaN": tmp / "nan.npz",
        "junk": tmp / "junk.pt",
    }


def test_a_bad_init_model_is_one_line_exit_2_and_no_run_dir(
    deployed: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(cli, "simulate", lambda *a, **k: pytest.fail("the run started"))
    for case, path in _bad_models(deployed, tmp_path).items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        sets = [a for k, v in {**BASE, "init-model": path}.items() for a in ("--set", f"{k}={v}")]
        code = main(["simulate", "--out", str(out), *sets])
        err = capsys.readouterr().err.strip()
        assert code == EXIT_USAGE, case
        assert "init-model" in err and len(err.splitlines()) == 1, (case, err)
        assert not out.exists(), case


COMPOSITIONS = {
    "plain": {},
    "q8": {"codec": "q8"},
    "local DP": {"dp": "local", "dp-noise-multiplier": 1.0},
    "SecAgg": {"secagg": True},
    "SecAgg + distributed DP": {"secagg": True, "dp": "distributed", "dp-noise-multiplier": 0.5},
}


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_only_the_trained_layers_travel_and_change(
    deployed: Path, tmp_path: Path, name: str
) -> None:
    """Frozen tensors come back bit for bit (no update, no DP noise on them) in every mode,
    and the plain reply carries only the trained tensors."""
    over = {"init-model": str(deployed), "train-layers": "last", **COMPOSITIONS[name]}
    cfg = resolve_config(BASE, over)
    sent: list[list[str]] = []

    def wire(msg: Message, context: Context, call_next: Any) -> Message:
        reply = call_next(msg, context)
        sent.extend(list(r) for r in reply.content.array_records.values())
        return reply

    rows = _run(cfg, tmp_path / "run", extra_mods=[wire])
    before, after = _state(deployed), _state(tmp_path / "run" / "model.pt")
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert changed == LAST and rows[-1]["clients"] == 2
    if name == "plain":
        assert sent and all(names == LAST for names in sent)
        full = _run(resolve_config(BASE, {"init-model": str(deployed)}), tmp_path / "full")
        assert rows[-1]["uplink_bytes"] * 10 < full[-1]["uplink_bytes"]


def test_train_layers_names_are_checked(deployed: Path) -> None:
    with pytest.raises(ConfigError, match="no layer or tensor 'fc9'"):
        build_chain(resolve_config(BASE, {"train-layers": "fc1,fc9"}))
    with pytest.raises(ConfigError, match="prune"):
        resolve_config(BASE, {"train-layers": "last", "prune": "magnitude", "prune-sparsity": 0.5})
    chain = build_chain(resolve_config(BASE, {"train-layers": "fc1, fc3.bias"}))
    assert chain.trained == ["fc1.weight", "fc1.bias", "fc3.bias"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("payload", [b"garbage", b"PK\x03\x04" + b"\0" * 40])
def test_a_hostile_frozen_record_is_refused_before_training(payload: bytes) -> None:
    """Adversary: a server (or a man in the middle without TLS) sending a malformed frozen
    record. The device replies with an error; the handler never runs."""
    content = RecordDict(
        {
            "arrays": to_record({"fc3.bias": np.zeros(10, np.float32)}),
            "config": ConfigRecord({"server-round": 1}),
            FROZEN_KEY: ConfigRecord({"payload": payload}),
        }
    )
    msg = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = layers_mod(msg, context, lambda m, c: pytest.fail("handler ran"))
    assert reply.has_error() and "layers_mod" in reply.error.reason
