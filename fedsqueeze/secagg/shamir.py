"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^256 + 297).

``2^256 + 297`` is the smallest prime above ``2^256``, so every 32-byte secret is a field
element and a share fits in :data:`SHARE_BYTES` = 33 bytes. Only a handful of secrets
are shared per client and round, so Python integers are fast enough; the one cost that
grows with the number of clients, the Lagrange coefficients at zero, is cached per set
of share positions because the server reconstructs many secrets from the same holders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

from fedsqueeze.secagg.errors import SecAggProtocolError

PRIME = (1 << 256) + 297
SECRET_BYTES = 32
SHARE_BYTES = 33
# Random coefficients are drawn from 48 bytes reduced mod PRIME: the bias is < 2^-127.
_COEFF_BYTES = 48


def split_secret(
    secret: bytes, threshold: int, xs: Sequence[int], entropy: Callable[[int], bytes]
) -> list[int]:
    """Evaluate a random degree ``threshold-1`` polynomial with constant term ``secret``.

    Parameters
    ----------
    secret:
        Exactly :data:`SECRET_BYTES` bytes, read big-endian.
    threshold:
        Number of shares needed to reconstruct (``1 <= threshold <= len(xs)``).
    xs:
        Distinct, non-zero share positions (field elements).
    entropy:
        ``entropy(n)`` returns ``n`` uniformly random bytes (``os.urandom`` in production).

    Returns
    -------
    list[int]
        The share value at each position of ``xs``, in the same order.
    """
    if len(secret) != SECRET_BYTES:
        raise SecAggProtocolError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise SecAggProtocolError(f"threshold {threshold} outside 1..{len(xs)}")
    _check_positions(xs)
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [int.from_bytes(entropy(_COEFF_BYTES), "big") % PRIME for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        shares.append(acc)
    return shares


def reconstruct_secret(xs: Sequence[int], ys: Sequence[int]) -> bytes:
    """Interpolate at zero from exactly the given shares and return the 32-byte secret.

    Raises :class:`SecAggProtocolError` if the result is not a 32-byte value, which
    happens (with overwhelming probability) when a share was wrong.
    """
    if len(xs) != len(ys) or not xs:
        raise SecAggProtocolError("need the same, non-zero number of positions and values")
    for y in ys:
        if not 0 <= y < PRIME:
            raise SecAggProtocolError("share value outside the field")
    coeffs = _lagrange_at_zero(tuple(xs))
    secret = sum(c * y for c, y in zip(coeffs, ys, strict=True)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise SecAggProtocolError("reconstructed value is not a 32-byte secret (bad share?)")
    return secret.to_bytes(SECRET_BYTES, "big")


def interpolate_at(xs: Sequence[int], ys: Sequence[int], x: int) -> int:
    """The value at ``x`` of the polynomial through the given shares (to check other shares)."""
    coeffs = _lagrange_at(tuple(xs), x % PRIME)
    return sum(c * y for c, y in zip(coeffs, ys, strict=True)) % PRIME


def encode_share(y: int) -> bytes:
    """Fixed-width big-endian encoding of a share value."""
    return y.to_bytes(SHARE_BYTES, "big")


def decode_share(data: bytes) -> int:
    """Inverse of :func:`encode_share`; rejects wrong lengths and values outside the field."""
    if not isinstance(data, bytes) or len(data) != SHARE_BYTES:
        raise SecAggProtocolError(f"a share must be {SHARE_BYTES} bytes")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise SecAggProtocolError("share value outside the field")
    return y


def _check_positions(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise SecAggProtocolError("share positions must be distinct")
    for x in xs:
        if not 0 < x < PRIME:
            raise SecAggProtocolError(f"share position {x} must be a non-zero field element")


@lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Coefficients l_i with f(0) = sum_i l_i f(x_i)."""
    return _lagrange_at(xs, 0)


@lru_cache(maxsize=1024)
def _lagrange_at(xs: tuple[int, ...], x: int) -> tuple[int, ...]:
    """Coefficients l_i with f(x) = sum_i l_i f(x_i): l_i = prod_{j!=i} (x - x_j) / (x_i - x_j)."""
    _check_positions(xs)
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (x - xj) % PRIME
                den = den * (xi - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)
