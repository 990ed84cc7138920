"""Exact round trips of the lossless parts: bit-packing, index coding, none/fp32, zstd/zlib."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedsqueeze.compression import (
    CodecError,
    decode_positions,
    encode_positions,
    log2_binomial,
    pack_bits,
    packed_size,
    parse_codec,
    random_k_indices,
    unpack_bits,
)
from fedsqueeze.compression._wire import Reader

SETTINGS = settings(max_examples=60, deadline=None)


def reference_pack(values: list[int], bits: int) -> bytes:
    """Independent reference: one big integer, value i at bit offset i*bits, LSB first."""
    acc = 0
    for i, v in enumerate(values):
        acc |= v << (i * bits)
    return acc.to_bytes(packed_size(len(values), bits), "little")


@SETTINGS
@given(st.data(), st.integers(1, 64))
def test_bitpack_matches_reference_and_round_trips(data: st.DataObject, bits: int) -> None:
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=40))
    arr = np.array(values, dtype=np.uint64)
    packed = pack_bits(arr, bits)
    assert packed == reference_pack(values, bits)
    out = unpack_bits(packed, bits, len(values))
    assert out.dtype == np.uint64
    assert out.tolist() == values


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 11, 16, 17, 31, 33, 63, 64])
def test_bitpack_large_chunked(bits: int) -> None:
    # Longer than one internal chunk, length not a multiple of 8.
    rng = np.random.default_rng(bits)
    n = (1 << 18) + 13
    hi = np.iinfo(np.uint64).max if bits == 64 else (1 << bits) - 1
    values = rng.integers(0, hi, size=n, dtype=np.uint64, endpoint=True)
    packed = pack_bits(values, bits)
    assert len(packed) == packed_size(n, bits)
    np.testing.assert_array_equal(unpack_bits(packed, bits, n), values)


def test_bitpack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits(np.array([8]), 3)
    with pytest.raises(ValueError, match="non-negative"):
        pack_bits(np.array([-1, 2]), 4)
    with pytest.raises(ValueError, match="integer"):
        pack_bits(np.array([0.5]), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(np.array([1]), 0)
    with pytest.raises(ValueError, match="expected"):
        unpack_bits(b"\x00\x00", 4, 5)


@SETTINGS
@given(st.data(), st.integers(0, 3000))
def test_index_coding_round_trip(data: st.DataObject, d: int) -> None:
    k = data.draw(st.integers(0, d))
    seed = data.draw(st.integers(0, 2**32))
    positions = random_k_indices(d, k, seed)
    stream = encode_positions(positions, d)
    reader = Reader(stream)
    np.testing.assert_array_equal(decode_positions(reader, d, k), positions)
    reader.expect_end()


def test_index_coding_clustered_positions_round_trip() -> None:
    d = 100_000
    positions = np.concatenate([np.arange(10, 500), np.arange(90_000, 90_003), [99_999]])
    stream = encode_positions(positions, d)
    np.testing.assert_array_equal(decode_positions(Reader(stream), d, positions.size), positions)


@pytest.mark.parametrize(("d", "k"), [(1_000_000, 10_000), (1_000_000, 1_000), (100_000, 30_000)])
def test_index_coding_size_near_bound(d: int, k: int) -> None:
    positions = random_k_indices(d, k, seed=7)
    size_bits = 8 * len(encode_positions(positions, d))
    bound = log2_binomial(d, k)
    assert bound <= size_bits <= 1.10 * bound


def test_index_coding_rejects_unsorted() -> None:
    with pytest.raises(CodecError):
        encode_positions(np.array([3, 1]), 10)
    with pytest.raises(CodecError):
        encode_positions(np.array([10]), 10)


names = st.text(min_size=0, max_size=12)
arrays = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
    elements=st.floats(allow_nan=False, allow_infinity=False, width=32),
)
updates = st.dictionaries(names, arrays, max_size=5)


@SETTINGS
@given(updates, st.sampled_from(["none", "fp32", "zstd", "zlib", "fp32+zstd(19)", "topk(1.0)"]))
def test_lossless_codecs_round_trip_exactly(update: dict[str, np.ndarray], spec: str) -> None:
    codec = parse_codec(spec)
    payload = codec.encode(update).payload
    expected = {k: (v.shape, str(v.dtype)) for k, v in update.items()}
    out = codec.decode(payload, expected=expected).arrays
    assert list(out) == list(update)
    for name, value in update.items():
        assert out[name].dtype == np.float32
        assert out[name].shape == value.shape
        np.testing.assert_array_equal(out[name], value)


def test_float64_and_float16_inputs_decode_as_float32() -> None:
    update = {"a": np.arange(6, dtype=np.float64).reshape(2, 3), "b": np.ones(2, np.float16)}
    codec = parse_codec("none")
    out = codec.decode(
        codec.encode(update).payload, expected={"a": ((2, 3), "float64"), "b": ((2,), "float16")}
    )
    np.testing.assert_array_equal(out.arrays["a"], update["a"].astype(np.float32))
    assert out.arrays["b"].dtype == np.float32


def test_zstd_shrinks_redundant_updates() -> None:
    update = {"w": np.zeros(100_000, np.float32)}
    plain = parse_codec("none").encode(update).payload
    for spec in ("zstd", "zlib"):
        packed = parse_codec(spec).encode(update).payload
        assert len(packed) < len(plain) / 100
        out = parse_codec(spec).decode(packed).arrays["w"]
        np.testing.assert_array_equal(out, update["w"])
