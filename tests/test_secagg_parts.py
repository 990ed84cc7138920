"""Building blocks of fedsqueeze.secagg: encoding, Shamir sharing, graph, config, crypto."""

from __future__ import annotations

import os

import numpy as np
import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.secagg import (
    SecAggConfig,
    SecAggConfigError,
    SecAggDecryptionError,
    SecAggError,
    SecAggInputError,
    SecAggOverflowError,
    SecAggProtocolError,
    check_no_overflow,
    crypto,
    from_field,
    neighbour_graph,
    required_bits,
    shamir,
    to_field,
)

FAST = settings(max_examples=40, deadline=None)


# --- encoding -----------------------------------------------------------------------------


@FAST
@given(n=st.integers(1, 10_000), max_abs=st.integers(0, 2**40))
def test_required_bits_is_smallest_width_that_fits(n: int, max_abs: int) -> None:
    b = required_bits(n, max_abs)
    bound = n * max_abs
    assert -(2 ** (b - 1)) <= -bound and bound <= 2 ** (b - 1) - 1
    if b > 1:  # one bit fewer must not fit
        assert bound > 2 ** (b - 2) - 1


@FAST
@given(
    data=st.data(),
    n=st.integers(1, 12),
    max_abs=st.integers(0, 2**30),
    d=st.integers(1, 20),
)
def test_sum_in_field_decodes_exactly_at_required_bits(
    data: st.DataObject, n: int, max_abs: int, d: int
) -> None:
    bits = required_bits(n, max_abs)
    check_no_overflow(n, max_abs, bits)
    values = [
        data.draw(st.lists(st.integers(-max_abs, max_abs), min_size=d, max_size=d))
        for _ in range(n)
    ]
    encoded = [to_field(np.array(v, dtype=np.int64), bits) for v in values]
    assert all(e.dtype == np.uint64 and int(e.max()) < 2**bits for e in encoded)
    field_sum = sum(np.array(e, dtype=object) for e in encoded) % (2**bits)
    decoded = from_field(np.array(field_sum, dtype=np.uint64), bits)
    assert decoded.tolist() == [sum(col) for col in zip(*values, strict=True)]


def test_overflow_configuration_refused_with_needed_bits() -> None:
    with pytest.raises(SecAggOverflowError, match="needs 25 bits"):
        check_no_overflow(10, 2**20, 24)
    check_no_overflow(10, 2**20, 25)  # exactly enough
    with pytest.raises(SecAggOverflowError):
        to_field(np.array([128], dtype=np.int64), 8)
    with pytest.raises(SecAggConfigError):
        check_no_overflow(10, 1, 63)
    with pytest.raises(SecAggConfigError):
        required_bits(0, 5)


def test_from_field_rejects_out_of_range_and_non_integers() -> None:
    with pytest.raises(SecAggInputError):
        from_field(np.array([256], dtype=np.uint64), 8)
    with pytest.raises(SecAggInputError):
        to_field(np.array([0.5]), 8)
    assert from_field(np.array([255, 128, 127], dtype=np.uint64), 8).tolist() == [-1, -128, 127]


# --- Shamir -------------------------------------------------------------------------------


def test_field_prime_is_the_smallest_prime_above_2_256() -> None:
    assert shamir.PRIME > 2**256 and sympy.isprime(shamir.PRIME)
    assert sympy.prevprime(shamir.PRIME) < 2**256


@FAST
@given(
    secret=st.binary(min_size=32, max_size=32),
    data=st.data(),
    holders=st.lists(st.integers(0, 2**64 - 1), min_size=2, max_size=9, unique=True),
)
def test_any_t_shares_reconstruct_and_fewer_do_not(
    secret: bytes, data: st.DataObject, holders: list[int]
) -> None:
    t = data.draw(st.integers(2, len(holders)))
    xs = [h + 1 for h in holders]
    ys = shamir.split_secret(secret, t, xs, os.urandom)
    subset = data.draw(st.permutations(range(len(xs))))[:t]
    assert shamir.reconstruct_secret([xs[i] for i in subset], [ys[i] for i in subset]) == secret
    short = subset[: t - 1]
    try:
        wrong = shamir.reconstruct_secret([xs[i] for i in short], [ys[i] for i in short])
    except SecAggProtocolError:
        wrong = None  # interpolated value was not even a 32-byte number
    assert wrong != secret
    encoded = [shamir.encode_share(y) for y in ys]
    assert [shamir.decode_share(e) for e in encoded] == ys


@FAST
@given(blob=st.binary(max_size=40))
def test_share_decoder_fuzz(blob: bytes) -> None:
    try:
        y = shamir.decode_share(blob)
    except SecAggProtocolError:
        assert len(blob) != shamir.SHARE_BYTES or int.from_bytes(blob, "big") >= shamir.PRIME
    else:
        assert 0 <= y < shamir.PRIME and shamir.encode_share(y) == blob


def test_shamir_rejects_bad_parameters() -> None:
    with pytest.raises(SecAggProtocolError):
        shamir.split_secret(b"x" * 31, 2, [1, 2], os.urandom)
    with pytest.raises(SecAggProtocolError):
        shamir.split_secret(b"x" * 32, 3, [1, 2], os.urandom)
    with pytest.raises(SecAggProtocolError):
        shamir.split_secret(b"x" * 32, 2, [1, 1], os.urandom)
    with pytest.raises(SecAggProtocolError):
        shamir.split_secret(b"x" * 32, 2, [0, 1], os.urandom)


# --- graph and config ---------------------------------------------------------------------


@FAST
@given(
    data=st.data(),
    ids=st.lists(st.integers(0, 2**64 - 1), min_size=2, max_size=30, unique=True),
    seed=st.integers(0, 2**64 - 1),
)
def test_graph_is_k_regular_symmetric_and_seed_determined(
    data: st.DataObject, ids: list[int], seed: int
) -> None:
    n = len(ids)
    k = data.draw(st.sampled_from([k for k in range(1, n) if n * k % 2 == 0]))
    graph = neighbour_graph(ids, k, seed)
    assert set(graph) == set(ids)
    for u, nbrs in graph.items():
        assert len(nbrs) == k == len(set(nbrs)) and u not in nbrs
        assert all(u in graph[v] for v in nbrs)
    assert neighbour_graph(list(reversed(ids)), k, seed) == graph
    if k == n - 1:
        assert all(set(nbrs) == set(ids) - {u} for u, nbrs in graph.items())


def test_graph_changes_with_the_round_seed() -> None:
    ids = list(range(40))
    graphs = {tuple(sorted(neighbour_graph(ids, 4, s).items())) for s in range(5)}
    assert len(graphs) == 5


GOOD = {
    "num_clients": 10,
    "neighbours": 4,
    "threshold": 3,
    "bits": 16,
    "vector_len": 5,
    "round_seed": 1,
}


@pytest.mark.parametrize(
    "change",
    [
        {"num_clients": 1, "neighbours": 1, "threshold": 2},
        {"neighbours": 0},
        {"neighbours": 10},  # > n-1
        {"num_clients": 9, "neighbours": 3},  # n*k odd: no 3-regular graph on 9 nodes
        {"threshold": 1},
        {"threshold": 6},  # > k+1
        {"threshold": 2},  # <= (k+1)/2 without allow_low_threshold
        {"bits": 0},
        {"bits": 63},
        {"vector_len": 0},
        {"round_seed": -1},
        {"round_seed": 2**64},
        {"bits": 16.0},
        {"threshold": True},
    ],
)
def test_invalid_parameters_refused(change: dict) -> None:
    with pytest.raises(SecAggConfigError):
        SecAggConfig(**{**GOOD, **change})


def test_boundary_parameters_accepted() -> None:
    SecAggConfig(**GOOD)
    SecAggConfig(**{**GOOD, "threshold": 5, "bits": 62, "vector_len": 1})
    SecAggConfig(**{**GOOD, "threshold": 2, "allow_low_threshold": True})
    SecAggConfig(**{**GOOD, "bits": 1, "round_seed": 2**64 - 1, "neighbours": 9, "threshold": 6})
    assert SecAggConfig.min_secure_threshold(4) == 3
    assert SecAggConfig.min_secure_threshold(9) == 6


def test_errors_are_value_errors() -> None:
    assert issubclass(SecAggError, ValueError)
    assert issubclass(SecAggDecryptionError, SecAggProtocolError)


# --- crypto -------------------------------------------------------------------------------


def test_pairwise_keys_agree_and_are_bound_to_session_and_purpose() -> None:
    a = crypto.generate_private_key(os.urandom)
    b = crypto.generate_private_key(os.urandom)
    pa, pb = crypto.public_key_bytes(a), crypto.public_key_bytes(b)
    k_ab = crypto.pairwise_key(a, pb, b"s1", b"mask", 1, 2)
    assert k_ab == crypto.pairwise_key(b, pa, b"s1", b"mask", 2, 1)
    assert k_ab != crypto.pairwise_key(a, pb, b"s2", b"mask", 1, 2)
    assert k_ab != crypto.pairwise_key(a, pb, b"s1", b"enc", 1, 2)
    with pytest.raises(SecAggProtocolError):
        crypto.pairwise_key(a, bytes(32), b"s1", b"mask", 1, 2)  # low-order point
    with pytest.raises(SecAggProtocolError):
        crypto.pairwise_key(a, b"short", b"s1", b"mask", 1, 2)


def test_share_encryption_rejects_any_change_of_binding() -> None:
    key = os.urandom(32)
    blob = crypto.encrypt_share(key, b"p" * 66, b"sess", 1, 2, os.urandom)
    assert crypto.decrypt_share(key, blob, b"sess", 1, 2) == b"p" * 66
    for args in [(b"other", 1, 2), (b"sess", 3, 2), (b"sess", 1, 3), (b"sess", 2, 1)]:
        with pytest.raises(SecAggDecryptionError):
            crypto.decrypt_share(key, blob, *args)
    with pytest.raises(SecAggDecryptionError):
        crypto.decrypt_share(key, blob[:-1] + bytes([blob[-1] ^ 1]), b"sess", 1, 2)
    with pytest.raises(SecAggDecryptionError):
        crypto.decrypt_share(key, blob[:10], b"sess", 1, 2)


@pytest.mark.parametrize("bits", [5, 32, 33, 62])
def test_prg_is_deterministic_and_key_dependent(bits: int) -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    w = crypto.prg_words(k1, 1000, bits)
    assert w.dtype == crypto.word_dtype(bits) and w.shape == (1000,)
    assert np.array_equal(w, crypto.prg_words(k1, 1000, bits))
    assert not np.array_equal(w, crypto.prg_words(k2, 1000, bits))
