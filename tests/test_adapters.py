"""Low-rank adapters (``lowrank-adapter``): the merge, a frozen base, adapter-only uplinks, a
pre-trained model improved through the federation, and refused configurations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from inprocess import InProcessGrid
from torch import nn

from fedsqueeze.client.app import build_client_app
from fedsqueeze.client.lowrank import ADAPTER_KEY as CLIENT_ADAPTER_KEY
from fedsqueeze.client.training import train_local
from fedsqueeze.config import ConfigError, resolve_config
from fedsqueeze.contracts.records import from_record, to_record
from fedsqueeze.models import build_model
from fedsqueeze.models.adapters import (
    ADAPTER_KEY,
    AdapterError,
    adapted_models,
    adapter_names,
    check_supported,
    choose_ranks,
    init_adapters,
    is_adapter,
    merge,
)
from fedsqueeze.models.retrain import set_trainable
from fedsqueeze.models.weights import evaluate, load_numpy_state, state_to_numpy
from fedsqueeze.server import CountingGrid
from fedsqueeze.server.adapters import AdapterStrategy
from fedsqueeze.server.compose import strategy_chain
from fedsqueeze.server.rounds import train_round
from fedsqueeze.server.strategies import build_chain

SHAPES = {"mlp": (1, 8, 8), "cnn1d": (1, 40), "cnn2d": (1, 8, 8)}


def _random_adapters(base: dict[str, np.ndarray], rank: int) -> tuple[dict, dict]:
    ranks = choose_ranks(base, rank)
    adapters = init_adapters(base, ranks, seed=1)
    rng = np.random.default_rng(2)
    for layer in ranks:  # B = 0 at init: make it non-zero to test the product
        b = adapter_names(layer)[1]
        adapters[b] = rng.normal(0, 0.1, adapters[b].shape).astype(np.float32)
    return ranks, adapters


@pytest.mark.parametrize("name", list(SHAPES))
def test_the_merged_model_is_the_base_plus_b_times_a(name: str) -> None:
    base = state_to_numpy(build_model(name, SHAPES[name], 10, seed=0))
    ranks, adapters = _random_adapters(base, 3)
    merged = merge(base, adapters, ranks)
    assert list(merged) == list(base)  # the plain architecture: what export sees
    for layer in ranks:
        a, b = (adapters[k] for k in adapter_names(layer))
        w = base[f"{layer}.weight"]
        product = b.reshape(b.shape[0], -1).astype(np.float64) @ a.reshape(a.shape[0], -1)
        np.testing.assert_allclose(merged[f"{layer}.weight"], w + product.reshape(w.shape), 1e-5)
        np.testing.assert_array_equal(merged[f"{layer}.bias"], base[f"{layer}.bias"])
    # and the adapted model computes what the merged plain model computes
    with adapted_models(ranks):
        adapted = build_model(name, SHAPES[name], 10)
    load_numpy_state(adapted, {**base, **adapters})
    plain = build_model(name, SHAPES[name], 10)
    load_numpy_state(plain, merged)
    x = torch.randn(8, *SHAPES[name])
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), plain(x), rtol=1e-4, atol=1e-5)


def test_fresh_adapters_start_exactly_at_the_base() -> None:
    base = state_to_numpy(build_model("cnn1d", SHAPES["cnn1d"], 10, seed=0))
    ranks = choose_ranks(base, 4)
    assert ranks["conv1"] == 4 and ranks["fc2"] == 4
    for k, v in merge(base, init_adapters(base, ranks, seed=0), ranks).items():
        np.testing.assert_array_equal(v, base[k])


def test_local_training_changes_only_the_adapters() -> None:
    base = state_to_numpy(build_model("cnn1d", SHAPES["cnn1d"], 10, seed=0))
    ranks = choose_ranks(base, 2)
    adapters = init_adapters(base, ranks, seed=0)
    with adapted_models(ranks):
        model = build_model("cnn1d", SHAPES["cnn1d"], 10)
    load_numpy_state(model, {**base, **adapters})
    set_trainable(model, list(adapters))  # what layers_mod names, as the handler does
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 1, 40)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    train_local(model, x, y, epochs=2, batch_size=16, lr=0.05, momentum=0.9)
    after = state_to_numpy(model)
    for k, v in base.items():
        np.testing.assert_array_equal(after[k], v)  # bit-identical
    assert all(not np.array_equal(after[k], v) for k, v in adapters.items())


def _cfg(**extra: Any) -> dict[str, Any]:
    return resolve_config(
        {
            "dataset": "digits",
            "model": "mlp",
            "num-clients": 2,
            "clients-per-round": 2,
            "num-rounds": 2,
            "local-epochs": 1,
            **extra,
        }
    )


def test_a_round_sends_only_adapters_up_and_keeps_the_base_bit_identical() -> None:
    from fedsqueeze.federation import initial_arrays

    nodes = [1000, 1001]

    def one_round(cfg: dict[str, Any]) -> tuple[Any, dict[str, np.ndarray], int]:
        strategy = build_chain(cfg)
        grid = CountingGrid(InProcessGrid(build_client_app(cfg), 2), nodes)
        out, _ = train_round(strategy, grid, 1, initial_arrays(cfg), 60.0)
        assert out is not None
        return strategy, out, grid.uplink_bytes

    dense = initial_arrays(_cfg())
    _, _, dense_uplink = one_round(_cfg())
    strategy, merged, uplink = one_round(_cfg(**{"lowrank-adapter": 2}))
    (wrapper,) = [s for s in strategy_chain(strategy) if isinstance(s, AdapterStrategy)]
    assert wrapper.base is not None and wrapper.adapters is not None
    for k, v in dense.items():
        np.testing.assert_array_equal(wrapper.base[k], v)  # the base never changes
    assert list(merged) == list(dense)  # the round loop gets the plain (merged) model
    for k, v in dense.items():
        if k.endswith(".bias"):
            np.testing.assert_array_equal(merged[k], v)
    assert any(not np.array_equal(merged[k], dense[k]) for k in dense)  # the adapters trained
    adapter_bytes = 4 * sum(a.size for a in wrapper.adapters.values())
    dense_bytes = 4 * sum(a.size for a in dense.values())
    # each reply: the adapters' float32 values plus an envelope (a header and name per array)
    envelope = 2 * 200 * len(wrapper.adapters)
    assert 2 * adapter_bytes < uplink < 2 * adapter_bytes + envelope
    assert uplink < dense_uplink * (adapter_bytes / dense_bytes + 0.1)
    assert dense_uplink > 2 * dense_bytes


def test_adapters_improve_a_pretrained_model_on_shifted_data(tmp_path: Path) -> None:
    """A model pre-trained on digits 0-4 only (the deployed model) is fine-tuned through the
    federation (all ten digits) with rank-4 adapters from ``init-model``."""
    from fedsqueeze.federation import dataset_for, new_model
    from fedsqueeze.server.rounds import run_federation
    from fedsqueeze.server.rundir import RunDir

    cfg = _cfg()
    ds = dataset_for(cfg)
    old = ds.y_train < 5
    torch.manual_seed(0)
    model = new_model(cfg, seed=0)
    train_local(
        model, ds.x_train[old], ds.y_train[old], epochs=3, batch_size=32, lr=0.05, momentum=0.9
    )
    torch.save(model.state_dict(), tmp_path / "deployed.pt")
    _, before = evaluate(model, ds.x_test, ds.y_test)
    cfg = _cfg(
        **{"lowrank-adapter": 4, "init-model": str(tmp_path / "deployed.pt"), "num-rounds": 3}
    )
    summary = run_federation(
        InProcessGrid(build_client_app(cfg), 2), cfg, RunDir(tmp_path / "run"), node_timeout=30
    )
    assert summary["final_accuracy"] > before + 0.1, (before, summary["final_accuracy"])
    saved = torch.load(tmp_path / "run" / "model.pt")
    assert not any(is_adapter(k) for k in saved)  # model.pt (and export) holds the merged model
    assert list(saved) == list(model.state_dict())


def test_bad_configurations_and_layers_are_refused_in_one_line() -> None:
    assert resolve_config({"lowrank-adapter": 4})["lowrank-adapter"] == 4
    with pytest.raises(ConfigError, match="lowrank-adapter"):
        resolve_config({"lowrank-adapter": -1})
    with pytest.raises(ConfigError, match="lowrank-adapter"):
        resolve_config({"lowrank-adapter": 2.5})
    for key, value in [
        ("lowrank", 8),
        ("prune", "magnitude"),
        ("qat", "int8"),
        ("train-layers", "last"),
    ]:
        with pytest.raises(ConfigError, match=f"lowrank-adapter and {key}"):
            resolve_config({"lowrank-adapter": 4, key: value})
    model = nn.Sequential()
    model.add_module("embed", nn.Embedding(10, 4))
    model.add_module("head", nn.Linear(4, 2))
    with pytest.raises(AdapterError, match="'embed' \\(Embedding\\)") as info:
        check_supported(model)
    assert "\n" not in str(info.value)
    with pytest.raises(AdapterError, match="Conv1d \\(grouped\\)"):
        check_supported(nn.Sequential(nn.Conv1d(4, 4, 3, groups=2)))
    assert CLIENT_ADAPTER_KEY == ADAPTER_KEY


def test_a_resumed_run_continues_its_adapters_on_its_base() -> None:
    """The checkpoint keeps base, adapters and ranks: resuming after a round hands the loop's
    checkpointed (merged) model back and training continues the same adapters (it used to take
    the merged model as a new base with fresh adapters)."""
    from fedsqueeze.federation import initial_arrays
    from fedsqueeze.server.rundir import pack_state, unpack_state

    cfg = _cfg(**{"lowrank-adapter": 2})
    strategy = build_chain(cfg)
    grid = CountingGrid(InProcessGrid(build_client_app(cfg), 2), [1000, 1001])
    merged, _ = train_round(strategy, grid, 1, initial_arrays(cfg), 60.0)
    assert merged is not None
    (live,) = [s for s in strategy_chain(strategy) if isinstance(s, AdapterStrategy)]
    arrays: dict[str, np.ndarray] = {}
    saved = unpack_state(pack_state(live.state(), arrays), arrays)  # as the checkpoint keeps it

    (resumed,) = [s for s in strategy_chain(build_chain(cfg)) if isinstance(s, AdapterStrategy)]
    resumed.restore(saved)
    resumed._start(to_record(merged))  # round 2 of the resumed run starts from the checkpoint
    assert live.base is not None and live.adapters is not None
    assert resumed.base is not None and resumed.adapters is not None
    assert resumed.ranks == live.ranks
    for k, v in live.base.items():
        np.testing.assert_array_equal(resumed.base[k], v)
    for k, v in live.adapters.items():
        np.testing.assert_array_equal(resumed.adapters[k], v)
    ups = [adapter_names(layer)[1] for layer in resumed.ranks]
    assert any(np.any(resumed.adapters[b] != 0) for b in ups)  # trained, not fresh (B = 0)


def test_an_aggregate_that_is_not_the_adapters_keeps_the_global_model() -> None:
    from flwr.app import MetricRecord
    from flwr.serverapp.strategy import FedAvg

    base = state_to_numpy(build_model("mlp", SHAPES["mlp"], 10, seed=0))
    bad: list[dict[str, np.ndarray]] = []

    class Inner(FedAvg):
        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            return to_record(bad[-1]), MetricRecord({})

    strategy = AdapterStrategy(Inner(), rank=2)
    strategy._start(to_record(base))
    assert strategy.adapters is not None
    good = dict(strategy.adapters)
    wrong_shape = {k: np.zeros((1,), np.float32) for k in good}
    not_finite = {k: np.full_like(v, np.nan) for k, v in good.items()}
    for aggregate in (wrong_shape, not_finite, base):
        bad.append(aggregate)
        merged, _ = strategy.aggregate_train(1, [])
        assert merged is not None
        for k, v in from_record(merged).items():
            np.testing.assert_array_equal(v, base[k])  # B = 0: still exactly the base
        assert all(np.array_equal(strategy.adapters[k], v) for k, v in good.items())
