"""Count sketch (FetchSGD) under secure aggregation: the core, the encoding and its glue."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_secure_glue import SMALL, _plain_fedavg_delta, _run, _secure_sum

from fedsqueeze.compression import CodecError, CodecSpecError, PayloadError, Sketch, parse_codec
from fedsqueeze.compression.sketch import MAX_GAIN, CountSketch, SketchAccumulator, sketch_shape
from fedsqueeze.config import ConfigError, resolve_config
from fedsqueeze.contracts.checks import check_secure_config
from fedsqueeze.contracts.streams import Stream, round_seed
from fedsqueeze.contracts.summable import (
    EncodingError,
    SketchSum,
    choose_integer_encoding,
    encoding_from_fields,
    sketched,
)
from fedsqueeze.secagg import from_field, to_field
from fedsqueeze.server.hooks import hooks_in
from fedsqueeze.server.rundir import pack_state, unpack_state
from fedsqueeze.server.secure import SecAggStrategy, outside_honest_range
from fedsqueeze.server.strategies import build_chain

# --- the core --------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 400),
    st.integers(1, 6),
    st.integers(1, 64),
    st.integers(0, 2**63 - 1),
    st.integers(8, 40),
    st.data(),
)
def test_sketch_commutes_with_sum_exactly_in_the_field(
    d: int, rows: int, cols: int, seed: int, bits: int, data: st.DataObject
) -> None:
    cs = CountSketch(d, rows, cols, seed)
    lim = 2**20
    vec = st.lists(st.integers(-lim, lim), min_size=d, max_size=d)
    a = np.array(data.draw(vec), dtype=np.int64)
    b = np.array(data.draw(vec), dtype=np.int64)

    def field(x: np.ndarray) -> np.ndarray:
        cells = cs.sketch(x)
        ints = np.rint(cells).astype(np.int64)
        assert np.array_equal(ints, cells)  # integer input -> integer cells, no rounding
        return to_field(ints, bits, wrap=True)

    mod = np.uint64((1 << bits) - 1)
    assert np.array_equal((field(a) + field(b)) & mod, field(a + b))


def test_same_seed_same_sketch_other_seed_other_sketch() -> None:
    x = np.random.default_rng(1).normal(size=500)
    one, two = CountSketch(500, 3, 40, 7), CountSketch(500, 3, 40, 7)
    np.testing.assert_array_equal(one.sketch(x), two.sketch(x))
    assert not np.array_equal(one.sketch(x), CountSketch(500, 3, 40, 8).sketch(x))
    # Every row holds the whole vector once: cell sums of a row are the signed sum of x.
    table = one.sketch(x).reshape(3, 40)
    np.testing.assert_allclose(table.sum(axis=1), (one.signs * x).sum(axis=1))


def _majority_clean(cs: CountSketch, support: np.ndarray) -> dict[int, list[int]]:
    """Per support coordinate, the rows where no other support coordinate shares its cell
    (only for coordinates with such rows in a strict majority)."""
    out = {}
    for i in support:
        rows = [
            r
            for r in range(cs.rows)
            if np.count_nonzero(cs.cells[r, support] == cs.cells[r, i]) == 1
        ]
        if 2 * len(rows) > cs.rows:
            out[int(i)] = rows
    return out


@settings(max_examples=80, deadline=None)
@given(
    st.integers(50, 3000),
    st.sampled_from([1, 3, 5]),
    st.integers(0, 2**32),
    st.integers(1, 12),
    st.floats(0.0, 0.05),
)
def test_heavy_hitter_estimate_is_within_the_noise_of_its_clean_rows(
    d: int, rows: int, seed: int, k: int, noise: float
) -> None:
    """Deterministic count-sketch bound: if a strict majority of a planted coordinate's rows
    share its cell with no other planted coordinate, its estimate is within the largest
    noise mass of those cells (the median lies between the clean rows' values)."""
    rng = np.random.default_rng(seed)
    cs = CountSketch(d, rows, 8 * k, seed)
    support = rng.choice(d, size=min(k, d), replace=False)
    heavy = np.zeros(d)
    heavy[support] = rng.choice([-1, 1], support.size) * rng.uniform(1, 10, support.size)
    tail = rng.normal(0, noise, d)
    tail[support] = 0.0
    table = cs.sketch(heavy + tail)
    noise_cells = cs.sketch(tail)
    est = cs.estimate(table)
    clean = _majority_clean(cs, support)
    if support.size == 1:
        assert list(clean) == [int(support[0])]  # alone: every row is clean
    for i, good in clean.items():
        bound = max(abs(noise_cells[cs.cells[r, i]]) for r in good)
        assert abs(est[i] - heavy[i]) <= bound + 1e-9


def test_heavy_recovers_planted_support_on_fixed_seeds() -> None:
    """5 rows x 100k columns: a planted k-sparse vector over a small tail is recovered.

    Columns must grow with d too: a light coordinate is mistaken for a heavy one when 3 of
    its 5 cells hold heavy ones, about ``d * C(5,3) * (k/cols)^3`` such coordinates (0.05
    here; 6 with 20k columns)."""
    recovered = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        d, k = 5000, 10
        cs = CountSketch(d, 5, 100 * k, seed)
        x = rng.normal(0, 0.01, d)
        support = np.sort(rng.choice(d, k, replace=False))
        x[support] = rng.choice([-1, 1], k) * rng.uniform(1, 2, k)
        idx, values = cs.heavy(cs.sketch(x), k)
        recovered += np.array_equal(idx, support)
        if np.array_equal(idx, support):
            assert np.abs(values - x[support]).max() < 0.2
    assert recovered >= 19


def test_accumulator_applies_heavy_coordinates_and_keeps_the_rest() -> None:
    d = 2000
    cs = CountSketch(d, 5, 200, 3)
    acc = SketchAccumulator(cs, k=5)
    x = np.zeros(d)
    x[[10, 500, 1999]] = [3.0, -2.0, 1.0]
    x[[7, 70]] = [0.2, 0.1]  # light: stays in the error until it adds up
    step = acc.step(cs.sketch(x))
    assert np.count_nonzero(step) <= 5
    np.testing.assert_allclose(step[[10, 500, 1999]], x[[10, 500, 1999]])
    # A second, empty round: what was not applied is still in the error sketch.
    rest = acc.step(np.zeros(cs.size))
    assert np.count_nonzero(rest) <= 5
    assert set(np.flatnonzero(step)) | set(np.flatnonzero(rest)) >= {10, 500, 1999, 7, 70}
    # Nothing is left: every planted coordinate was applied with its exact value.
    np.testing.assert_allclose(step + rest, x, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(2000, 6000),
    fraction=st.floats(0.002, 0.02),
    seed=st.integers(0, 2**32 - 1),
)
def test_small_sketch_descends_a_quadratic_instead_of_diverging(
    d: int, fraction: float, seed: int
) -> None:
    """FedAvg on ``f(w) = |w|^2 / 2`` through a one-row sketch of F < 1 / MAX_GAIN.

    The client update is ``x = -w / MAX_GAIN`` (curvature x client step = 1 / MAX_GAIN). The
    unbiased step applies ``m = 1 / F`` times the projection of ``x`` onto the sketch's span,
    so each cell's component of ``w`` is multiplied by ``1 - m / MAX_GAIN < -1``: ``f`` grows
    every round (the ``sketch(0.02)`` divergence on digits/``mlp``). Capped at ``MAX_GAIN``
    projections the factor is about 0: ``f`` never grows and drops."""
    cols = max(1, round(fraction * d))
    cs = CountSketch(d, 1, cols, seed % 2**31)
    per_cell = np.bincount(cs.cells[0], minlength=cols)
    # f decreases for every cell with fewer than twice the mean number of coordinates
    # (a binomial with mean >= 50: always, but it is the assumption, so check it)
    assert per_cell.max() < 2 * d / cols
    acc = SketchAccumulator(cs, k=d)
    assert acc.scale == pytest.approx(MAX_GAIN * cols / d)
    w = np.random.default_rng(seed).normal(size=d)
    loss = [0.5 * float(w @ w)]
    for _ in range(5):
        w = w + acc.step(cs.sketch(-w / MAX_GAIN))
        loss.append(0.5 * float(w @ w))
    assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(loss)), loss
    assert loss[-1] < loss[0]  # only w's component in the sketch's span can move


@pytest.mark.parametrize("cells", [49, 50, 51, 200])
def test_step_scale_is_one_unless_the_unbiased_step_exceeds_max_gain(cells: int) -> None:
    """``F >= 1 / MAX_GAIN`` (every configuration measured before the cap) keeps the
    unbiased step, the count-sketch estimates themselves; a smaller sketch scales them."""
    d = int(MAX_GAIN) * 50
    cs = CountSketch(d, 1, cells, 5)
    table = cs.sketch(np.random.default_rng(cells).normal(size=d))
    idx, values = cs.heavy(table, 300)
    step = SketchAccumulator(cs, k=300).step(table)
    scale = min(1.0, MAX_GAIN * cells / d)
    np.testing.assert_allclose(step[idx], scale * values)
    assert np.count_nonzero(step) == 300
    assert SketchAccumulator(cs, k=300, max_gain=d / cells).scale == 1.0
    with pytest.raises(CodecError):
        SketchAccumulator(cs, k=300, max_gain=0.5)


def test_accumulator_state_round_trips() -> None:
    cs = CountSketch(300, 3, 20, 0)
    acc = SketchAccumulator(cs, k=4, momentum=0.5)
    acc.step(cs.sketch(np.random.default_rng(0).normal(size=300)))
    other = SketchAccumulator(cs, k=4, momentum=0.5)
    other.restore(acc.state())
    t = cs.sketch(np.random.default_rng(1).normal(size=300))
    np.testing.assert_array_equal(acc.step(t), other.step(t))


# --- decoder fuzz: bad shapes and dtypes are typed errors, state untouched --------------------


@settings(max_examples=80, deadline=None)
@given(
    st.one_of(
        # 60 = 3 x 20 cells is a valid table: every other length is not
        st.integers(0, 200).filter(lambda n: n != 60).map(lambda n: np.zeros(n)),
        st.integers(1, 30).map(lambda n: np.zeros((n, 2))),
        st.sampled_from(
            [
                np.zeros(60, dtype=object),
                np.array(["a"] * 60),
                np.full(60, np.nan),
                np.full(60, np.inf),
                np.zeros(60, dtype=complex),
                np.float64(1.0),
            ]
        ),
    )
)
def test_bad_mean_sketch_is_a_payload_error_and_keeps_the_state(table: Any) -> None:
    cs = CountSketch(100, 3, 20, 5)
    acc = SketchAccumulator(cs, k=3)
    acc.step(cs.sketch(np.arange(100.0)))
    before = acc.state()
    with pytest.raises(PayloadError):
        acc.step(table)
    after = acc.state()
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "fields",
    [
        {"sketch_dim": 100, "sketch_rows": 3, "sketch_cols": 20},  # no seed
        {"sketch_dim": 100, "sketch_rows": 3, "sketch_cols": 21, "sketch_seed": 1},  # 63 != 60
        {"sketch_dim": 0, "sketch_rows": 3, "sketch_cols": 20, "sketch_seed": 1},
        {"sketch_dim": 100, "sketch_rows": 3, "sketch_cols": 20, "sketch_seed": -1},
        {"sketch_dim": 2**40, "sketch_rows": 3, "sketch_cols": 20, "sketch_seed": 1},
        {"sketch_dim": "x", "sketch_rows": 3, "sketch_cols": 20, "sketch_seed": 1},
        {
            "sketch_dim": 100,
            "sketch_rows": 3,
            "sketch_cols": 20,
            "sketch_seed": 1,
            "randk_dim": 9,
            "randk_seed": 1,
        },
    ],
)
def test_bad_sketch_description_is_an_encoding_error(fields: dict[str, Any]) -> None:
    inner = choose_integer_encoding(dim=60, num_clients=4, clip=1.0, bits=12).to_fields()
    with pytest.raises(EncodingError):
        encoding_from_fields({**inner, **fields})


def test_sketch_encoding_refuses_a_wrong_length_update() -> None:
    enc = _encoding(100, Sketch(0.3, rows=3))
    with pytest.raises(EncodingError):
        enc.encode(np.zeros(99), 1, np.random.default_rng())


# --- the encoding under secure aggregation ---------------------------------------------------


def _encoding(d: int, stage: Sketch, n: int = 4, **kw: Any) -> SketchSum:
    kw = {"clip": 10.0, "bits": 16} | kw
    return sketched(lambda m: choose_integer_encoding(dim=m, num_clients=n, **kw), d, stage, 11)


def test_sketch_encoding_survives_its_description_and_secure_sum() -> None:
    d, n = 400, 4
    enc = _encoding(d, Sketch(0.25, rows=4), n=n, weight_cap=20)
    assert (enc.rows, enc.cols) == sketch_shape(d, 0.25, 4) == (4, 25)
    assert enc.vector_len == 101  # 100 cells + the weight
    again = encoding_from_fields(enc.to_fields())
    assert again == enc
    rng = np.random.default_rng(0)
    deltas = {c + 1: rng.normal(0, 0.1, d) for c in range(n)}
    sizes = {c: int(rng.integers(1, 21)) for c in deltas}
    ints = {c: again.encode(deltas[c], sizes[c], rng) for c in deltas}
    result = _secure_sum({c: to_field(v, enc.bits) for c, v in ints.items()}, enc.bits)
    total = from_field(result.total, enc.bits)
    np.testing.assert_array_equal(total, sum(ints.values()))  # exact in the field
    assert outside_honest_range(enc, total, n) == ""
    table, weight = enc.decode_sum(total, n)
    assert weight == sum(sizes.values())
    expected = enc.sketch.sketch(sum(sizes[c] * deltas[c] for c in deltas))
    inner = enc.inner
    step = math.sqrt(enc.rows) * inner.weight_cap / inner.scale  # type: ignore[attr-defined]
    assert np.abs(table - expected).max() <= n * step  # one rounding step per client


def test_forged_sketch_sum_is_outside_the_honest_range() -> None:
    enc = _encoding(400, Sketch(0.25, rows=4), n=4)
    inner = enc.inner
    reach = inner.scale * inner.clip * 4  # type: ignore[attr-defined]
    forged = np.full(enc.vector_len, int(0.9 * reach), dtype=np.int64)  # each cell honest
    assert "exceeds" in outside_honest_range(enc, forged, 4)


# --- spec and config -------------------------------------------------------------------------


def test_sketch_spec_parses_and_a_plain_codec_refuses_it() -> None:
    codec = parse_codec("sketch(0.05, rows=3, k=40, momentum=0.5, gain=2.5)")
    assert codec.spec == "sketch(0.05,rows=3,k=40,momentum=0.5,gain=2.5)"
    assert parse_codec(codec.spec) == codec and codec.linear and codec.needs_seed
    assert isinstance(codec.sparsifier, Sketch) and codec.sparsifier.k == 40
    with pytest.raises(CodecError, match="secagg = true"):
        codec.encode({"w": np.zeros(10, dtype=np.float32)}, seed=1)
    for bad in (
        "sketch",
        "sketch(0)",
        "sketch(0.1,rows=0)",
        "sketch(0.1,momentum=1)",
        "sketch(0.1,k=2.5)",
        "sketch(0.1,gain=0.5)",
        "sketch(0.1,gain=inf)",
        "sketch(0.1,cols=3)",
        "sketch(0.1)+randk(0.1)",
    ):
        with pytest.raises(CodecSpecError):
            parse_codec(bad)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"codec": "sketch(0.05)"}, "needs secagg = true"),
        ({"secagg": True, "codec": "sketch(0.05)+ef"}, "keeps its error on the server"),
        (
            {"secagg": True, "codec": "sketch(0.05)", "dp": "central", "dp-noise-multiplier": 1.0},
            "no central dp",
        ),
        ({"secagg": True, "codec": "sketch(0.05)", "secagg-randk": 0.1}, "both set"),
        ({"secagg": True, "codec": "sketch(0.05)+q8"}, "'q8' cannot run under secagg"),
    ],
)
def test_config_refuses_what_a_sketch_cannot_do(override: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        resolve_config(override)
    check_secure_config(resolve_config({"secagg": True, "codec": "sketch(0.05,rows=3,k=9)"}))


# --- a federation: SecAgg+ sums the sketches, the server unsketches -------------------------


def test_sketched_secure_round_applies_the_unsketched_plain_mean() -> None:
    """In process, 5 clients, SecAgg+ at 24 bits: the global step is exactly what the server
    accumulator makes of the sketch of the plain FedAvg mean (linearity end to end)."""
    overrides = {"secagg-clip": 100.0, "secagg-bits": 24}
    run = _run({**overrides, "codec": "sketch(0.2,rows=3,k=40,gain=2)"})  # scale 0.4
    (r,) = run.rounds
    assert r.row["clients"] == 5 and r.row["rejected_updates"] == 0
    d = sum(v.size for v in run.start.values())
    rows, cols = sketch_shape(d, 0.2, 3)
    assert r.row["secagg_vector_len"] == rows * cols + 1  # the cells + the weight
    step = np.concatenate([(run.arrays[k] - run.start[k]).ravel() for k in run.start])
    assert 0 < np.count_nonzero(step) <= 40  # k-sparse: the model moved
    plain = _plain_fedavg_delta({"secagg-clip": 100.0, "update-norm-factor": 0.0})
    mean = np.concatenate([plain[k].ravel() for k in run.start]).astype(np.float64)
    cs = CountSketch(d, rows, cols, round_seed(0, 0, Stream.SKETCH))
    expected = SketchAccumulator(cs, 40, max_gain=2).step(cs.sketch(mean))
    moved = np.flatnonzero(step)
    overlap = np.intersect1d(moved, np.flatnonzero(expected)).size
    assert overlap >= 0.95 * moved.size  # near-ties in |estimate| may swap a few
    both = np.intersect1d(moved, np.flatnonzero(expected))
    np.testing.assert_allclose(step[both], expected[both], atol=1e-3)
    acc = run.wrapper(SecAggStrategy)._unsketch
    assert acc is not None and np.any(acc.error != 0)  # the rest waits on the server


def test_a_resumed_sketch_run_keeps_the_servers_error_and_momentum() -> None:
    """The error (and momentum) FetchSGD keeps on the server is checkpoint state: a run resumed
    after round 1 continues from it instead of silently starting from zero."""
    overrides = {
        "secagg-clip": 100.0,
        "secagg-bits": 24,
        "codec": "sketch(0.2,rows=3,k=40,momentum=0.5)",
    }
    run = _run(overrides)
    live = run.wrapper(SecAggStrategy)
    assert live._unsketch is not None and np.any(live._unsketch.error != 0)
    arrays: dict[str, np.ndarray] = {}
    saved = unpack_state(pack_state(live.state(), arrays), arrays)  # as the checkpoint keeps it

    def secagg_of(chain: Any) -> SecAggStrategy:
        (hook,) = [h for h in hooks_in(chain) if h.hook_name == live.hook_name]
        assert isinstance(hook, SecAggStrategy)
        return hook

    resumed = secagg_of(build_chain(resolve_config(SMALL, overrides)))
    fresh = secagg_of(build_chain(resolve_config(SMALL, overrides)))
    resumed.restore(saved)
    assert resumed.state().keys() == live.state().keys()  # kept until the first round uses it
    d = sum(v.size for v in run.start.values())
    encoding = resumed._encoding(d, 5, 2)
    assert isinstance(encoding, SketchSum)
    table = np.random.default_rng(2).normal(size=encoding.sketch.size)
    expected = live._unsketcher(encoding).step(table)
    np.testing.assert_array_equal(resumed._unsketcher(encoding).step(table), expected)
    assert not np.array_equal(fresh._unsketcher(encoding).step(table), expected)
