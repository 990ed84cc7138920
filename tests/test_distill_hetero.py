"""Clients of different sizes (``client-models``): the assignment, the config checks and
whole rounds through the real ClientApp and strategy chain (in process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from inprocess import InProcessGrid

from fedsqueeze.client.app import build_client_app
from fedsqueeze.config import ConfigError, resolve_config
from fedsqueeze.contracts.architectures import assign_architectures, parse_client_models
from fedsqueeze.federation import dataset_for
from fedsqueeze.server.hetero import HeteroStrategy
from fedsqueeze.server.rounds import run_federation
from fedsqueeze.server.rundir import RunDir
from fedsqueeze.server.strategies import build_chain


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(2, 60),
    split=st.integers(1, 99),
    seed=st.integers(0, 2**31),
)
def test_assignment_follows_the_fractions_and_the_seed(n: int, split: int, seed: int) -> None:
    spec = f"cnn1d:{split / 100},cnn1d-small:{1 - split / 100}"
    try:
        names = assign_architectures(spec, n, seed)
    except ConfigError as err:  # a fraction too small for n clients is refused, not dropped
        assert "no client" in str(err) and min(split, 100 - split) * n < 100
        return
    assert len(names) == n and set(names) == {"cnn1d", "cnn1d-small"}
    assert abs(names.count("cnn1d") - split / 100 * n) < 1
    assert names == assign_architectures(spec, n, seed)  # server and clients agree


def test_assignment_differs_between_seeds() -> None:
    spec = "mlp:0.5,logreg:0.5"
    assert len({tuple(assign_architectures(spec, 20, s)) for s in range(5)}) > 1


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("mlp", "NAME:FRACTION"),
        ("mlp:0.5,logreg:0.4", "sum to 1"),
        ("mlp:0.5,mlp:0.5", "twice"),
        ("mlp:1.5", "NAME:FRACTION"),
        ("mlp:x", "NAME:FRACTION"),
    ],
)
def test_bad_specs_are_refused(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_client_models(spec)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"client-models": "mlp:0.5,resnet:0.5"}, "unknown model 'resnet'"),
        ({"client-models": "cnn2d:0.5,logreg:0.5"}, "must list model = 'mlp'"),
        ({"client-models": "mlp:0.5,logreg:0.5", "secagg": True}, "secure aggregation"),
        (
            {"client-models": "mlp:0.5,logreg:0.5", "dp": "central", "dp-noise-multiplier": 1.0},
            "central/distributed DP",
        ),
        (
            {
                "client-models": "mlp:0.5,logreg:0.5",
                "distill": "student",
                "student-model": "logreg",
            },
            '"none" or "feddf"',
        ),
        ({"client-models": "mlp:0.9,logreg:0.1"}, "would get no client"),
    ],
)
def test_bad_client_models_settings_are_refused(overrides: dict[str, Any], match: str) -> None:
    base = {"dataset": "digits", "model": "mlp", "num-clients": 4, "clients-per-round": 4}
    with pytest.raises(ConfigError, match=match):
        resolve_config(base, overrides)


def _transfer(tmp_path: Path) -> str:
    ds = dataset_for(resolve_config({"dataset": "digits"}))
    rng = np.random.default_rng(0)
    # A stand-in for public unlabeled data: noisy copies of test inputs (fixture only).
    x = ds.x_test + rng.normal(scale=0.3, size=ds.x_test.shape).astype(np.float32)
    np.savez(tmp_path / "transfer.npz", x=x)
    return f"npz:{tmp_path / 'transfer.npz'}"


def _run(tmp_path: Path, name: str, **overrides: Any) -> tuple[dict[str, Any], RunDir]:
    cfg = resolve_config(
        {
            "dataset": "digits",
            "model": "mlp",
            "client-models": "mlp:0.5,logreg:0.5",
            "num-clients": 4,
            "clients-per-round": 4,
            "num-rounds": 2,
            "local-epochs": 1,
            "distill-data": _transfer(tmp_path),
            "distill-steps": 40,
            "distill-lr": 0.01,
        },
        {k.replace("_", "-"): v for k, v in overrides.items()},
    )
    assert isinstance(build_chain(cfg), HeteroStrategy)
    run_dir = RunDir(tmp_path / name)
    grid = InProcessGrid(build_client_app(cfg), int(cfg["num-clients"]))
    return run_federation(grid, cfg, run_dir, node_timeout=5), run_dir


@pytest.mark.parametrize("distill", ["none", "feddf"])
def test_each_architecture_aggregates_its_own_clients(tmp_path: Path, distill: str) -> None:
    summary, run_dir = _run(tmp_path, distill, distill=distill)
    rows = run_dir.read_metrics()
    for row in rows:
        # every client trained the architecture it was assigned: a model of the other
        # architecture would fail the reply checks (names/shapes) and be rejected
        assert row["clients_mlp"] == row["clients_logreg"] == 2
        assert row["clients"] == 4 and row["rejected_updates"] == 0
        assert row["accuracy_mlp"] == row["accuracy"]
        assert 0 <= row["accuracy_logreg"] <= 1
        assert ("distill_s" in row) == (distill == "feddf")
        if distill == "feddf":
            # FedDF fine-tunes every architecture towards the ensemble of all clients: the
            # released globals are not the per-architecture averages
            assert "ensemble_accuracy" in row
            assert row["accuracy_logreg"] != row["pre_distill_accuracy_logreg"]
            assert row["accuracy_mlp"] != row["pre_distill_accuracy_mlp"]
    models = summary["client_models"]
    assert models["logreg"]["parameters"] == 650 and models["logreg"]["clients"] == 2
    assert models["logreg"]["final_accuracy"] == rows[-1]["accuracy_logreg"]
    # the small architecture's global is hook state (checkpoint), with its own shapes
    ckpt = run_dir.load_checkpoint()
    assert ckpt is not None
    small = ckpt.extra["hooks"]["hetero"]["globals"]["logreg"]
    assert small["fc.weight"].shape == (10, 64)
