"""Wire format: self-description, typed rejection of bad payloads, and decoder fuzzing."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsqueeze import downlink
from fedsqueeze.compression import (
    FORMAT_VERSION,
    LAYOUT_MODES,
    SUPPORTED_VERSIONS,
    CodecError,
    PayloadError,
    parse_codec,
)
from fedsqueeze.compression._wire import Reader, Writer

SPECS = [
    "none",
    "fp16",
    "bf16",
    "q4",
    "q3(block=8)+zstd",
    "qsgd2",
    "sign(block=16)",
    "topk(0.1)+q4+ef",
    "topk_pt(0.2)+ternary+zlib",
    "randk(0.3)+q8",
    "thresh(0.5)",
    "topk(0.9)",
    "q2+ef21",
]
SHAPES = {"layer.0/weight": (6, 7), "bias": (5,), "scalar": (), "empty": (0, 2)}
EXPECTED = {n: (s, "float32") for n, s in SHAPES.items()}
SEED = 11


def update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def recrc(body: bytes) -> bytes:
    """Replace the trailing CRC so a mutation reaches the parser behind the checksum."""
    return body[:-4] + struct.pack("<I", zlib.crc32(body[:-4]))


PAYLOADS = {spec: parse_codec(spec).encode(update(), seed=SEED).payload for spec in SPECS}
HASH_PAYLOADS = {
    spec: parse_codec(spec).encode(update(), seed=SEED, layout="hash").payload for spec in SPECS
}


def assert_rejected_or_valid(spec: str, data: bytes, expected: dict | None = EXPECTED) -> None:
    codec = parse_codec(spec)
    try:
        out = codec.decode(data, seed=SEED, expected=expected)
    except PayloadError:
        return
    for value in out.arrays.values():
        assert value.dtype == np.float32
        assert np.all(np.isfinite(value))


@pytest.mark.parametrize("spec", SPECS)
def test_payload_is_self_describing(spec: str) -> None:
    payload = PAYLOADS[spec]
    assert payload[:4] == b"FSQZ" and payload[4] == FORMAT_VERSION
    canonical = parse_codec(spec).spec.encode()
    assert canonical in payload[:64]
    for name in SHAPES:
        assert name.encode() in payload
    out = parse_codec(spec).decode(payload, seed=SEED, expected=EXPECTED).arrays
    assert list(out) == list(SHAPES)
    assert all(out[n].shape == s and out[n].dtype == np.float32 for n, s in SHAPES.items())


def test_wrong_spec_version_magic_and_checksum() -> None:
    payload = PAYLOADS["q4"]
    with pytest.raises(PayloadError, match="encoded with codec 'q4'"):
        parse_codec("q8").decode(payload)
    with pytest.raises(PayloadError, match="version"):
        parse_codec("q4").decode(payload[:4] + bytes([FORMAT_VERSION + 1]) + payload[5:])
    with pytest.raises(PayloadError, match="magic"):
        parse_codec("q4").decode(b"XXXX" + payload[4:])
    corrupted = bytearray(payload)
    corrupted[len(payload) // 2] ^= 0x40
    with pytest.raises(PayloadError, match="checksum"):
        parse_codec("q4").decode(bytes(corrupted))
    with pytest.raises(PayloadError):
        parse_codec("q4").decode(payload[:-1])
    with pytest.raises(PayloadError):
        parse_codec("q4").decode("not bytes")  # type: ignore[arg-type]


def test_expected_shapes_are_enforced() -> None:
    codec = parse_codec("none")
    payload = PAYLOADS["none"]
    with pytest.raises(PayloadError, match="expected"):
        codec.decode(payload, expected={**EXPECTED, "bias": ((6,), "float32")})
    with pytest.raises(PayloadError, match="missing"):
        codec.decode(payload, expected={**EXPECTED, "extra": ((1,), "float32")})
    with pytest.raises(PayloadError, match="expected"):
        codec.decode(payload, expected={**EXPECTED, "bias": ((5,), "float64")})
    # the same shapes in another order are accepted
    reordered = dict(reversed(list(EXPECTED.items())))
    assert list(codec.decode(payload, expected=reordered).arrays) == list(SHAPES)


def varint(value: int) -> bytes:
    w = Writer()
    w.varint(value)
    return w.getvalue()


def test_forged_values_and_lengths() -> None:
    codec = parse_codec("none")
    payload = codec.encode({"w": np.ones(4, np.float32)}).payload
    nan = struct.pack("<f", float("nan"))
    forged = recrc(payload[:-8] + nan + payload[-4:])
    with pytest.raises(PayloadError, match="non-finite"):
        codec.decode(forged)
    # a huge declared shape is refused before anything is allocated
    dims_at = payload.index(b"w") + 1 + 2  # name, dtype code, ndim; the dim 4 is one byte
    huge = payload[:dims_at] + varint(1 << 60) + payload[dims_at + 1 :]
    with pytest.raises(PayloadError, match="max_elements"):
        codec.decode(recrc(huge))
    with pytest.raises(PayloadError, match="impossible"):
        codec.decode(recrc(huge), expected={"w": ((4,), "float32")})
    # a zero-size tensor whose other dimension numpy could not represent
    empty = payload[: dims_at - 1] + b"\x02" + varint(0) + varint(1 << 62) + payload[dims_at + 1 :]
    with pytest.raises(PayloadError, match="max_elements"):
        codec.decode(recrc(empty))
    # within the cap but not backed by bytes
    big = payload[:dims_at] + varint(1 << 27) + payload[dims_at + 1 :]
    with pytest.raises(PayloadError):
        codec.decode(recrc(big))
    # a dimension written as a non-canonical (overlong) varint
    overlong = payload[:dims_at] + b"\x84\x00" + payload[dims_at + 1 :]
    with pytest.raises(PayloadError, match="varint"):
        codec.decode(recrc(overlong))
    # a sparse codec claiming (almost) all positions of a big tensor without the bytes
    sparse = parse_codec("thresh(0.0)")
    p = sparse.encode({"w": np.ones(4, np.float32)}).payload
    dims_at = p.index(b"w") + 3
    p = p[:dims_at] + varint(1 << 27) + p[dims_at + 1 :]
    with pytest.raises(PayloadError):
        sparse.decode(recrc(p))


def test_decompression_bomb_is_bounded() -> None:
    codec = parse_codec("q8+zstd")
    payload = codec.encode({"w": np.zeros(1000, np.float32)}).payload
    # declare a body far longer than 1000 values can need
    body_len_at = payload.index(b"w") + 3 + len(varint(1000))
    r = Reader(payload[body_len_at:])
    old_len = len(varint(r.varint()))
    forged = payload[:body_len_at] + varint(10**9) + payload[body_len_at + old_len :]
    with pytest.raises(PayloadError, match="impossible"):
        codec.decode(recrc(forged))


def test_ef21_server_state_mismatch() -> None:
    codec = parse_codec("q2+ef21")
    with pytest.raises(PayloadError, match="server state"):
        codec.decode(PAYLOADS["q2+ef21"], state={"ef21.g": np.zeros(3, np.float32)})


def test_decode_needs_the_seed_for_random_k() -> None:
    with pytest.raises(CodecError, match="seed"):
        parse_codec("randk(0.3)+q8").decode(PAYLOADS["randk(0.3)+q8"])


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(SPECS), st.sampled_from(SUPPORTED_VERSIONS))
def test_fuzz_random_bytes(data: bytes, spec: str, version: int) -> None:
    with pytest.raises(PayloadError):
        parse_codec(spec).decode(data, seed=SEED)
    # with the magic, version and a valid checksum the parser itself is exercised
    forged = recrc(b"FSQZ" + bytes([version]) + data + b"\0\0\0\0")
    assert_rejected_or_valid(spec, forged, expected=None)
    assert_rejected_or_valid(spec, forged)
    if version == 2:
        # flags = layout digest, then the codec's own spec: reaches the digest check
        raw_spec = parse_codec(spec).spec.encode()
        head = b"FSQZ\x02\x01" + varint(len(raw_spec)) + raw_spec
        assert_rejected_or_valid(spec, recrc(head + data + b"\0\0\0\0"))


@FUZZ
@given(st.sampled_from(SPECS), st.sampled_from(LAYOUT_MODES), st.data())
def test_fuzz_mutated_payloads(spec: str, mode: str, data: st.DataObject) -> None:
    original = (HASH_PAYLOADS if mode == "hash" else PAYLOADS)[spec]
    payload = bytearray(original)
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(payload) - 1))
            payload[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        del payload[data.draw(st.integers(0, len(payload) - 1)) :]
    elif kind == "insert":
        i = data.draw(st.integers(0, len(payload)))
        payload[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        i = data.draw(st.integers(0, len(payload) - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=8))
        payload[i : i + len(chunk)] = chunk
    mutated = bytes(payload)
    if mutated != original:
        with pytest.raises(PayloadError):
            parse_codec(spec).decode(mutated, seed=SEED, expected=EXPECTED)
    # and behind a recomputed checksum: rejected with PayloadError, or decoded finitely
    if len(mutated) >= 4:
        assert_rejected_or_valid(spec, recrc(mutated))
        assert_rejected_or_valid(spec, recrc(mutated), expected=None)


# ---------------------------------------------------------------- compact layout (digest)


@pytest.mark.parametrize("spec", SPECS)
def test_layout_hash_round_trip(spec: str) -> None:
    codec = parse_codec(spec)
    full = codec.encode(update(), seed=SEED, rng=np.random.default_rng(5))
    compact = codec.encode(update(), seed=SEED, rng=np.random.default_rng(5), layout="hash")
    # same body and client state, only the layout section differs
    assert compact.payload[4] == FORMAT_VERSION and compact.payload[5] == 1
    assert len(compact.payload) < len(full.payload)
    assert compact.state.keys() == full.state.keys()
    for key in full.state:
        np.testing.assert_array_equal(compact.state[key], full.state[key])
    a = codec.decode(full.payload, seed=SEED, expected=EXPECTED).arrays
    b = codec.decode(compact.payload, seed=SEED, expected=EXPECTED).arrays
    assert list(b) == list(SHAPES)
    for name, shape in SHAPES.items():
        assert b[name].shape == shape and b[name].dtype == np.float32
        np.testing.assert_array_equal(a[name], b[name])


def test_layout_hash_costs_a_fixed_eight_bytes() -> None:
    names = [f"block{i}.conv.weight" for i in range(10)]
    arrays = {n: np.ones((8, 4, 3), np.float32) for n in names}
    codec = parse_codec("topk(0.05)+q4+ef")
    full = len(codec.encode(arrays, layout="full").payload)
    compact = codec.encode(arrays, layout="hash").payload
    table = sum(1 + len(n) + 1 + 1 + 3 for n in names) + 1  # varint counts and dims
    assert full - len(compact) == table - 8
    spec = codec.spec.encode()
    assert compact[: 7 + len(spec)] == b"FSQZ\x02\x01" + bytes([len(spec)]) + spec


@pytest.mark.parametrize(
    "change",
    ["renamed", "reshaped", "reordered", "dtype", "dropped", "added"],
)
def test_layout_digest_mismatch_is_rejected(change: str) -> None:
    items = list(EXPECTED.items())
    wrong: dict[str, tuple[tuple[int, ...], str]]
    if change == "renamed":
        wrong = {("bias2" if n == "bias" else n): v for n, v in items}
    elif change == "reshaped":
        wrong = {**EXPECTED, "layer.0/weight": ((7, 6), "float32")}
    elif change == "reordered":
        wrong = dict([items[1], items[0], *items[2:]])
    elif change == "dtype":
        wrong = {**EXPECTED, "bias": ((5,), "float64")}
    elif change == "dropped":
        wrong = dict(items[:-1])
    else:
        wrong = {**EXPECTED, "extra": ((1,), "float32")}
    for spec in ("none", "topk(0.1)+q4+ef", "q2+ef21"):
        with pytest.raises(PayloadError, match="digest does not match"):
            parse_codec(spec).decode(HASH_PAYLOADS[spec], seed=SEED, expected=wrong)


def test_layout_hash_needs_expected() -> None:
    with pytest.raises(PayloadError, match="expected="):
        parse_codec("topk(0.1)+q4+ef").decode(HASH_PAYLOADS["topk(0.1)+q4+ef"])
    with pytest.raises(CodecError, match="bad expected entry"):
        parse_codec("none").decode(HASH_PAYLOADS["none"], expected={"bias": "float32"})
    with pytest.raises(CodecError, match="bad expected entry"):
        parse_codec("none").decode(HASH_PAYLOADS["none"], expected={"bias": ((5,), "int32")})


def test_layout_mode_is_validated() -> None:
    with pytest.raises(CodecError, match="layout must be one of"):
        parse_codec("q4").encode(update(), layout="table")


def test_unknown_flags_are_rejected() -> None:
    payload = bytearray(PAYLOADS["q4"])
    payload[5] |= 0x80
    with pytest.raises(PayloadError, match="flags"):
        parse_codec("q4").decode(recrc(bytes(payload)))


# Written by format version 1 (fixed-width table): {"layer/w": arange(6)/4 as (2, 3),
# "b": [1, -2, 3]}, codec "none", then codec "topk(0.5)+q4+zlib".
V1_NONE = bytes.fromhex(
    "4653515a0104006e6f6e650200000007006c617965722f7702020200000000000000030000000000000001"
    "0062020103000000000000002400000000000000000000000000803e0000003f0000403f0000803f0000a0"
    "3f0000803f000000c000004040e679d429"
)
V1_TOPK = bytes.fromhex(
    "4653515a011100746f706b28302e35292b71342b7a6c69620200000007006c617965722f77020202000000"
    "00000000030000000000000001006202010300000000000000260000000000000078"
    "9c636180012628fd80918161813d04331c6060707098f00100337f056665dd761e"
)


def test_version_1_payloads_still_decode() -> None:
    assert 1 in SUPPORTED_VERSIONS
    out = parse_codec("none").decode(V1_NONE).arrays
    assert list(out) == ["layer/w", "b"]
    np.testing.assert_array_equal(out["layer/w"], np.arange(6, dtype=np.float32).reshape(2, 3) / 4)
    np.testing.assert_array_equal(out["b"], np.array([1, -2, 3], np.float32))
    expected = {"layer/w": ((2, 3), "float32"), "b": ((3,), "float32")}
    out = parse_codec("topk(0.5)+q4+zlib").decode(V1_TOPK, expected=expected).arrays
    np.testing.assert_array_equal(out["b"], np.array([1, -2, 3], np.float32))
    assert np.count_nonzero(out["layer/w"]) == 1
    with pytest.raises(PayloadError, match="tensor 'b'"):
        parse_codec("none").decode(V1_NONE, expected={**expected, "b": ((4,), "float32")})
    with pytest.raises(PayloadError, match="checksum"):
        parse_codec("none").decode(V1_NONE[:-5] + V1_NONE[-4:])


@given(st.integers(0, (1 << 64) - 1))
def test_varint_round_trip(value: int) -> None:
    data = varint(value)
    assert len(data) == max(1, -(-value.bit_length() // 7))
    r = Reader(data)
    assert r.varint() == value
    r.expect_end()


def test_bad_varints_are_rejected() -> None:
    for data in (b"\x80", b"\x80\x00", b"\xff" * 10 + b"\x01", b"\xff" * 9 + b"\x02"):
        with pytest.raises(PayloadError):
            Reader(data).varint()


def test_downlink_delta_carries_only_the_digest() -> None:
    codec = parse_codec("q8")
    model = update(1)
    base = update(2)
    full = downlink.encode(codec, model, seed=SEED)
    delta = downlink.encode(codec, model, seed=SEED, base=base)
    assert full[5] == 0 and delta[5] == 1
    rebuilt = downlink.reconstruct(codec, delta, SEED, base)
    assert list(rebuilt) == list(SHAPES)
    for name in SHAPES:
        assert np.allclose(rebuilt[name], model[name], atol=0.1)
    renamed = {("b2" if n == "bias" else n): v for n, v in base.items()}
    with pytest.raises(PayloadError, match="digest"):
        downlink.reconstruct(codec, delta, SEED, renamed)
