"""DGC's fixes (fedsqueeze.compression.dgc, compress_mod, CompressedStrategy, ServerFeedback):
mass conservation, masking, clipping, the warm-up schedule and server-side accumulation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from inprocess import InProcessGrid
from test_composition import NODES, N, _global, _step, fedavg, plain_app

from fedsqueeze.compression import CodecError, parse_codec
from fedsqueeze.compression.dgc import (
    VELOCITY_KEY,
    DGCOptions,
    ServerAccumulator,
    clip_l2,
    encode_update,
    warmup_codec,
    warmup_density,
)
from fedsqueeze.config import ConfigError, resolve_config
from fedsqueeze.contracts.records import CODEC_STATE_KEY, from_record
from fedsqueeze.server import CompressedStrategy, CountingGrid
from fedsqueeze.server.feedback import ServerFeedback, server_feedback_from_config
from fedsqueeze.server.rounds import train_round
from fedsqueeze.server.strategies import build_chain

D = 40
finite = st.floats(-10, 10, allow_nan=False, width=32)
vectors = arrays(np.float32, D, elements=finite)


def _sent(codec_spec: str, payload: bytes, seed: int = 0) -> np.ndarray:
    return parse_codec(codec_spec).decode(payload, seed=seed).arrays["x"]


# ---- client side ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    updates=st.lists(vectors, min_size=1, max_size=4),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    masking=st.booleans(),
    spec=st.sampled_from(["topk(0.1)+ef", "topk(0.25)+q4+ef", "randk(0.2)+q8+ef", "q2+ef"]),
)
def test_error_feedback_conserves_mass_with_momentum_correction(
    updates: list[np.ndarray], momentum: float, masking: bool, spec: str
) -> None:
    """Every round: sent + new residual == velocity + old residual, where the velocity is
    ``m * old velocity (masked) + update`` — nothing is lost or created by the DGC fixes."""
    codec = parse_codec(spec)
    options = DGCOptions(momentum=momentum, masking=masking)
    state: dict[str, np.ndarray] = {}
    for rnd, update in enumerate(updates):
        residual = state.get("ef.residual", np.zeros(D, np.float32))
        velocity = momentum * state.get(VELOCITY_KEY, np.zeros(D, np.float32)) + update
        enc = encode_update(codec, {"x": update}, options, seed=rnd, state=state)
        sent = _sent(spec, enc.payload, rnd)
        np.testing.assert_allclose(
            sent + enc.state["ef.residual"], velocity + residual, rtol=1e-5, atol=1e-4
        )
        if momentum > 0:
            kept = enc.state[VELOCITY_KEY]
            mask = np.zeros(D, bool)
            mask[slice(None) if enc.positions is None else enc.positions] = True
            if masking:  # exactly the sent coordinates are cleared, the rest keep velocity
                assert np.all(kept[mask] == 0)
                np.testing.assert_allclose(kept[~mask], velocity[~mask], rtol=1e-6, atol=1e-6)
            else:
                np.testing.assert_allclose(kept, velocity, rtol=1e-6, atol=1e-6)
        else:
            assert VELOCITY_KEY not in enc.state
        state = enc.state


def test_masking_clears_the_sent_positions_of_a_topk_codec() -> None:
    update = np.arange(1, D + 1, dtype=np.float32)
    enc = encode_update(
        parse_codec("topk(4)+ef"), {"x": update}, DGCOptions(momentum=0.9), layout="full"
    )
    assert enc.positions is not None and list(enc.positions) == [36, 37, 38, 39]
    velocity = enc.state[VELOCITY_KEY]
    assert np.all(velocity[36:] == 0) and np.array_equal(velocity[:36], update[:36])


@given(vectors, st.floats(0.01, 100))
def test_clipping_bounds_what_enters_the_accumulators(update: np.ndarray, bound: float) -> None:
    clipped = clip_l2(update, bound)
    norm = float(np.linalg.norm(update.astype(np.float64)))
    assert np.linalg.norm(clipped) <= bound * (1 + 1e-5) + 1e-6
    if norm <= bound:
        assert clipped is update
    else:  # the same direction
        np.testing.assert_allclose(clipped * norm / bound, update, rtol=1e-4, atol=1e-4)
    enc = encode_update(parse_codec("topk(0.1)+ef"), {"x": update}, DGCOptions(clip=bound))
    total = _sent("topk(0.1)+ef", enc.payload) + enc.state["ef.residual"]
    np.testing.assert_allclose(total, clipped, rtol=1e-5, atol=1e-5)


def test_fixes_leave_codecs_without_error_feedback_alone() -> None:
    update = {"x": np.linspace(-5, 5, D, dtype=np.float32)}
    rng = np.random.default_rng(0)
    plain = parse_codec("topk(0.1)+q8").encode(update, rng=rng)
    dgc = encode_update(
        parse_codec("topk(0.1)+q8"),
        update,
        DGCOptions(momentum=0.9, clip=0.1),
        rng=np.random.default_rng(0),
    )
    assert dgc.payload == plain.payload and dgc.state == {}


def test_options_validate_and_round_trip() -> None:
    opts = DGCOptions(momentum=0.5, masking=False, clip=3.0)
    assert DGCOptions.from_record(opts.to_record()) == opts
    assert DGCOptions.from_record({}) == DGCOptions()
    for bad in ({"dgc-momentum": 1.0}, {"dgc-momentum": -0.1}, {"dgc-clip": float("nan")}):
        with pytest.raises(CodecError):
            DGCOptions.from_record(bad)
    with pytest.raises(CodecError, match="velocity"):
        encode_update(
            parse_codec("topk(0.1)+ef"),
            {"x": np.ones(D, np.float32)},
            DGCOptions(momentum=0.5),
            state={VELOCITY_KEY: np.ones(3, np.float32)},
        )


# ---- warm-up ------------------------------------------------------------------------------


@given(
    target=st.floats(1e-4, 1.0),
    start=st.floats(1e-4, 1.0),
    rounds=st.integers(0, 12),
)
def test_warmup_schedule_is_monotone_and_reaches_the_target(
    target: float, start: float, rounds: int
) -> None:
    densities = [warmup_density(r, target, rounds, start) for r in range(1, rounds + 4)]
    assert all(a >= b for a, b in itertools.pairwise(densities))
    assert densities[rounds] == target and densities[-1] == target  # round rounds + 1 on
    assert all(min(start, 1.0) >= d >= target * (1 - 1e-12) for d in densities) or start <= target
    if rounds > 0 and start > target:
        assert densities[0] == pytest.approx(start)
        ratios = [b / a for a, b in itertools.pairwise(densities[: rounds + 1])]
        assert max(ratios) - min(ratios) < 1e-9  # exponential: one factor every round


def test_warmup_codec_changes_only_a_fractional_sparsifier() -> None:
    codec = parse_codec("topk(0.01)+q4+ef")
    specs = [warmup_codec(codec, r, 4, 0.25).spec for r in range(1, 7)]
    assert specs == [
        "topk(0.25)+q4+ef",
        "topk(0.112)+q4+ef",
        "topk(0.05)+q4+ef",
        "topk(0.0224)+q4+ef",
        "topk(0.01)+q4+ef",
        "topk(0.01)+q4+ef",
    ]
    for fixed in ("topk(10)+ef", "q4+ef", "thresh(0.1)+ef", "none"):
        assert warmup_codec(parse_codec(fixed), 1, 4, 0.25) == parse_codec(fixed)


# ---- through the mods and the strategy ---------------------------------------------------


def test_residual_survives_the_warmup_density_changes() -> None:
    """Mass conservation over rounds through compress_mod and CompressedStrategy: the global
    model moved by mean(sum of updates - final residual). Keying the client state on the
    whole codec spec would drop the residual each time the warm-up changes the density."""
    strategy = CompressedStrategy(
        fedavg(),
        codec="topk(0.1)+ef",
        warmup=(3, 0.5),
        client_options=DGCOptions(momentum=0.0),
    )
    grid = InProcessGrid(plain_app(), N)
    arrays = start = _global()
    rounds = 5
    for rnd in range(1, rounds + 1):
        arrays, _ = train_round(strategy, CountingGrid(grid, NODES), rnd, arrays, 60.0)
    residuals = [from_record(grid.contexts[n].state[CODEC_STATE_KEY])["ef.residual"] for n in NODES]
    d = sum(a.size for a in start.values())
    expected = np.mean(
        [rounds * _step(n) * np.ones(d) - e for n, e in zip(NODES, residuals, strict=True)], 0
    )
    moved = np.concatenate([(arrays[k] - start[k]).ravel() for k in start])
    np.testing.assert_allclose(moved, expected, atol=1e-4)
    assert max(float(np.abs(e).max()) for e in residuals) > 0.1  # something was held back


def test_stochastic_rounding_repeats_by_seed() -> None:
    """Runs without DP repeat bit for bit by seed (README): the plain codec's stochastic
    rounding is drawn from the round's codec seed and the client, not from OS entropy."""

    def run() -> dict[str, np.ndarray]:
        strategy = CompressedStrategy(fedavg(), codec="topk(0.5)+q2+ef", warmup=(0, 1.0))
        grid = InProcessGrid(plain_app(), N)
        arrays = _global()
        for rnd in (1, 2):
            arrays, _ = train_round(strategy, CountingGrid(grid, NODES), rnd, arrays, 60.0)
        return arrays

    first, second = run(), run()
    assert all(np.array_equal(first[k], second[k]) for k in first)


def test_strategy_sends_the_round_codec_and_the_options() -> None:
    on = {"dgc-momentum": 0.9, "dgc-clip": 10.0, "dgc-warmup-rounds": 4}
    config = resolve_config({"codec": "topk(0.01)+q4+ef", **on})
    strategy = build_chain(config)
    assert isinstance(strategy, CompressedStrategy)
    assert strategy.codec_at(1).spec == "topk(0.25)+q4+ef"
    assert strategy.codec_at(5).spec == "topk(0.01)+q4+ef"
    assert strategy.client_options == DGCOptions(momentum=0.9, masking=True, clip=10.0)
    # The defaults (measured, simulations/README.md): warm-up on, momentum and clipping off.
    default = build_chain(resolve_config({"codec": "topk(0.01)+q4+ef"}))
    assert default.client_options == DGCOptions(momentum=0.0, masking=True, clip=0.0)
    assert default.codec_at(1).spec == "topk(0.25)+q4+ef"
    assert default.codec_at(5).spec == "topk(0.01)+q4+ef"
    off = build_chain(resolve_config({"codec": "topk(0.01)+q4+ef", "dgc-warmup-rounds": 0}))
    assert off.codec_at(1).spec == "topk(0.01)+q4+ef"
    with pytest.raises(ConfigError):
        resolve_config({"server-ef-density": 1.5})
    with pytest.raises(ConfigError):
        resolve_config({"dgc-momentum": 1.0})


# ---- server side --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    aggregates=st.lists(vectors, min_size=1, max_size=5),
    density=st.sampled_from([0.05, 0.3, 1.0]),
    momentum=st.sampled_from([0.0, 0.9]),
    masking=st.booleans(),
)
def test_server_accumulator_conserves_mass(
    aggregates: list[np.ndarray], density: float, momentum: float, masking: bool
) -> None:
    """applied + new error == old error + velocity; masking clears the applied velocity."""
    acc = ServerAccumulator(momentum=momentum, density=density, masking=masking)
    error = velocity = np.zeros(D)
    for a in aggregates:
        velocity = momentum * velocity + a.astype(np.float64)
        applied = acc.step(a)
        assert acc.error is not None and acc.velocity is not None
        np.testing.assert_allclose(applied + acc.error, error + velocity, atol=1e-9)
        assert np.count_nonzero(applied) <= max(1, round(density * D))
        where = applied != 0
        if masking and density < 1:
            assert np.all(acc.velocity[where] == 0)
        velocity, error = acc.velocity.copy(), acc.error.copy()


def test_server_accumulator_off_is_the_identity() -> None:
    acc = ServerAccumulator()
    a = np.linspace(-1, 1, D)
    np.testing.assert_array_equal(acc.step(a), a)
    np.testing.assert_array_equal(acc.step(2 * a), 2 * a)
    restored = ServerAccumulator(0.9, 0.1)
    restored.restore(ServerAccumulator(0.9, 0.1).state() or {"error": a, "velocity": a})
    assert restored.error is not None and np.array_equal(restored.error, a)


def test_server_momentum_with_dense_steps_is_heavy_ball() -> None:
    """``server-ef-momentum`` without a sparse step is server momentum, masking or not (the
    default masking used to clear the whole velocity after each dense step: no momentum)."""
    a = np.linspace(-1, 1, D)
    for masking in (True, False):
        acc = ServerAccumulator(momentum=0.5, density=1.0, masking=masking)
        steps = [acc.step(a) for _ in range(3)]
        np.testing.assert_allclose(steps, [a, 1.5 * a, 1.75 * a], atol=1e-12)


def test_server_feedback_holds_back_what_it_does_not_apply() -> None:
    """Through the round: the global moves only at the top coordinates; the rest waits on
    the server, and the sum of steps plus the server's error is the sum of aggregates."""
    inner = ServerFeedback(fedavg(), density=0.25)
    strategy = CompressedStrategy(inner)
    grid = CountingGrid(InProcessGrid(plain_app(), N), NODES)
    start = arrays = _global()
    for rnd in (1, 2):
        arrays, _ = train_round(strategy, grid, rnd, arrays, 60.0)
    moved = np.concatenate([(arrays[k] - start[k]).ravel() for k in start])
    total = 2 * np.mean([_step(n) for n in NODES])
    assert inner.accumulator.error is not None
    np.testing.assert_allclose(moved + inner.accumulator.error, total, atol=1e-5)
    assert np.count_nonzero(np.abs(moved) > 1e-6) <= 2 * round(0.25 * moved.size)
    assert float(np.linalg.norm(inner.accumulator.error)) > 0


def test_server_feedback_only_when_asked() -> None:
    base = FedAvg()
    assert server_feedback_from_config(base, resolve_config({})) is base
    wrapped = server_feedback_from_config(base, resolve_config({"server-ef-density": 0.1}))
    assert isinstance(wrapped, ServerFeedback) and wrapped.inner is base
