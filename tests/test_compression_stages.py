"""Lossy stages, error feedback, shared randomness, properties and spec parsing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.compression import (
    EF21,
    QSGD,
    VALID_STAGES,
    BFloat16,
    Codec,
    CodecError,
    CodecSpecError,
    ErrorFeedback,
    Float16,
    Quantize,
    RandomK,
    Sign,
    Stage,
    Ternary,
    Threshold,
    TopK,
    TopKPerTensor,
    Zlib,
    Zstd,
    parse_codec,
    random_k_indices,
    stochastic_round,
)

SETTINGS = settings(max_examples=40, deadline=None)


def gaussian_update(seed: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def flat(update: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.zeros(0, np.float32), *(a.reshape(-1) for a in update.values())])


# ------------------------------------------------------------------ shared randomness


def test_stochastic_round_is_unbiased_and_adjacent() -> None:
    rng = np.random.default_rng(0)
    x = np.array([-2.75, -0.5, 0.0, 0.1, 3.9, 7.0], dtype=np.float64)
    draws = np.stack([stochastic_round(x, rng) for _ in range(4000)])
    assert draws.dtype == np.int64
    assert np.all((draws == np.floor(x)) | (draws == np.ceil(x)))
    frac = x - np.floor(x)
    sigma = np.sqrt(frac * (1 - frac) / draws.shape[0])
    assert np.all(np.abs(draws.mean(axis=0) - x) <= 5 * sigma + 1e-12)


@SETTINGS
@given(st.integers(0, 5000), st.data())
def test_random_k_indices_valid_and_deterministic(d: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, d))
    seed = data.draw(st.integers(0, 2**63))
    a = random_k_indices(d, k, seed)
    assert a.dtype == np.int64 and a.size == k
    assert np.all(np.diff(a) > 0)
    assert k == 0 or (a[0] >= 0 and a[-1] < d)
    np.testing.assert_array_equal(a, random_k_indices(d, k, seed))


def test_random_k_indices_uniform_and_seed_dependent() -> None:
    d, k, trials = 20, 6, 3000
    counts = np.zeros(d)
    for seed in range(trials):
        counts[random_k_indices(d, k, seed)] += 1
    p = k / d
    sigma = np.sqrt(trials * p * (1 - p))
    assert np.all(np.abs(counts - trials * p) < 5 * sigma)
    assert not np.array_equal(random_k_indices(10_000, 50, 1), random_k_indices(10_000, 50, 2))
    # more than half kept takes the complement path; must still be a valid k-subset
    big = random_k_indices(1000, 900, 3)
    assert big.size == 900 and np.unique(big).size == 900


def test_random_k_indices_rejects_bad_arguments() -> None:
    with pytest.raises(CodecError):
        random_k_indices(5, 6, 0)
    with pytest.raises(CodecError):
        random_k_indices(5, 2, -1)


# ------------------------------------------------------------------------ quantizers


@pytest.mark.parametrize(
    ("spec", "levels"),
    [("q2", 3), ("q3(block=4)", 7), ("qsgd2", 3), ("qsgd3(block=5)", 7), ("q1", 1)],
)
def test_stochastic_quantizers_are_unbiased(spec: str, levels: int) -> None:
    update = gaussian_update(1, {"a": (3, 4), "b": (9,)})
    x = flat(update)
    codec = parse_codec(spec)
    rng = np.random.default_rng(2)
    n = 3000
    total = np.zeros_like(x, dtype=np.float64)
    for _ in range(n):
        total += flat(codec.decode(codec.encode(update, rng=rng).payload).arrays)
    mean = total / n
    # Conservative per-coordinate bound of the rounding noise: half the widest step.
    spread = np.linalg.norm(x) if spec.startswith("qsgd") else x.max() - x.min()
    step = spread / levels
    sigma = step / 2 / np.sqrt(n)
    assert np.all(np.abs(mean - x) <= 5 * sigma + 1e-5)


def test_quantized_values_lie_on_the_grid() -> None:
    update = gaussian_update(3, {"w": (50,)})
    x = update["w"]
    out = parse_codec("q3").decode(parse_codec("q3").encode(update).payload).arrays["w"]
    step = (x.max() - x.min()) / 7
    j = (out - x.min()) / step
    np.testing.assert_allclose(j, np.round(j), atol=1e-4)
    assert out.min() >= x.min() - 1e-6 and out.max() <= x.max() + 1e-6
    # and each value is rounded to one of its two neighbouring levels
    assert np.all(np.abs(out - x) <= step * (1 + 1e-4))


def test_sign_and_ternary_values() -> None:
    update = gaussian_update(4, {"a": (20,), "b": (10,)})
    out = parse_codec("sign").decode(parse_codec("sign").encode(update).payload).arrays
    for name, x in update.items():
        np.testing.assert_allclose(out[name], np.where(x < 0, -1, 1) * np.abs(x).mean(), rtol=1e-6)
    codec = parse_codec("topk(8)+ternary")
    out = codec.decode(codec.encode(update).payload).arrays
    x, y = flat(update), flat(out)
    kept = np.argsort(-np.abs(x))[:8]
    mu = np.abs(x[kept]).mean()
    expected = np.zeros_like(x)
    expected[kept] = np.sign(x[kept]) * mu
    np.testing.assert_allclose(y, expected, rtol=1e-6)


def test_half_precision_casts() -> None:
    update = gaussian_update(5, {"w": (1000,)})
    x = update["w"] * 100
    y = parse_codec("fp16").decode(parse_codec("fp16").encode({"w": x}).payload).arrays["w"]
    np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
    z = parse_codec("bf16").decode(parse_codec("bf16").encode({"w": x}).payload).arrays["w"]
    assert np.all(z.view(np.uint32) & 0xFFFF == 0)  # a bfloat16 value
    assert np.all(np.abs(z - x) <= np.abs(x) * 2.0**-8)  # rounded to nearest (half ulp)
    with pytest.raises(CodecError, match="float16"):
        parse_codec("fp16").encode({"w": np.array([1e5], np.float32)})


# ----------------------------------------------------------------------- sparsifiers


def distinct_vectors(n_max: int = 200) -> st.SearchStrategy[np.ndarray]:
    return st.lists(
        st.integers(-(10**6), 10**6).filter(lambda v: v != 0),
        min_size=1,
        max_size=n_max,
        unique_by=abs,
    ).map(lambda v: np.array(v, dtype=np.float32) / 1000)


@SETTINGS
@given(distinct_vectors(), st.one_of(st.integers(1, 300), st.floats(0.001, 1.0)))
def test_topk_keeps_exactly_the_k_largest(x: np.ndarray, amount: float | int) -> None:
    split = x.size // 2
    update = {"a": x[:split], "b": x[split:].reshape(1, -1)}
    codec = Codec([TopK(amount)])
    y = flat(codec.decode(codec.encode(update).payload).arrays)
    kept = y != 0
    k = (
        min(amount, x.size)
        if isinstance(amount, int)
        else min(x.size, max(1, round(amount * x.size)))
    )
    assert kept.sum() == k
    np.testing.assert_array_equal(y[kept], x[kept])
    if k < x.size:
        assert np.abs(x[kept]).min() > np.abs(x[~kept]).max()


@SETTINGS
@given(distinct_vectors(), distinct_vectors(), st.floats(0.01, 1.0))
def test_topk_per_tensor(a: np.ndarray, b: np.ndarray, frac: float) -> None:
    update = {"a": a, "b": b}
    codec = Codec([TopKPerTensor(frac)])
    out = codec.decode(codec.encode(update).payload).arrays
    for name, x in update.items():
        kept = out[name] != 0
        assert kept.sum() == min(x.size, max(1, round(frac * x.size)))
        if not kept.all():
            assert np.abs(x[kept]).min() > np.abs(x[~kept]).max()


def test_threshold() -> None:
    update = gaussian_update(6, {"w": (500,)})
    codec = parse_codec("thresh(1.5)")
    y = codec.decode(codec.encode(update).payload).arrays["w"]
    x = update["w"]
    np.testing.assert_array_equal(y, np.where(np.abs(x) >= 1.5, x, 0))


def test_random_k_uses_shared_positions_and_sends_no_indices() -> None:
    shapes = {"a": (40, 25), "b": (1000,)}
    client1, client2 = gaussian_update(7, shapes), gaussian_update(8, shapes)
    codec = parse_codec("randk(0.05)")
    seed = 1234
    p1 = codec.encode(client1, seed=seed).payload
    p2 = codec.encode(client2, seed=seed).payload
    y1 = flat(codec.decode(p1, seed=seed).arrays)
    y2 = flat(codec.decode(p2, seed=seed).arrays)
    expected_positions = random_k_indices(2000, 100, seed)
    np.testing.assert_array_equal(np.flatnonzero(y1), expected_positions)
    np.testing.assert_array_equal(np.flatnonzero(y2), expected_positions)
    np.testing.assert_array_equal(y1[expected_positions], flat(client1)[expected_positions])
    # another round seed moves the positions
    y3 = flat(codec.decode(codec.encode(client1, seed=seed + 1).payload, seed=seed + 1).arrays)
    assert not np.array_equal(np.flatnonzero(y3), expected_positions)
    # no index bytes: only the 100 float32 values plus the fixed header differ from 'none'
    header = len(parse_codec("none").encode({k: v[:0] for k, v in client1.items()}).payload)
    assert len(p1) <= header + 4 * 100 + 16
    assert len(p1) < len(parse_codec("topk(0.05)").encode(client1).payload)
    with pytest.raises(CodecError, match="seed"):
        codec.encode(client1)


# -------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("spec", ["topk(0.05)+q2+ef", "ef+sign", "randk(0.1)+ef+zstd", "q1+ef"])
def test_error_feedback_invariant(spec: str) -> None:
    codec = parse_codec(spec)
    shapes = {"a": (10, 10), "b": (50,)}
    state = None
    sum_true = np.zeros(150, np.float64)
    sum_sent = np.zeros(150, np.float64)
    for rnd in range(8):
        update = gaussian_update(100 + rnd, shapes)
        enc = codec.encode(update, seed=rnd, state=state)
        state = enc.state
        assert set(state) == {"ef.residual"}
        sum_true += flat(update)
        sum_sent += flat(codec.decode(enc.payload, seed=rnd).arrays)
    np.testing.assert_allclose(sum_sent + state["ef.residual"], sum_true, atol=1e-4)
    # the residual is not trivially zero: the chain is lossy
    assert np.abs(state["ef.residual"]).max() > 1e-3


def test_ef21_client_and_server_states_stay_identical() -> None:
    codec = parse_codec("topk(0.2)+q4+ef21")
    assert codec.stateful_client and codec.stateful_server
    shapes = {"a": (8, 8), "b": (36,)}
    client_state = server_state = None
    target = gaussian_update(9, shapes)
    errors = []
    for rnd in range(12):
        update = {k: v + 0.01 * rnd for k, v in target.items()}
        enc = codec.encode(update, state=client_state)
        dec = codec.decode(enc.payload, state=server_state)
        client_state, server_state = enc.state, dec.state
        np.testing.assert_array_equal(client_state["ef21.g"], server_state["ef21.g"])
        np.testing.assert_array_equal(flat(dec.arrays), server_state["ef21.g"])
        errors.append(np.linalg.norm(flat(dec.arrays) - flat(update)))
    # g tracks a slowly moving update: the estimate error shrinks
    assert errors[-1] < 0.5 * errors[0]


def test_bad_state_is_rejected() -> None:
    codec = parse_codec("q4+ef")
    update = gaussian_update(0, {"a": (5,)})
    with pytest.raises(CodecError, match="state"):
        codec.encode(update, state={"ef.residual": np.zeros(6, np.float32)})
    with pytest.raises(CodecError, match="lacks"):
        codec.encode(update, state={"other": np.zeros(5, np.float32)})


# ------------------------------------------------------------------ properties, specs


@pytest.mark.parametrize(
    ("spec", "linear", "integer", "bits", "seed", "client", "server"),
    [
        ("none", True, False, 32, False, False, False),
        ("randk(0.1)+ef", True, False, 32, True, True, False),
        ("topk(0.01)+q4+ef", False, True, 4, False, True, False),
        ("qsgd3", False, True, 4, False, False, False),
        ("sign+ef21", False, True, 1, False, True, True),
        ("bf16+zstd", False, False, 16, False, False, False),
    ],
)
def test_declared_properties(
    spec: str, linear: bool, integer: bool, bits: int, seed: bool, client: bool, server: bool
) -> None:
    c = parse_codec(spec)
    got = (c.linear, c.integer_output, c.bits, c.needs_seed, c.stateful_client, c.stateful_server)
    assert got == (linear, integer, bits, seed, client, server)


sparsifiers = st.one_of(
    st.none(),
    st.builds(TopK, st.one_of(st.integers(1, 10**6), st.floats(1e-6, 1.0))),
    st.builds(TopKPerTensor, st.floats(1e-6, 1.0)),
    st.builds(RandomK, st.integers(1, 10**6)),
    st.builds(Threshold, st.floats(0, 1e6)),
)
blocks = st.one_of(st.none(), st.integers(1, 4096))
quantizers = st.one_of(
    st.none(),
    st.builds(Quantize, st.integers(1, 16), blocks),
    st.builds(QSGD, st.integers(1, 16), blocks),
    st.builds(Sign, blocks),
    st.builds(Float16),
    st.builds(BFloat16),
)
feedbacks = st.sampled_from([None, ErrorFeedback(), EF21()])
lossless = st.one_of(st.none(), st.builds(Zstd, st.integers(1, 22)), st.builds(Zlib))


@SETTINGS
@given(sparsifiers, quantizers, feedbacks, lossless, st.integers(0, 3))
def test_canonical_spec_round_trips(
    sp: Stage | None, qu: Stage | None, fb: Stage | None, ll: Stage | None, fb_pos: int
) -> None:
    chain = [s for s in (sp, qu, ll) if s is not None]
    if fb is not None:
        chain.insert(min(fb_pos, len(chain)), fb)
    codec = Codec(chain)
    again = parse_codec(codec.spec)
    assert again.spec == codec.spec
    assert again == codec
    # the spec tolerates spaces and upper case
    assert parse_codec(codec.spec.upper().replace("+", " + ")).spec == codec.spec
    # equivalent codecs: a payload of one decodes with the other
    update = gaussian_update(0, {"a": (7,), "b": (3,)})
    payload = codec.encode(update, seed=3).payload
    assert again.decode(payload, seed=3).arrays.keys() == update.keys()


def test_python_objects_and_spec_agree() -> None:
    codec = Codec([TopK(0.01), Quantize(4), ErrorFeedback()])
    assert codec.spec == "topk(0.01)+q4+ef"
    assert codec == parse_codec("ef + topk(0.01) + q4")
    assert parse_codec("q4(block=256)").spec == "q4(block=256)"
    assert parse_codec("topk(100)").spec == "topk(100)"
    assert parse_codec("topk(1.0)").spec == "topk(1.0)"
    assert parse_codec("fp32").spec == "none"
    assert parse_codec("zstd(3)").spec == "zstd"
    assert Codec([TopK(5), Ternary()]).spec == "topk(5)+ternary"
    with pytest.raises(CodecSpecError, match="out of order"):
        Codec([Ternary(), TopK(5)])
    with pytest.raises(CodecSpecError, match="not a codec stage"):
        Codec(["q4"])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("topq(3)", "valid stages"),
        ("q4+foo", "valid stages"),
        ("", "valid stages"),
        ("q4++ef", "valid stages"),
        ("q0", "1..16"),
        ("q17", "1..16"),
        ("qsgd0", "1..16"),
        ("q4(block=0)", "block"),
        ("q4(block=2.5)", "integer"),
        ("q4(bits=3)", "block"),
        ("topk(0)", ">= 1"),
        ("topk(1.5)", "(0, 1]"),
        ("topk(-0.1)", "(0, 1]"),
        ("topk(abc)", "not a number"),
        ("topk", "exactly one"),
        ("topk(0.1,0.2)", "exactly one"),
        ("thresh(-1)", ">= 0"),
        ("thresh(nan)", "finite"),
        ("sign(3)", "block"),
        ("ef(1)", "no arguments"),
        ("zstd(30)", "1..22"),
        ("topk(0.1)+randk(0.1)", "two sparsify"),
        ("q4+q8", "two quantize"),
        ("ef+ef21", "two feedback"),
        ("q4+topk(0.1)", "out of order"),
        ("zstd+q4", "out of order"),
        ("ternary", "sparsifier"),
        ("none+zstd", "alone"),
        ("q4(", "cannot parse"),
    ],
)
def test_bad_specs_raise_codec_spec_error(spec: str, message: str) -> None:
    with pytest.raises(CodecSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_codec(spec)


def test_spec_error_lists_valid_stages_and_is_a_value_error() -> None:
    with pytest.raises(ValueError) as info:
        parse_codec("gzip")
    assert isinstance(info.value, CodecSpecError) and isinstance(info.value, CodecError)
    assert VALID_STAGES in str(info.value)
    for stage in ("topk", "randk", "thresh", "qsgd", "ternary", "bf16", "ef21", "zlib"):
        assert stage in str(info.value)


def test_non_finite_input_is_rejected() -> None:
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(CodecError, match="non-finite"):
            parse_codec("q4").encode({"w": np.array([1.0, bad], np.float32)})
    with pytest.raises(CodecError, match="dtype"):
        parse_codec("none").encode({"w": np.arange(3)})
