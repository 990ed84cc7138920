"""``hadamard+qB`` under secure aggregation, and the contract every summable encoding keeps.

The contract (:mod:`fedsqueeze.contracts.summable`): the secure sum of ``n`` clients' integer
vectors decodes exactly in the encoding's field (no wrap-around, whatever the inputs), the
decoded sum is the sum of the clipped (weighted) inputs up to rounding — within a bound the
test derives from the encoding's scale — and the rounding is unbiased.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_secure_glue import SMALL, _plain_fedavg_delta, _run, _secure_sum

from fedsqueeze.cli import EXIT_USAGE, main
from fedsqueeze.compression import CodecError, CodecSpecError, Sketch, parse_codec
from fedsqueeze.compression.hadamard import BlockHadamard
from fedsqueeze.config import ConfigError, resolve_config
from fedsqueeze.contracts.checks import check_secure_config
from fedsqueeze.contracts.streams import Stream, round_seed
from fedsqueeze.contracts.summable import (
    ClippedSum,
    EncodingError,
    HadamardQuantSum,
    RandomK,
    SketchSum,
    SummableEncoding,
    WeightedSum,
    choose_integer_encoding,
    encode_with_feedback,
    encoding_from_fields,
    random_k,
    sketched,
)
from fedsqueeze.secagg import from_field, to_field
from fedsqueeze.server.hooks import strategy_chain
from fedsqueeze.server.secure import SecAggStrategy, outside_honest_range
from fedsqueeze.server.strategies import build_chain

CLIP = 2.0


def _field_sum(ints: list[np.ndarray], bits: int) -> np.ndarray:
    """What secure aggregation hands the server: the sum mod 2^bits, centred."""
    acc = np.zeros(ints[0].shape, dtype=np.uint64)
    for v in ints:
        acc = (acc + to_field(v, bits, wrap=True)) & np.uint64((1 << bits) - 1)
    return from_field(acc, bits)


def _clipped(x: np.ndarray, clip: float) -> np.ndarray:
    norm = float(np.linalg.norm(x))
    return x * (clip / norm) if norm > clip else x


# --- the contract, for every summable encoding without client noise -------------------------

Base = Callable[[int, int], SummableEncoding]
"""``(dim, n) -> encoding``: an encoding whose decoded total is ``sum_i w_i clip(x_i)``."""

BASES: dict[str, Base] = {
    "clipped": lambda d, n: choose_integer_encoding(dim=d, num_clients=n, clip=CLIP, bits=14),
    "weighted": lambda d, n: choose_integer_encoding(
        dim=d, num_clients=n, clip=CLIP, bits=14, weight_cap=8
    ),
    "hadamard+q4": lambda d, n: HadamardQuantSum(d, CLIP, 4, n, 5),
    "hadamard+q2 weighted": lambda d, n: HadamardQuantSum(d, CLIP, 2, n, 5, 0, 8),
    "hadamard(block=16)+q8": lambda d, n: HadamardQuantSum(d, CLIP, 8, n, 5, 16),
}


def _cap(enc: SummableEncoding) -> int:
    return int(getattr(enc, "weight_cap", 0))


def _step_norm(enc: SummableEncoding) -> float:
    """L2 norm of one client's worst-case rounding error in the decoded total (update units)."""
    cap = _cap(enc) or 1
    if isinstance(enc, HadamardQuantSum):
        # Orthonormal rotation: < 1 level per rotated coordinate.
        return math.sqrt(enc.padded_dim) / enc.scale * cap
    assert isinstance(enc, ClippedSum)
    return math.sqrt(enc.dim) / enc.scale * cap


def _quiet_inputs(enc: SummableEncoding, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Inputs at a quarter of the clip: no rotated coordinate comes near the clamp."""
    d = enc.input_len
    return [rng.normal(0, 1, d) * (0.25 * CLIP / math.sqrt(d)) for _ in range(n)]


@pytest.mark.parametrize("name", sorted(BASES))
def test_contract_sum_decodes_to_the_sum_of_clipped_inputs(name: str) -> None:
    n, d = 5, 200
    enc = BASES[name](d, n)
    assert encoding_from_fields(enc.to_fields()) == enc
    rng = np.random.default_rng(1)
    xs = _quiet_inputs(enc, n, rng)
    xs[0] = xs[0] * 40  # over the clip: clipped, not rejected
    sizes = [int(rng.integers(1, 9)) for _ in range(n)]
    ints = [enc.encode(x, w, rng) for x, w in zip(xs, sizes, strict=True)]
    summed = _field_sum(ints, enc.bits)
    np.testing.assert_array_equal(summed, sum(ints))  # no wrap-around
    assert outside_honest_range(enc, summed, n) == ""
    total, weight = enc.decode_sum(summed, n)
    cap = _cap(enc)
    ws = [min(w, cap) for w in sizes] if cap else [1] * n
    expected = sum(w * _clipped(x, CLIP) for w, x in zip(ws, xs, strict=True))
    assert np.linalg.norm(total - expected) <= n * _step_norm(enc)
    assert weight == pytest.approx(sum(ws), abs=n * cap / 2) if cap else weight == n


@pytest.mark.parametrize("name", sorted(BASES))
def test_contract_rounding_is_unbiased(name: str) -> None:
    n, d, draws = 3, 64, 400
    enc = BASES[name](d, n)
    rng = np.random.default_rng(2)
    xs = _quiet_inputs(enc, n, rng)
    cap = _cap(enc)
    ws = [cap or 1] * n  # a full weight: the total is then linear in the rounding alone
    expected = sum(w * x for w, x in zip(ws, xs, strict=True))
    errors = []
    for _ in range(draws):
        ints = [enc.encode(x, w, rng) for x, w in zip(xs, ws, strict=True)]
        errors.append(enc.decode_sum(sum(ints), n)[0] - expected)
    err = np.array(errors)
    one = float(np.sqrt((err**2).sum(axis=1).mean()))  # rms error of one draw
    assert one > 0  # rounding happened
    # Unbiased: the mean of `draws` independent errors shrinks like 1/sqrt(draws) (a bias
    # of a tenth of one draw's error would already fail this at 400 draws).
    assert np.linalg.norm(err.mean(axis=0)) <= 3 * one / math.sqrt(draws)


@pytest.mark.parametrize("name", sorted(BASES))
def test_contract_wrappers_decode_their_projection_of_the_sum(name: str) -> None:
    """Random-k and the count sketch around any base: the sum decodes to the projection."""
    n, d = 4, 300
    rng = np.random.default_rng(3)
    xs = [rng.normal(0, 0.02, d) for _ in range(n)]
    for enc in (
        random_k(lambda m: BASES[name](m, n), d, 0.3, 17),
        sketched(lambda m: BASES[name](m, n), d, Sketch(0.4, rows=2), 17),
    ):
        assert encoding_from_fields(enc.to_fields()) == enc
        inner = enc.inner  # type: ignore[attr-defined]
        cap = _cap(inner) or 1
        ints = [enc.encode(x, cap, rng) for x in xs]
        summed = _field_sum(ints, enc.bits)
        np.testing.assert_array_equal(summed, sum(ints))
        total, _ = enc.decode_sum(summed, n)
        if hasattr(enc, "positions"):
            expected = np.zeros(d)
            expected[enc.positions] = sum(cap * x[enc.positions] for x in xs)
            bound = n * _step_norm(inner)
        else:
            expected = enc.sketch.sketch(sum(cap * x for x in xs))  # type: ignore[attr-defined]
            bound = n * _step_norm(inner) * math.sqrt(enc.rows)  # type: ignore[attr-defined]
        assert np.linalg.norm(total - expected) <= bound


# --- hadamard+qB: properties -----------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 700),
    n=st.integers(2, 40),
    levels_bits=st.integers(1, 16),
    clip=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**32),
    weight_cap=st.sampled_from([0, 1, 7, 300]),
    blow=st.floats(0.0, 1e6),
)
def test_no_overflow_for_n_clients_at_max_norm(
    d: int, n: int, levels_bits: int, clip: float, seed: int, weight_cap: int, blow: float
) -> None:
    """At the field B + ceil(log2 n), n clients' sum never wraps — not even for inputs that put
    all of the clip on one rotated coordinate (clamped, not wrapped), or far over the clip."""
    enc = HadamardQuantSum(d, clip, levels_bits, n, seed % 1000, 0, weight_cap)
    assert enc.bits == levels_bits + math.ceil(math.log2(n))
    rng = np.random.default_rng(seed)
    spike = np.zeros(enc.padded_dim)
    spike[int(rng.integers(enc.padded_dim))] = clip  # rotates back onto one coordinate
    worst = enc.rotation.unrotate(spike)
    xs = [worst, -worst] + [rng.normal(0, 1, d) * blow for _ in range(n - 2)]
    ints = [enc.encode(x, int(rng.integers(0, 2 * weight_cap + 2)), rng) for x in xs]
    for v in ints:
        assert v.shape == (enc.vector_len,)
        assert int(v.min()) >= -enc.half and int(v.max()) <= enc.half - 1  # B-bit values
    np.testing.assert_array_equal(_field_sum(ints, enc.bits), sum(ints))


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 600),
    n=st.integers(2, 12),
    levels_bits=st.integers(1, 12),
    seed=st.integers(0, 2**32),
    norm=st.floats(1e-6, 1.0),
)
def test_decoded_sum_error_bound(d: int, n: int, levels_bits: int, seed: int, norm: float) -> None:
    """Whenever nothing is clamped the decoded sum is within n * sqrt(padded_dim) / scale of
    the true sum (each rotated coordinate moves by less than one level per client)."""
    enc = HadamardQuantSum(d, CLIP, levels_bits, n, seed % 997)
    rng = np.random.default_rng(seed)
    xs = [rng.normal(0, 1, d) for _ in range(n)]
    xs = [x / max(np.linalg.norm(x), 1e-12) * CLIP * norm for x in xs]
    reach = max(float(np.abs(enc.rotation.rotate(x)).max()) * enc.scale for x in xs)
    total, weight = enc.decode_sum(sum(enc.encode(x, 1, rng) for x in xs), n)
    assert weight == n
    err = float(np.linalg.norm(total - sum(xs)))
    if reach <= enc.half - 0.5:
        assert err <= n * math.sqrt(enc.padded_dim) / enc.scale
    else:  # clamping only shrinks coordinates toward zero: never beyond the inputs' reach
        assert err <= n * (CLIP + math.sqrt(enc.padded_dim) / enc.scale)


def test_scale_puts_three_sigmas_of_a_clip_norm_update_on_the_outermost_level() -> None:
    d, n = 5000, 10
    enc = HadamardQuantSum(d, 10.0, 4, n, 3)
    rng = np.random.default_rng(0)
    # A layer-like layout: one tenth of the coordinates carries half the norm.
    x = rng.normal(0, 1, d) * np.where(np.arange(d) < d // 10, 3.0, 1.0)
    x *= 10.0 / np.linalg.norm(x)
    y = enc.rotation.rotate(x) * enc.scale
    assert np.std(y) == pytest.approx((enc.half - 0.5) / 3, rel=0.05)
    clamped = np.mean(np.abs(y) > enc.half - 0.5)
    assert clamped < 0.01  # ~0.3% at 3 sigma, thanks to the shuffle
    blocky = BlockHadamard(d, 3, enc.block).rotate(x) * enc.scale  # without the shuffle
    assert np.mean(np.abs(blocky) > enc.half - 0.5) > 5 * clamped


def test_block_hadamard_permute_is_orthonormal_and_inverts() -> None:
    rng = np.random.default_rng(4)
    d = 1000
    plain, mixed = BlockHadamard(d, 9, 256), BlockHadamard(d, 9, 256, permute=True)
    np.testing.assert_array_equal(plain.signs, mixed.signs)
    x = rng.normal(size=(3, d))
    y = mixed.rotate(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1))
    np.testing.assert_allclose(mixed.unrotate(y), x, atol=1e-12)
    assert not np.allclose(y, plain.rotate(x))


def test_error_feedback_with_random_k_and_hadamard_keeps_the_invariant() -> None:
    d, n = 300, 4
    enc = random_k(lambda m: HadamardQuantSum(m, 1.0, 2, n, 8, 0, 10), d, 0.5, 6)
    rng = np.random.default_rng(5)
    residual, total_sent, total_delta = np.zeros(d), np.zeros(d), np.zeros(d)
    for _ in range(4):
        delta = rng.normal(0, 0.05, d)
        ints, new_residual = encode_with_feedback(enc, delta, residual, 7, rng)
        total_sent += enc.sent(ints, 7)  # type: ignore[operator]
        total_delta += delta
        residual = new_residual
    np.testing.assert_allclose(total_sent + residual, total_delta, atol=1e-9)


# --- bad input: typed errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"levels_bits": 0},
        {"levels_bits": 17},
        {"num_clients": 1},
        {"clip": 0.0},
        {"clip": math.inf},
        {"clip": math.nan},
        {"block": 3},
        {"rotation_seed": -1},
        {"dim": 0},
        {"weight_cap": -1},
        {"num_clients": 2**60},  # the field would exceed the maximum width
        {"levels_bits": "4"},
        {"bogus": 1},
    ],
)
def test_bad_description_is_an_encoding_error(fields: dict[str, Any]) -> None:
    good = HadamardQuantSum(100, 1.0, 4, 5, 3).to_fields()
    with pytest.raises(EncodingError):
        encoding_from_fields({**good, **fields})


def test_bad_update_or_sum_is_an_encoding_error() -> None:
    enc = HadamardQuantSum(100, 1.0, 4, 5, 3)
    rng = np.random.default_rng()
    for bad in (np.zeros(99), np.full(100, np.nan), np.full(100, np.inf)):
        with pytest.raises(EncodingError):
            enc.encode(bad, 1, rng)
    for bad_sum in (np.zeros(enc.vector_len - 1, dtype=np.int64), np.zeros(enc.vector_len)):
        with pytest.raises(EncodingError):
            enc.decode_sum(bad_sum, 5)


def test_forged_sums_are_outside_the_honest_range() -> None:
    enc = sketched(lambda m: HadamardQuantSum(m, 1.0, 4, 4, 3), 2000, Sketch(0.2), 1)
    inner = enc.inner
    assert isinstance(inner, HadamardQuantSum)
    # Every coordinate at its 4-client maximum: in the field, but far longer than 4 clipped
    # updates can be.
    forged = np.full(enc.vector_len, 4 * (inner.half - 1), dtype=np.int64)
    assert "norm" in outside_honest_range(enc, forged, 4)
    # Beyond what 2 clients' B-bit values reach (the field is sized for 4).
    assert "outside" in outside_honest_range(enc, np.full(enc.vector_len, 20), 2)


# --- spec, config and the CLI ----------------------------------------------------------------


def test_spec_parses_and_a_plain_codec_refuses_it() -> None:
    codec = parse_codec("sketch(0.05)+hadamard(block=512)+q4")
    assert codec.spec == "sketch(0.05)+hadamard(block=512)+q4"
    assert parse_codec(codec.spec) == codec and codec.linear and codec.needs_seed
    assert codec.rotation is not None and codec.rotation.block == 512
    with pytest.raises(CodecError, match="secagg = true"):
        parse_codec("hadamard+q4").encode({"w": np.zeros(10, dtype=np.float32)}, seed=1)
    for bad in (
        "hadamard",
        "hadamard+q17",
        "hadamard+qsgd4",
        "hadamard+sign",
        "hadamard+q4(block=8)",
        "hadamard(block=3)+q4",
        "hadamard(7)+q4",
        "q4+hadamard",
        "hadamard+hadamard+q4",
    ):
        with pytest.raises(CodecSpecError):
            parse_codec(bad)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"codec": "hadamard+q4"}, "needs secagg = true"),
        ({"secagg": True, "codec": "hadamard+q4", "secagg-scale": 100.0}, "no secagg-scale"),
        (
            {"secagg": True, "codec": "hadamard+q4", "dp": "central", "dp-noise-multiplier": 1.0},
            'not with dp = "central"',
        ),
        (
            {
                "secagg": True,
                "codec": "hadamard+q4",
                "dp": "distributed",
                "dp-noise-multiplier": 1.0,
            },
            'not with dp = "distributed"',
        ),
        ({"secagg": True, "codec": "hadamard+q20"}, "1..16"),
    ],
)
def test_config_refuses_what_hadamard_cannot_do(override: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        resolve_config(override)
    for ok in ("hadamard+q4", "sketch(0.05)+hadamard+q2", "randk(0.1)+hadamard+q4+ef"):
        check_secure_config(resolve_config({"secagg": True, "codec": ok}))


def test_cli_refuses_hadamard_on_the_plain_path_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    for codec in ("hadamard+q4", "hadamard+q99"):
        code = main(["simulate", "--set", f"codec={codec}", "--out", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == EXIT_USAGE and len(err.splitlines()) == 1, err
        assert "hadamard" in err.lower() or "q99" in err.lower(), err
        assert not out.exists()


# --- a round in process: SecAgg+ sums the rotated integers, the server inverse-rotates --------


def test_secure_round_with_hadamard_is_plain_fedavg_up_to_rounding() -> None:
    overrides = {"secagg-clip": 5.0, "codec": "hadamard+q12"}
    run = _run(overrides)
    (r,) = run.rounds
    assert r.row["clients"] == 5 and r.row["rejected_updates"] == 0
    d = sum(v.size for v in run.start.values())
    enc = HadamardQuantSum(d, 5.0, 12, 5, 0, 0, 1)
    assert r.row["secagg_bits"] == 12 + 3  # the field actually used: B + ceil(log2 5)
    assert r.row["secagg_vector_len"] == enc.padded_dim + 1  # rotated coordinates + weight
    step = np.concatenate([(run.arrays[k] - run.start[k]).ravel() for k in run.start])
    plain = _plain_fedavg_delta({"secagg-clip": 5.0, "update-norm-factor": 0.0})
    mean = np.concatenate([plain[k].ravel() for k in run.start])
    assert np.linalg.norm(mean) > 0.1
    # The weights go through B-bit levels too: a few percent, not more.
    assert np.linalg.norm(step - mean) <= 0.05 * np.linalg.norm(mean)


@pytest.mark.parametrize(
    ("codec", "wrapper"),
    [
        ("sketch(0.2)+hadamard+q4", SketchSum),
        ("randk(0.3)+hadamard+q4", RandomK),
        ("hadamard+q4", None),
    ],
)
def test_the_run_config_puts_hadamard_inside_sketch_and_random_k(codec: str, wrapper: Any) -> None:
    """The strategy chain a config builds: HadamardQuantSum is the inner integer encoding of
    whichever projection the codec names (no separate path)."""
    cfg = resolve_config(SMALL, {"secagg-clip": 5.0, "codec": codec})
    (secagg,) = [s for s in strategy_chain(build_chain(cfg)) if isinstance(s, SecAggStrategy)]
    enc = secagg._encoding(1000, 5, 3)
    inner = enc if wrapper is None else enc.inner  # type: ignore[attr-defined]
    assert wrapper is None or isinstance(enc, wrapper)
    assert isinstance(inner, HadamardQuantSum) and inner.bits == 4 + 3
    assert inner.weight_cap > 0 and inner.clip == 5.0
    assert inner.rotation_seed == round_seed(0, 3, Stream.ROTATION)  # the round's shared seed
    assert encoding_from_fields(enc.to_fields()) == enc  # what the clients rebuild


def test_secure_sum_core_sums_hadamard_vectors_exactly() -> None:
    """The real SecAgg+ core at the narrow field: the masked sum is the plain sum."""
    enc = HadamardQuantSum(300, 1.0, 2, 4, 11, 0, 3)
    rng = np.random.default_rng(6)
    ints = {c + 1: enc.encode(rng.normal(0, 1, 300), 3, rng) for c in range(4)}
    result = _secure_sum({c: to_field(v, enc.bits) for c, v in ints.items()}, enc.bits)
    np.testing.assert_array_equal(from_field(result.total, enc.bits), sum(ints.values()))


def test_weighted_encodings_of_the_same_inputs_agree_in_expectation() -> None:
    """hadamard's weighted mean matches WeightedSum's (same inputs, many draws)."""
    n, d = 4, 50
    rng = np.random.default_rng(7)
    xs = [rng.normal(0, 0.02, d) for _ in range(n)]
    sizes = [3, 5, 8, 8]
    had = HadamardQuantSum(d, CLIP, 6, n, 2, 0, 8)
    ref = choose_integer_encoding(dim=d, num_clients=n, clip=CLIP, bits=20, weight_cap=8)
    assert isinstance(ref, WeightedSum)
    totals = [
        had.decode_sum(sum(had.encode(x, s, rng) for x, s in zip(xs, sizes, strict=True)), n)[0]
        for _ in range(300)
    ]
    exact = ref.decode_sum(sum(ref.encode(x, s, rng) for x, s in zip(xs, sizes, strict=True)), n)[0]
    one = np.sqrt(np.mean([np.sum((t - exact) ** 2) for t in totals]))
    assert np.linalg.norm(np.mean(totals, axis=0) - exact) <= 3 * one / math.sqrt(300) + 1e-6
