"""Wire format: self-description, typed rejection of bad payloads, and decoder fuzzing."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsqueeze.compression import (
    FORMAT_VERSION,
    CodecError,
    PayloadError,
    parse_codec,
)

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


def test_forged_values_and_lengths() -> None:
    codec = parse_codec("none")
    payload = codec.encode({"w": np.ones(4, np.float32)}).payload
    nan = struct.pack("<f", float("nan"))
    forged = recrc(payload[:-8] + nan + payload[-4:])
    with pytest.raises(PayloadError, match="non-finite"):
        codec.decode(forged)
    # a huge declared shape is refused before anything is allocated
    dims_at = payload.index(b"w") + 1 + 2  # name, dtype code, ndim
    huge = payload[:dims_at] + struct.pack("<Q", 1 << 60) + payload[dims_at + 8 :]
    with pytest.raises(PayloadError, match="max_elements"):
        codec.decode(recrc(huge))
    with pytest.raises(PayloadError, match="impossible"):
        codec.decode(recrc(huge), expected={"w": ((4,), "float32")})
    # a zero-size tensor whose other dimension numpy could not represent
    empty = (
        payload[: dims_at - 1] + b"\x02" + struct.pack("<QQ", 0, 1 << 62) + payload[dims_at + 8 :]
    )
    with pytest.raises(PayloadError, match="max_elements"):
        codec.decode(recrc(empty))
    # within the cap but not backed by bytes
    big = payload[:dims_at] + struct.pack("<Q", 1 << 27) + payload[dims_at + 8 :]
    with pytest.raises(PayloadError):
        codec.decode(recrc(big))
    # a sparse codec claiming (almost) all positions of a big tensor without the bytes
    sparse = parse_codec("thresh(0.0)")
    p = sparse.encode({"w": np.ones(4, np.float32)}).payload
    dims_at = p.index(b"w") + 3
    p = p[:dims_at] + struct.pack("<Q", 1 << 27) + p[dims_at + 8 :]
    with pytest.raises(PayloadError):
        sparse.decode(recrc(p))


def test_decompression_bomb_is_bounded() -> None:
    codec = parse_codec("q8+zstd")
    payload = codec.encode({"w": np.zeros(1000, np.float32)}).payload
    # declare a body far longer than 1000 values can need
    body_len_at = payload.index(b"w") + 3 + 8
    forged = payload[:body_len_at] + struct.pack("<Q", 10**9) + payload[body_len_at + 8 :]
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
@given(st.binary(max_size=300), st.sampled_from(SPECS))
def test_fuzz_random_bytes(data: bytes, spec: str) -> None:
    with pytest.raises(PayloadError):
        parse_codec(spec).decode(data, seed=SEED)
    # with the magic, version and a valid checksum the parser itself is exercised
    forged = recrc(b"FSQZ" + bytes([FORMAT_VERSION]) + data + b"\0\0\0\0")
    assert_rejected_or_valid(spec, forged, expected=None)


@FUZZ
@given(st.sampled_from(SPECS), st.data())
def test_fuzz_mutated_payloads(spec: str, data: st.DataObject) -> None:
    payload = bytearray(PAYLOADS[spec])
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
    if mutated != PAYLOADS[spec]:
        with pytest.raises(PayloadError):
            parse_codec(spec).decode(mutated, seed=SEED, expected=EXPECTED)
    # and behind a recomputed checksum: rejected with PayloadError, or decoded finitely
    if len(mutated) >= 4:
        assert_rejected_or_valid(spec, recrc(mutated))
        assert_rejected_or_valid(spec, recrc(mutated), expected=None)
