"""Low-rank factorized layers: the factor contract, full-rank equivalence, truncation, the
client mod and server wrapper, and a federation through fedsqueeze's round loop."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg
from hypothesis import given, settings
from hypothesis import strategies as st
from inprocess import InProcessGrid
from torch import nn

from fedsqueeze.client.lowrank import lowrank_mod
from fedsqueeze.client.mods import compress_mod, downlink_mod
from fedsqueeze.config import ConfigError, resolve_config
from fedsqueeze.contracts.records import LOWRANK_KEY, from_record, to_record
from fedsqueeze.models import build_model
from fedsqueeze.models.lowrank import (
    LowRankError,
    check_supported,
    choose_ranks,
    expand,
    factorize,
    factorized_models,
)
from fedsqueeze.models.weights import load_numpy_state, state_to_numpy
from fedsqueeze.server import CompressedStrategy, CountingGrid
from fedsqueeze.server.compose import StrategyCompositionError
from fedsqueeze.server.lowrank import LowRankStrategy
from fedsqueeze.server.rounds import train_round

SHAPES = {"mlp": (1, 8, 8), "cnn1d": (1, 40), "cnn2d": (1, 8, 8)}


def _layers(arrays: dict[str, np.ndarray]) -> list[str]:
    return [
        k[: -len(".weight")] for k, v in arrays.items() if k.endswith(".weight") and v.ndim >= 2
    ]


def _factorized(name: str, ranks: dict[str, int]) -> nn.Module:
    with factorized_models(ranks):
        return build_model(name, SHAPES[name], 10)


# ---- the factor contract ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_the_factorized_model_holds_exactly_the_factor_arrays(name: str, rank: int) -> None:
    dense = state_to_numpy(build_model(name, SHAPES[name], 10, seed=0))
    ranks = choose_ranks(dense, rank)
    factors = factorize(dense, ranks)
    model = _factorized(name, ranks)
    state = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == [
        (k, v.shape) for k, v in factors.items()
    ]
    for layer, r in ranks.items():
        w = dense[f"{layer}.weight"]
        out, fan_in = w.shape[0], math.prod(w.shape[1:])
        assert factors[f"{layer}.down.weight"].size + factors[f"{layer}.up.weight"].size == r * (
            out + fan_in
        )
        assert r * (out + fan_in) < out * fan_in  # only layers it shrinks are factorized
    load_numpy_state(model, factors)  # strict: same names and shapes
    assert sum(a.size for a in factors.values()) < sum(a.size for a in dense.values())


@pytest.mark.parametrize("name", list(SHAPES))
def test_at_full_rank_the_factorized_model_is_the_dense_model(name: str) -> None:
    dense_model = build_model(name, SHAPES[name], 10, seed=3)
    dense = state_to_numpy(dense_model)
    full = {
        layer: min(dense[f"{layer}.weight"].shape[0], math.prod(dense[f"{layer}.weight"].shape[1:]))
        for layer in _layers(dense)
    }
    model = _factorized(name, full)
    load_numpy_state(model, factorize(dense, full))
    x = torch.randn(7, *SHAPES[name])
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense_model(x), atol=1e-5, rtol=1e-4)
    for k, v in expand(factorize(dense, full), full).items():
        np.testing.assert_allclose(v, dense[k], atol=1e-5)


@settings(deadline=None, max_examples=30)
@given(
    seed=st.integers(0, 1000),
    out=st.integers(2, 24),
    fan_in=st.integers(2, 24),
    rank=st.integers(1, 24),
)
def test_truncation_is_the_best_rank_r_approximation(
    seed: int, out: int, fan_in: int, rank: int
) -> None:
    """Eckart–Young: the error of ``U @ V`` is the energy of the dropped singular values."""
    w = np.random.default_rng(seed).normal(size=(out, fan_in)).astype(np.float32)
    r = min(rank, out, fan_in)
    approx = expand(factorize({"l.weight": w}, {"l": r}), {"l": r})["l.weight"]
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    assert np.linalg.norm(w - approx) == pytest.approx(np.sqrt((s[r:] ** 2).sum()), abs=1e-4)


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 1000), fraction=st.floats(0.05, 0.99))
def test_a_fraction_keeps_the_fewest_singular_values_reaching_that_energy(
    seed: int, fraction: float
) -> None:
    w = np.random.default_rng(seed).normal(size=(64, 64)) * np.geomspace(1, 1e-3, 64)
    ranks = choose_ranks({"l.weight": w.astype(np.float32)}, fraction)
    energy = np.cumsum(np.linalg.svd(w.astype(np.float32), compute_uv=False) ** 2)
    energy /= energy[-1]
    if "l" not in ranks:  # the rank reaching it would not shrink the layer: kept dense
        assert np.searchsorted(energy, fraction - 1e-9) + 1 >= 32
        return
    r = ranks["l"]
    assert energy[r - 1] >= fraction - 1e-6
    assert r == 1 or energy[r - 2] < fraction + 1e-6


def test_an_unsupported_layer_is_a_one_line_error_naming_it() -> None:
    model = nn.Sequential()
    model.add_module("embed", nn.Embedding(10, 4))
    model.add_module("head", nn.Linear(4, 2))
    with pytest.raises(LowRankError, match="'embed' \\(Embedding\\)") as info:
        check_supported(model)
    assert "\n" not in str(info.value)
    grouped = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2))
    with pytest.raises(LowRankError, match="'0' \\(Conv1d \\(grouped\\)\\)"):
        check_supported(grouped)


def test_config_keys_and_refused_combinations() -> None:
    assert resolve_config({"lowrank": 8})["lowrank"] == 8.0
    assert resolve_config({"lowrank": "0.9"})["lowrank"] == 0.9
    with pytest.raises(ConfigError, match=r"lowrank = 2\.5"):
        resolve_config({"lowrank": 2.5})
    with pytest.raises(ConfigError, match="lowrank needs strategy"):
        resolve_config({"lowrank": 8, "strategy": "fedadam"})
    with pytest.raises(ConfigError, match="lowrank and prune"):
        resolve_config({"lowrank": 8, "prune": "magnitude", "prune-sparsity": 0.5})
    with pytest.raises(StrategyCompositionError):
        LowRankStrategy(CompressedStrategy(FedAdam()), rank=4)


# ---- the server wrapper with the client mod -------------------------------------------------

N = 3
NODES = [1000 + i for i in range(N)]


def _app() -> ClientApp:
    """A plain handler (no low-rank code) that trains whatever model it builds one SGD step."""
    app = ClientApp(mods=[downlink_mod, compress_mod, lowrank_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model = build_model("mlp", (1, 8, 8), 10)
        name, record = next(iter(msg.content.array_records.items()))
        load_numpy_state(model, from_record(record))
        x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(int(context.node_id)))
        loss = nn.functional.cross_entropy(model(x), torch.arange(16) % 10)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        content = RecordDict(
            {name: to_record(state_to_numpy(model)), "metrics": MetricRecord({"num-examples": 8})}
        )
        return Message(content=content, reply_to=msg)

    return app


def _fedavg() -> FedAvg:
    return FedAvg(fraction_train=1.0, min_train_nodes=N, min_available_nodes=N)


def test_clients_train_and_send_factors_and_the_global_model_is_their_product() -> None:
    dense = state_to_numpy(build_model("mlp", (1, 8, 8), 10, seed=0))
    strategy = LowRankStrategy(CompressedStrategy(_fedavg()), rank=4, start_round=2)
    grid = InProcessGrid(_app(), N)
    arrays, uplink = dense, []
    for rnd in (1, 2, 3):
        view = CountingGrid(grid, NODES)
        out, _ = train_round(strategy, view, rnd, arrays, 60.0)
        assert out is not None
        arrays = out
        uplink.append(view.uplink_bytes)
    assert list(arrays) == list(dense)  # the round loop keeps the dense layout
    assert strategy.ranks == {"fc1": 4, "fc2": 4, "fc3": 4}
    for layer, r in strategy.ranks.items():
        assert np.linalg.matrix_rank(arrays[f"{layer}.weight"]) <= r
    factors = strategy._factors
    assert factors is not None
    np.testing.assert_allclose(
        expand(factors, strategy.ranks, strategy.scales)["fc1.weight"], arrays["fc1.weight"]
    )
    dense_params = sum(a.size for a in dense.values())
    factor_params = sum(a.size for a in factors.values())
    # the update shrinks with the model: 4 bytes per factor parameter, plus an envelope that
    # grows only with the number of arrays (a .npy header and a name each)
    envelope = uplink[0] - 4 * N * dense_params
    assert 0 < uplink[2] - 4 * N * factor_params < envelope * len(factors) / len(dense) + N * 64
    assert uplink[1] == uplink[2]


def test_a_malformed_lowrank_record_is_refused_by_the_mod() -> None:
    grid = InProcessGrid(_app(), N)
    strategy = LowRankStrategy(CompressedStrategy(_fedavg()), rank=4)
    dense = state_to_numpy(build_model("mlp", (1, 8, 8), 10, seed=0))
    messages = list(
        strategy.configure_train(1, to_record(dense), ConfigRecord(), CountingGrid(grid, NODES))
    )
    for msg, bad in zip(
        messages,
        [{"layers": ["fc1"], "ranks": [0]}, {"layers": ["x"], "ranks": [2]}],
        strict=False,
    ):
        msg.content = RecordDict({**dict(msg.content.items()), LOWRANK_KEY: ConfigRecord(bad)})
    replies = list(grid.send_and_receive(messages))
    assert [r.has_error() for r in replies] == [True, True, False], [
        r.error.reason for r in replies if r.has_error()
    ]
    assert all("lowrank_mod" in r.error.reason for r in replies[:2])


def test_a_resumed_run_factorizes_the_checkpointed_model_exactly() -> None:
    dense = state_to_numpy(build_model("mlp", (1, 8, 8), 10, seed=0))
    strategy = LowRankStrategy(CompressedStrategy(_fedavg()), rank=4)
    grid = InProcessGrid(_app(), N)
    out, _ = train_round(strategy, CountingGrid(grid, NODES), 1, dense, 60.0)
    assert out is not None
    resumed = LowRankStrategy(CompressedStrategy(_fedavg()), rank=4)
    resumed.restore(strategy.state())
    assert resumed.ranks == strategy.ranks
    assert resumed.scales == strategy.scales  # the factors' meaning survives the restart
    sent = resumed._factors_of(2, to_record(out))
    assert sent is not None and resumed.ranks is not None
    for k, v in expand(from_record(sent), resumed.ranks, resumed.scales).items():
        np.testing.assert_allclose(v, out[k], atol=1e-5)


# ---- a low-rank federation through fedsqueeze's round loop ------------------------------------


@pytest.mark.e2e
def test_a_low_rank_federation_learns_with_smaller_updates(tmp_path: Any) -> None:
    from fedsqueeze.client.app import build_client_app
    from fedsqueeze.server.rounds import run_federation
    from fedsqueeze.server.rundir import RunDir

    def run(lowrank: float, out: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        cfg = resolve_config(
            {
                "num-clients": 2,
                "clients-per-round": 2,
                "num-rounds": 3,
                "local-epochs": 1,
                "lowrank": lowrank,
                "lowrank-start-round": 2,
            }
        )
        summary = run_federation(
            InProcessGrid(build_client_app(cfg), 2), cfg, RunDir(tmp_path / out), node_timeout=10
        )
        return summary, RunDir(tmp_path / out).read_metrics()

    _, dense_rows = run(0, "dense")
    summary, rows = run(8, "lowrank")
    # rounds 2 and 3 train rank-8 factors of the MLP (64*128 + 128*64 + ... weights)
    assert set(summary["lowrank_layers"]) == {"fc1", "fc2", "fc3"}
    ratio = summary["model_bytes_lowrank"] / summary["model_bytes_dense"]
    assert ratio < 0.25
    assert rows[2]["uplink_bytes"] < dense_rows[2]["uplink_bytes"] * (ratio + 0.05)
    assert rows[0]["uplink_bytes"] == dense_rows[0]["uplink_bytes"]
    assert rows[2]["accuracy"] > rows[0]["accuracy"] and rows[2]["accuracy"] > 0.5
    model = torch.load(tmp_path / "lowrank" / "model.pt")
    assert torch.linalg.matrix_rank(model["fc1.weight"]) <= 8


# ---- the factors train at the configured learning rate (the collapse after factorizing) -------


@pytest.mark.parametrize("name", ["cnn1d", "cnn2d"])
def test_an_sgd_step_on_the_factors_moves_the_weights_no_further_than_twice_a_dense_step(
    name: str,
) -> None:
    """A step ``-lr * grad`` on ``U`` and ``V`` moves ``W = c U V`` by
    ``-lr c (G V^T V + U U^T G)``. Without the scale ``c`` (the old code) a trained layer's
    singular values (2-4 on cnn1d) amplified every client's step several-fold: at the default
    lr the federation collapsed from 0.52 to ~0.1 accuracy the round it was factorized. The
    factors here come the way clients get them: the strategy's record, read by the mod's
    parser."""
    from fedsqueeze.client.lowrank import ranks_of, scales_of

    torch.manual_seed(0)
    trained = {k: 3.0 * v for k, v in state_to_numpy(build_model(name, SHAPES[name], 10)).items()}
    strategy = LowRankStrategy(CompressedStrategy(_fedavg()), rank=4, start_round=1)
    sent = strategy._factors_of(1, to_record(trained))
    assert sent is not None
    (msg,) = strategy._send([Message(RecordDict(), dst_node_id=1, message_type="train")])
    record = msg.content.config_records[LOWRANK_KEY]
    ranks = ranks_of(record)
    scales = scales_of(record, ranks)
    factors = from_record(sent)
    x = torch.randn(32, *SHAPES[name])
    y = torch.arange(32) % 10

    def step(model: nn.Module, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        load_numpy_state(model, arrays)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        return state_to_numpy(model)

    with factorized_models(ranks, scales):
        factorized = build_model(name, SHAPES[name], 10)
    before = expand(factors, ranks, scales)  # the dense model the factors stand for
    after = expand(step(factorized, factors), ranks, scales)
    dense_after = step(build_model(name, SHAPES[name], 10), before)
    for layer in ranks:
        key = f"{layer}.weight"
        moved = np.linalg.norm(after[key] - before[key])
        dense_moved = np.linalg.norm(dense_after[key] - before[key])
        assert dense_moved > 0
        assert moved <= 2.0 * dense_moved * 1.01, (layer, moved / dense_moved)


def test_the_mod_refuses_bad_scales() -> None:
    from fedsqueeze.client.lowrank import scales_of
    from fedsqueeze.client.mods import ModPreconditionError

    ranks = {"fc1": 4, "fc2": 4}
    assert scales_of(ConfigRecord({}), ranks) == {"fc1": 1.0, "fc2": 1.0}
    assert scales_of(ConfigRecord({"scales": [0.5, 2.0]}), ranks) == {"fc1": 0.5, "fc2": 2.0}
    for bad in ([0.5], [0.5, 0.0], [0.5, -1.0], [0.5, float("inf")], [0.5, float("nan")]):
        with pytest.raises(ModPreconditionError):
            scales_of(ConfigRecord({"scales": bad}), ranks)
