"""Magnitude pruning inside the federation: schedule, masks, mask-aligned payloads, masked
training, and the server wrapper with the client mod over an in-process grid."""

from __future__ import annotations

import itertools
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

from fedsqueeze.client.mods import compress_mod, downlink_mod
from fedsqueeze.client.pruning import prune_mod
from fedsqueeze.client.secure import secagg_mod
from fedsqueeze.client.training import train_local
from fedsqueeze.compression import PayloadError, log2_binomial, parse_codec
from fedsqueeze.compression.masked import (
    apply_mask,
    decode_mask,
    encode_mask,
    gather,
    kept_count,
    scatter,
)
from fedsqueeze.config import ConfigError, resolve_config
from fedsqueeze.contracts.records import PRUNE_KEY, to_record
from fedsqueeze.models import build_model
from fedsqueeze.models.pruning import (
    PruningError,
    cubic_sparsity,
    magnitude_masks,
    masked_training,
    sparsity_of,
)
from fedsqueeze.models.weights import state_to_numpy
from fedsqueeze.server import CompressedStrategy, CountingGrid, SecAggStrategy
from fedsqueeze.server.compose import StrategyCompositionError
from fedsqueeze.server.pruning import PruningStrategy
from fedsqueeze.server.rounds import train_round

# ---- schedule ------------------------------------------------------------------------------


@settings(deadline=None)
@given(
    final=st.floats(0.0, 0.99),
    start=st.integers(1, 20),
    length=st.integers(0, 20),
)
def test_cubic_schedule_is_monotone_and_hits_its_sparsity_at_the_end_round(
    final: float, start: int, length: int
) -> None:
    end = start + length
    values = [cubic_sparsity(r, final, start, end) for r in range(1, end + 5)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert all(v == 0.0 for v in values[: start - 1])
    assert cubic_sparsity(end, final, start, end) == final
    assert cubic_sparsity(end + 3, final, start, end) == final


def test_cubic_schedule_prunes_fast_first() -> None:
    # Zhu & Gupta: s_f (1 - (1 - t)^3); half-way through it is at 7/8 of the final sparsity.
    assert cubic_sparsity(6, 0.8, 1, 11) == pytest.approx(0.8 * (1 - 0.5**3))
    assert cubic_sparsity(1, 0.8, 1, 11) == 0.0


# ---- masks ---------------------------------------------------------------------------------


def _arrays(seed: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


SHAPES = {"fc1.weight": (16, 12), "fc1.bias": (16,), "fc2.weight": (4, 16), "fc2.bias": (4,)}


@settings(deadline=None)
@given(
    seed=st.integers(0, 2**16),
    sparsity=st.floats(0.0, 0.95),
    scope=st.sampled_from(["global", "layer"]),
)
def test_magnitude_masks_drop_the_smallest_weights_and_keep_biases(
    seed: int, sparsity: float, scope: str
) -> None:
    arrays = _arrays(seed, SHAPES)
    masks = magnitude_masks(arrays, sparsity, scope)
    assert masks["fc1.bias"].all() and masks["fc2.bias"].all()
    groups = (
        [["fc1.weight"], ["fc2.weight"]] if scope == "layer" else [["fc1.weight", "fc2.weight"]]
    )
    for group in groups:
        mags = np.concatenate([np.abs(arrays[n]).ravel() for n in group])
        keep = np.concatenate([masks[n].ravel() for n in group])
        assert (~keep).sum() in (
            math.floor(sparsity * mags.size),
            math.floor(sparsity * mags.size) - 1,
        )
        if (~keep).any():
            assert mags[~keep].max() <= mags[keep].min()
    for n in ("fc1.weight", "fc2.weight"):
        assert masks[n].any()  # no layer is cut off


@settings(deadline=None)
@given(seed=st.integers(0, 2**16), s1=st.floats(0.0, 0.9), s2=st.floats(0.0, 0.9))
def test_a_pruned_position_is_never_let_back_in(seed: int, s1: float, s2: float) -> None:
    lo, hi = sorted((s1, s2))
    arrays = _arrays(seed, SHAPES)
    first = magnitude_masks(arrays, lo)
    # training moved the weights: a pruned weight could now look large
    moved = {k: v + _arrays(seed + 1, SHAPES)[k] for k, v in arrays.items()}
    second = magnitude_masks(moved, hi, previous=first)
    for k in first:
        assert not (second[k] & ~first[k]).any()


# ---- the coded mask and the mask-aligned payload ---------------------------------------------


@st.composite
def _masks(draw: Any) -> dict[str, np.ndarray]:
    n = draw(st.integers(1, 4))
    out = {}
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
        bits = draw(st.lists(st.booleans(), min_size=math.prod(shape), max_size=math.prod(shape)))
        out[f"t{i}"] = np.array(bits, dtype=bool).reshape(shape)
    return out


@settings(deadline=None)
@given(masks=_masks())
def test_mask_round_trips(masks: dict[str, np.ndarray]) -> None:
    decoded = decode_mask(encode_mask(masks))
    assert list(decoded) == list(masks)
    for k in masks:
        np.testing.assert_array_equal(decoded[k], masks[k])


@settings(deadline=None)
@given(masks=_masks(), data=st.data())
def test_a_damaged_mask_is_a_typed_error(masks: dict[str, np.ndarray], data: Any) -> None:
    payload = bytearray(encode_mask(masks))
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(PayloadError):
        decode_mask(bytes(payload[:cut]))
    i = data.draw(st.integers(0, len(payload) - 1))
    payload[i] ^= 1 + data.draw(st.integers(0, 254))
    with pytest.raises(PayloadError):
        decode_mask(bytes(payload))


@settings(deadline=None)
@given(masks=_masks(), seed=st.integers(0, 2**16))
def test_gather_scatter_round_trip_and_zero_pruned_positions(
    masks: dict[str, np.ndarray], seed: int
) -> None:
    arrays = _arrays(seed, {k: m.shape for k, m in masks.items()})
    kept = gather(arrays, masks)
    assert sum(v.size for v in kept.values()) == kept_count(masks)
    full = scatter(kept, masks)
    for k in masks:
        np.testing.assert_array_equal(full[k][masks[k]], arrays[k][masks[k]])
        assert (full[k][~masks[k]] == 0).all()
    with pytest.raises(PayloadError):
        scatter({k: np.append(v, 1.0) for k, v in kept.items()}, masks)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), spec=st.sampled_from(["none", "q8", "fp16"]))
def test_a_mask_aligned_update_carries_no_position_bytes(seed: int, spec: str) -> None:
    """Two masks with the same kept counts per tensor but different positions give payloads
    of the same size, and the size is the values plus a small envelope — far below what
    naming the positions would cost (log2 C(d, k) bits)."""
    codec = parse_codec(spec)
    shapes = {"w": (64, 64), "b": (64,)}
    delta = _arrays(seed, shapes)
    rng = np.random.default_rng(seed)
    sizes = []
    for _ in range(2):
        keep_w = np.zeros(64 * 64, dtype=bool)
        keep_w[rng.choice(64 * 64, size=400, replace=False)] = True
        masks = {"w": keep_w.reshape(64, 64), "b": np.ones(64, dtype=bool)}
        sizes.append(
            len(
                codec.encode(gather(apply_mask(delta, masks), masks), seed=1, layout="hash").payload
            )
        )
    assert sizes[0] == sizes[1]
    values = 464 * codec.bits / 8
    index_bound = log2_binomial(64 * 64, 400) / 8
    assert values <= sizes[0] <= values + 64 < values + index_bound


# ---- masked training ------------------------------------------------------------------------


def _data(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, n)


def _mlp_masks(sparsity: float = 0.8) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    start = state_to_numpy(build_model("mlp", (1, 8, 8), 10, seed=0))
    return start, magnitude_masks(start, sparsity)


@pytest.mark.parametrize("momentum, weight_decay, mu", [(0.9, 1e-3, 0.0), (0.0, 0.0, 0.1)])
def test_training_keeps_pruned_weights_exactly_zero(
    momentum: float, weight_decay: float, mu: float
) -> None:
    start, masks = _mlp_masks()
    with masked_training(masks):
        model = build_model("mlp", (1, 8, 8), 10, seed=1)  # a model built inside the scope
        x, y = _data()
        train_local(
            model,
            x,
            y,
            epochs=2,
            batch_size=8,
            lr=0.1,
            momentum=momentum,
            weight_decay=weight_decay,
            proximal_mu=mu,
        )
    after = state_to_numpy(model)
    for k, m in masks.items():
        assert (after[k][~m] == 0).all(), k
    assert any(not np.allclose(after[k][m], start[k][m]) for k, m in masks.items())


def test_dp_sgd_noise_does_not_revive_pruned_weights() -> None:
    """Opacus adds its noise to ``p.grad`` after per-sample clipping, past any gradient hook:
    only re-masking after the optimizer step keeps pruned weights at zero."""
    from fedsqueeze.client.dp import train_local_dp

    _, masks = _mlp_masks()
    cfg = resolve_config(
        {"dp": "local", "dp-noise-multiplier": 1.0, "local-epochs": 1, "batch-size": 8}
    )
    with masked_training(masks):
        model = build_model("mlp", (1, 8, 8), 10, seed=1)
        x, y = _data()
        train_local_dp(model, x, y, cfg, RecordDict())
    after = state_to_numpy(model)
    for k, m in masks.items():
        assert (after[k][~m] == 0).all(), k


def test_a_mask_that_does_not_fit_the_model_is_a_typed_error() -> None:
    _, masks = _mlp_masks()
    with pytest.raises(PruningError), masked_training(masks):
        build_model("logreg", (1, 8, 8), 10)


def test_models_built_outside_the_scope_are_untouched() -> None:
    _, masks = _mlp_masks()
    with masked_training(masks):
        pass
    model = build_model("mlp", (1, 8, 8), 10, seed=1)
    x, y = _data()
    train_local(model, x, y, epochs=1, batch_size=8, lr=0.1)
    assert sparsity_of({k: v != 0 for k, v in state_to_numpy(model).items()}) == 0.0


# ---- the server wrapper and the client mod ---------------------------------------------------

N = 4
NODES = [1000 + i for i in range(N)]
BIG = {"w": (64, 32), "b": (32,)}


def _step(node: int) -> float:
    return 0.1 * (node - 999)


def _plain_app(secure: bool = False) -> ClientApp:
    """A Flower ClientApp with no pruning code: adds a per-node step to every weight."""
    app = ClientApp(mods=[downlink_mod, *([secagg_mod] if secure else []), compress_mod, prune_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        name, record = next(iter(msg.content.array_records.items()))
        local = {k: v.numpy() + _step(int(context.node_id)) for k, v in record.items()}
        metrics = MetricRecord({"num-examples": 10})
        return Message(
            content=RecordDict({name: to_record(local), "metrics": metrics}), reply_to=msg
        )

    return app


def _fedavg() -> FedAvg:
    return FedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=N, min_available_nodes=N
    )


def _rounds(
    strategy: Any, app: ClientApp, rounds: int
) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    grid = InProcessGrid(app, N)
    arrays = _arrays(0, BIG)
    history, uplink = [arrays], []
    for rnd in range(1, rounds + 1):
        view = CountingGrid(grid, NODES)
        new, _ = train_round(strategy, view, rnd, arrays, 60.0)
        assert new is not None
        arrays = new
        history.append(arrays)
        uplink.append(view.uplink_bytes)
    return history, uplink


@pytest.mark.parametrize("secure", [False, True])
def test_pruned_weights_stay_zero_through_aggregation_and_the_rest_is_global_plus_mean_delta(
    secure: bool,
) -> None:
    inner: Any = _fedavg()
    if secure:
        inner = SecAggStrategy(inner, clip=100.0, bits=40)
    strategy = PruningStrategy(CompressedStrategy(inner), sparsity=0.75, start_round=1, end_round=2)
    history, _ = _rounds(strategy, _plain_app(secure), rounds=3)
    masks = strategy.masks
    assert masks is not None
    assert sparsity_of(masks) == pytest.approx(0.75, abs=1e-3)
    mean_step = np.mean([_step(n) for n in NODES])
    before, after = history[-2], history[-1]
    for k, m in masks.items():
        assert (after[k][~m] == 0).all()
        np.testing.assert_allclose(after[k][m], before[k][m] + mean_step, atol=1e-4)


@pytest.mark.parametrize("secure", [False, True])
def test_the_uplink_carries_only_kept_coordinates(secure: bool) -> None:
    """The bytes saved per client are exactly the pruned coordinates at the value width
    (4 bytes fp32; secagg-bits / 8 under SecAgg), give or take a few envelope bytes."""

    def uplink(sparsity: float) -> int:
        inner: Any = _fedavg()
        if secure:
            inner = SecAggStrategy(inner, clip=100.0, bits=32)
        strategy = PruningStrategy(
            CompressedStrategy(inner), sparsity=sparsity, start_round=1, end_round=1
        )
        return _rounds(strategy, _plain_app(secure), rounds=1)[1][0]

    pruned = round(0.5 * 64 * 32)
    saved_per_client = (uplink(0.0) - uplink(0.5)) / N
    assert saved_per_client == pytest.approx(4 * pruned, abs=16)


@pytest.mark.parametrize("secure", [False, True])
def test_the_mask_is_sent_once_then_named_by_digest(secure: bool) -> None:
    """Also under SecAgg, whose mod rebuilds the train reply: the frozen mask travels once,
    and from the next round on the downlink is smaller by the coded mask per client."""
    inner: Any = _fedavg()
    if secure:
        inner = SecAggStrategy(inner, clip=100.0, bits=32)
    strategy = PruningStrategy(CompressedStrategy(inner), sparsity=0.5, start_round=1, end_round=1)
    grid = InProcessGrid(_plain_app(secure), N)
    arrays = _arrays(0, BIG)
    sent, downlink = [], []
    for rnd in (1, 2, 3):
        view = CountingGrid(grid, NODES)
        messages = list(strategy.configure_train(rnd, to_record(arrays), ConfigRecord(), view))
        sent.append([("mask" in m.content[PRUNE_KEY]) for m in messages])
        replies = view.send_and_receive(messages)
        arrays = {k: v.numpy() for k, v in strategy.aggregate_train(rnd, replies)[0].items()}
        downlink.append(view.downlink_bytes)
    assert sent == [[True] * N, [False] * N, [False] * N]
    assert downlink[1] == downlink[2]
    # the coded mask plus its field's framing in the record
    assert downlink[0] - downlink[1] == pytest.approx(N * len(strategy.coded), abs=N * 32)


def test_a_client_that_lost_the_mask_refuses_and_is_sent_it_again() -> None:
    strategy = PruningStrategy(
        CompressedStrategy(_fedavg()), sparsity=0.5, start_round=1, end_round=1
    )
    grid = InProcessGrid(_plain_app(), N)
    _rounds(strategy, _plain_app(), rounds=0)
    arrays = _arrays(0, BIG)
    for rnd in (1, 2, 3):
        if rnd == 2:
            for ctx in grid.contexts.values():
                ctx.state = RecordDict()  # the device restarted
        messages = list(
            strategy.configure_train(
                rnd, to_record(arrays), ConfigRecord(), CountingGrid(grid, NODES)
            )
        )
        replies = list(grid.send_and_receive(messages))
        assert all(r.has_error() for r in replies) == (rnd == 2)
        out, _ = strategy.aggregate_train(rnd, replies)
        if out is not None:
            arrays = {k: v.numpy() for k, v in out.items()}


def test_stateful_server_strategies_are_refused() -> None:
    with pytest.raises(StrategyCompositionError):
        PruningStrategy(CompressedStrategy(FedAdam()), sparsity=0.5)
    with pytest.raises(ConfigError, match="prune needs strategy"):
        resolve_config({"prune": "magnitude", "strategy": "fedadam"})
    with pytest.raises(ConfigError, match="prune-end-round"):
        resolve_config({"prune": "magnitude", "prune-start-round": 5, "prune-end-round": 2})
    with pytest.raises(ConfigError, match="per-coordinate"):
        resolve_config({"prune": "magnitude", "prune-end-round": 5, "codec": "topk(0.1)+ef"})
    with pytest.raises(ConfigError, match="prune-sparsity"):
        resolve_config({"prune": "magnitude", "prune-sparsity": 1.0})


def test_gradients_and_momentum_of_pruned_weights_are_masked() -> None:
    _, masks = _mlp_masks()
    with masked_training(masks):
        model = build_model("mlp", (1, 8, 8), 10, seed=1)
        params = dict(model.named_parameters())
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = _data()
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(
                model(torch.from_numpy(x)), torch.from_numpy(y)
            ).backward()
            for k, m in masks.items():
                assert (params[k].grad.numpy()[~m] == 0).all(), k
            opt.step()
    for k, m in masks.items():
        assert (opt.state[params[k]]["momentum_buffer"].numpy()[~m] == 0).all(), k


# ---- a pruned federation through fedsqueeze's round loop --------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["magnitude", "channel"])
def test_a_pruned_federation_reaches_its_sparsity_and_saves_a_pruned_model(
    tmp_path: Any, method: str
) -> None:
    from fedsqueeze.client.app import build_client_app
    from fedsqueeze.server.rounds import run_federation
    from fedsqueeze.server.rundir import RunDir

    cfg = resolve_config(
        {
            "num-clients": 2,
            "clients-per-round": 2,
            "num-rounds": 2,
            "local-epochs": 1,
            "batch-size": 64,
            "prune": method,
            "prune-sparsity": 0.8,
            "prune-start-round": 1,
            "prune-end-round": 2,
        }
    )
    grid = InProcessGrid(build_client_app(cfg), 2)
    summary = run_federation(grid, cfg, RunDir(tmp_path), node_timeout=5)
    rows = RunDir(tmp_path).read_metrics()
    assert [r["clients"] for r in rows] == [2, 2]
    assert rows[0]["sparsity"] == 0.0
    # magnitude: 80% of all prunable weights; channel: 80% of each hidden layer's neurons,
    # which removes more weights than that (rows and the next layer's columns)
    assert rows[1]["sparsity"] >= 0.79
    assert rows[1]["uplink_bytes"] < rows[0]["uplink_bytes"] / 3
    assert summary["model_bytes_sparse"] < rows[1]["model_bytes_dense"] / 3
    model = torch.load(tmp_path / "model.pt")
    zeros = sum(int((v == 0).sum()) for k, v in model.items() if v.ndim >= 2)
    total = sum(v.numel() for v in model.values() if v.ndim >= 2)
    assert zeros / total >= 0.79


def test_a_resumed_run_continues_with_the_same_mask() -> None:
    strategy = PruningStrategy(
        CompressedStrategy(_fedavg()), sparsity=0.5, start_round=1, end_round=2
    )
    _rounds(strategy, _plain_app(), rounds=2)
    resumed = PruningStrategy(
        CompressedStrategy(_fedavg()), sparsity=0.5, start_round=1, end_round=2
    )
    resumed.restore(strategy.state())
    assert resumed.digest == strategy.digest and resumed.masks is not None
    for k, m in strategy.masks.items():  # type: ignore[union-attr]
        np.testing.assert_array_equal(resumed.masks[k], m)
