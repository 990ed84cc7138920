"""The one map between signed integers and Z_{2^b}, shared by every integer path.

Clients integerize their updates, map them into Z_{2^b} with :func:`to_field`, secure
aggregation sums them mod 2^b, and the server maps the sum back with :func:`from_field`
(centred, i.e. two's-complement decode). The decode is exact only if the true signed
sum lies in ``[-2^(b-1), 2^(b-1) - 1]``; :func:`required_bits` and
:func:`check_no_overflow` size ``b`` so that it does. Distributed DP, whose noise is
unbounded in principle, reduces with ``to_field(..., wrap=True)`` and sizes ``b`` from the
noise's spread instead (``fedsqueeze.privacy.distributed.bits_for_noise``).

Numpy only. The secure-aggregation core, the privacy core (distributed DP) and the
summable encodings of `fedsqueeze.contracts` all use this one map.
"""

from __future__ import annotations

import numpy as np

from fedsqueeze.secagg.errors import SecAggConfigError, SecAggInputError, SecAggOverflowError

MIN_BITS = 1
MAX_BITS = 62


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise SecAggConfigError(f"bits must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


def required_bits(num_clients: int, max_abs: int) -> int:
    """Smallest ``b`` such that a sum of ``num_clients`` values in ``[-max_abs, max_abs]``
    decodes exactly from Z_{2^b} (two's complement).

    The sum lies in ``[-n*max_abs, n*max_abs]``, which fits the centered range
    ``[-2^(b-1), 2^(b-1) - 1]`` iff ``n*max_abs <= 2^(b-1) - 1``.
    """
    for name, value, low in (("num_clients", num_clients, 1), ("max_abs", max_abs, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SecAggConfigError(f"{name} must be an int >= {low}, got {value!r}")
    return (num_clients * max_abs).bit_length() + 1


def check_no_overflow(num_clients: int, max_abs: int, bits: int) -> None:
    """Raise :class:`SecAggOverflowError` if ``bits`` cannot hold the sum without wrap-around."""
    _check_bits(bits)
    needed = required_bits(num_clients, max_abs)
    if needed > bits:
        raise SecAggOverflowError(
            f"summing {num_clients} values in [-{max_abs}, {max_abs}] needs {needed} bits "
            f"(|sum| <= {num_clients * max_abs}), but bits={bits}; raise bits to {needed} "
            "or lower the clipping range"
        )
    if needed > MAX_BITS:  # pragma: no cover - implied by the check above
        raise SecAggOverflowError(f"{needed} bits exceed the maximum of {MAX_BITS}")


def to_field(int_vector: np.ndarray, bits: int, *, wrap: bool = False) -> np.ndarray:
    """Map signed integers in ``[-2^(b-1), 2^(b-1))`` to ``uint64`` values in ``[0, 2^b)``.

    ``wrap=True`` reduces any int64 value modulo 2^b instead of refusing one outside the
    centred range (distributed DP: a noised coordinate may stray; the sum decodes exactly
    as long as the *sum* stays in range).
    """
    _check_bits(bits)
    x = np.asarray(int_vector)
    if x.dtype.kind not in "iu":
        raise SecAggInputError(f"to_field takes an integer array, got dtype {x.dtype}")
    if x.dtype.kind == "u" and x.size and int(x.max()) >= 1 << 63:
        raise SecAggInputError("to_field takes signed values; got an unsigned value >= 2^63")
    x = x.astype(np.int64, copy=False)
    half = 1 << (bits - 1)
    if not wrap and x.size and (int(x.min()) < -half or int(x.max()) >= half):
        raise SecAggOverflowError(
            f"values must lie in [-{half}, {half - 1}] for bits={bits}, "
            f"got range [{int(x.min())}, {int(x.max())}]"
        )
    return x.view(np.uint64) & np.uint64((1 << bits) - 1)


def from_field(sum_uint: np.ndarray, bits: int) -> np.ndarray:
    """Centered decode of values in ``[0, 2^b)`` to ``int64`` in ``[-2^(b-1), 2^(b-1))``."""
    _check_bits(bits)
    v = np.asarray(sum_uint)
    if v.dtype.kind not in "iu":
        raise SecAggInputError(f"from_field takes an integer array, got dtype {v.dtype}")
    if v.size and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise SecAggInputError(f"values must lie in [0, 2^{bits}) for bits={bits}")
    v = v.astype(np.int64)
    half = 1 << (bits - 1)
    return np.where(v >= half, v - (1 << bits), v).astype(np.int64)
