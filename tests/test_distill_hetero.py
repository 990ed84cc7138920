"""Clients of different sizes (``client-models``): the assignment, the config checks and
whole rounds through the real ClientApp and strategy chain (in process)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.config import ConfigError, resolve_config
from fedsqueeze.contracts.architectures import assign_architectures, parse_client_models
from fedsqueeze.server.hetero import HeteroStrategy
from fedsqueeze.server.strategies import build_chain

pytestmark = pytest.mark.usefixtures("torch_one_thread")


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


# 4 clients, half ``mlp`` and half ``logreg``, on the shared small distillation config
ARCH = {"client_models": "mlp:0.5,logreg:0.5", "num_clients": 4, "clients_per_round": 4}


@pytest.mark.parametrize("distill", ["none", "feddf"])
def test_each_architecture_aggregates_its_own_clients(
    distill_federation: Any, distill: str
) -> None:
    summary, run_dir, _ = distill_federation(distill, **ARCH, distill=distill)
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


def test_client_models_builds_the_hetero_chain() -> None:
    cfg = resolve_config(
        {"dataset": "digits", "model": "mlp", "num-clients": 4, "clients-per-round": 4},
        {"client-models": "mlp:0.5,logreg:0.5"},
    )
    assert isinstance(build_chain(cfg), HeteroStrategy)


def test_client_models_follow_every_distill_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """FedDF across architectures reads the same ``distill-*`` keys as the distillation hook
    (it used to ignore the final steps, the schedule and the size of the public slice)."""
    import fedsqueeze.server.distill as server_distill

    asked: list[int] = []

    def fake_transfer(*args: Any, builtin_samples: int = 0) -> Any:
        asked.append(builtin_samples)
        return np.zeros((3, 64), dtype=np.float32)

    monkeypatch.setattr(server_distill, "load_transfer_data", fake_transfer)
    np.savez(tmp_path / "public.npz", x=np.zeros((3, 64), dtype=np.float32))
    cfg = resolve_config(
        {"dataset": "digits", "model": "mlp", "num-clients": 4, "clients-per-round": 4},
        {
            "num-rounds": 3,
            "client-models": "mlp:0.5,logreg:0.5",
            "distill": "feddf",
            "distill-data": f"npz:{tmp_path / 'public.npz'}",
            "distill-public-samples": 8000,
            "distill-final-steps": 7,
            "distill-schedule": "cosine",
        },
    )
    chain = build_chain(cfg)
    assert isinstance(chain, HeteroStrategy)
    assert asked == [8000]
    last, first = chain.distill_settings.step_args(3), chain.distill_settings.step_args(1)
    assert (last["steps"], first["steps"]) == (7, cfg["distill-steps"])
    assert last["schedule"] == "cosine"


def test_local_dp_trains_each_architecture_privately(distill_federation: Any) -> None:
    # dp = "local" (adversary: the server) with clients of two sizes and FedDF across them:
    # every client, whatever its architecture, ran DP-SGD and its epsilon reaches the report
    summary, run_dir, grid = distill_federation(
        "hetero-ldp", **ARCH, dp="local", dp_noise_multiplier=1.0, distill="feddf"
    )
    rows = run_dir.read_metrics()
    for row in rows:
        assert row["clients_mlp"] == row["clients_logreg"] == 2
        assert row["rejected_updates"] == 0 and row["epsilon"] > 0
        assert row["accuracy_logreg"] != row["pre_distill_accuracy_logreg"]
    assert rows[1]["epsilon"] > rows[0]["epsilon"]
    assert summary["dp_mode"] == "local" and summary["epsilon"] == rows[-1]["epsilon"]
    for context in grid.contexts.values():  # one DP-SGD history per client, both sizes
        assert "dp-local" in context.state.config_records
    assert {a["clients"] for a in summary["client_models"].values()} == {2}


def test_federated_evaluation_reports_every_architecture(distill_federation: Any) -> None:
    # clients evaluate the global of their own architecture on their own test data
    _, run_dir, _ = distill_federation("hetero-eval", **ARCH, fraction_evaluate=0.99)
    for row in run_dir.read_metrics():
        assert 0 < row["federated_accuracy"] <= 1 and 0 < row["federated_accuracy_logreg"] <= 1
        # both are real evaluations of different models, not a copy of one figure
        assert row["federated_accuracy"] != row["federated_accuracy_logreg"]
