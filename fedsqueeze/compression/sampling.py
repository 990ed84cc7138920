"""Randomness shared by all clients (random-k positions) and private stochastic rounding."""

from __future__ import annotations

import numpy as np

from fedsqueeze.compression.errors import CodecError

_U64 = 1 << 64


def random_k_indices(d: int, k: int, seed: int) -> np.ndarray:
    """Draw ``k`` distinct positions out of ``range(d)``, the same on every client.

    Parameters
    ----------
    d, k
        Dimension and number of positions, ``0 <= k <= d``.
    seed
        Shared per-round seed (non-negative integer).

    Returns
    -------
    numpy.ndarray
        Sorted ``int64`` array of ``k`` distinct positions, uniform over all k-subsets.

    Notes
    -----
    Only the raw output of the PCG64 bit generator is used. NumPy guarantees that raw
    bit streams are stable across versions, unlike ``Generator.choice``, so clients and
    server running different NumPy versions still agree on the positions. Positions come
    from rejection-sampled uniform draws (no modulo bias); the first ``k`` distinct values
    in draw order form a uniform k-subset. For ``k > d/2`` the complement is drawn
    instead, which keeps the expected number of draws below ``0.7 d``.
    """
    d, k = int(d), int(k)
    if d < 0 or not 0 <= k <= d:
        raise CodecError(f"random_k_indices needs 0 <= k <= d, got d={d}, k={k}")
    if int(seed) < 0:
        raise CodecError(f"seed must be non-negative, got {seed}")
    if k == d:
        return np.arange(d, dtype=np.int64)
    complement = k > d // 2
    m = d - k if complement else k
    chosen = _distinct_draws(d, m, int(seed))
    if complement:
        mask = np.ones(d, dtype=bool)
        mask[chosen] = False
        return np.flatnonzero(mask).astype(np.int64)
    return np.sort(chosen)


def _distinct_draws(d: int, m: int, seed: int) -> np.ndarray:
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    bitgen = np.random.PCG64(seed)
    limit = np.uint64((_U64 // d) * d - 1)  # accept raw <= limit: uniform after % d
    draws: list[np.ndarray] = []
    have = 0
    uniq = np.zeros(0, dtype=np.int64)
    while have < m:
        # Expected draws to get (m - have) new distinct values, with some slack.
        need = int((m - have) * d / max(d - have, 1) * 1.1) + 64
        raw = bitgen.random_raw(need)
        raw = raw[raw <= limit]
        draws.append((raw % np.uint64(d)).astype(np.int64))
        allv = np.concatenate(draws)
        uniq, first = np.unique(allv, return_index=True)
        have = uniq.size
    # Keep the first m distinct values in draw order.
    order = np.argsort(first, kind="stable")[:m]
    return uniq[order]


def stochastic_round(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Round each entry down or up at random so that ``E[result] == x`` (as ``int64``).

    ``x`` is rounded up with probability ``x - floor(x)``.
    """
    x = np.asarray(x)
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    low = np.floor(x)
    frac = x - low
    up = rng.random(x.shape, dtype=np.float32 if x.dtype == np.float32 else np.float64) < frac
    result: np.ndarray = low.astype(np.int64) + up
    return result
