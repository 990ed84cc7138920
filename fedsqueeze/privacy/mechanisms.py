"""Noise mechanisms and the randomized Hadamard rotation (numpy only).

Every sampler takes an explicit ``np.random.Generator``: the caller decides where
randomness comes from, and for DP it must be secret from whoever DP protects against —
fedsqueeze feeds them generators seeded from OS entropy (clients) or from a secret key
(:class:`fedsqueeze.contracts.streams.SecretStreams`, the server), never from the run
seed. ``numpy.random``'s PCG64 is not a cryptographic generator (a secret 128-bit or
larger seed makes its output unpredictable to someone who never sees raw draws), and the
float Gaussian sampler is subject to the floating-point attack of Mironov (2012): the set of
floats ``x + noise`` can take depends on ``x``, so an output can rule a neighbour out. Central
DP therefore uses :func:`discrete_gaussian_mechanism` (integer noise on a grid); the float
:func:`gaussian_noise` is kept for non-private uses and experiments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedsqueeze.compression.errors import CodecError
from fedsqueeze.compression.hadamard import BlockHadamard
from fedsqueeze.compression.hadamard import next_power_of_two as _next_power_of_two

from .errors import InvalidPrivacyParameter, ShapeMismatchError

__all__ = [
    "GRID_RESOLUTION",
    "RandomizedHadamard",
    "discrete_gaussian",
    "discrete_gaussian_mechanism",
    "discrete_gaussian_variance",
    "gaussian_noise",
    "next_power_of_two",
    "skellam_noise",
]

Shape = int | Sequence[int]

# Safety net for the rejection loop: each round keeps a coordinate with probability well
# above 1/2 (CKS 2020, Sec. 5), so 200 rounds leave < 2^-200 of them unresolved.
_MAX_REJECTION_ROUNDS = 200


def _check_scale(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise InvalidPrivacyParameter(f"{name} must be finite and >= 0, got {value!r}")
    return value


def gaussian_noise(shape: Shape, std: float, rng: np.random.Generator) -> np.ndarray:
    """Samples of N(0, std²) as float64 (std = 0 gives zeros)."""
    std = _check_scale("std", std)
    return rng.normal(0.0, std, size=shape) if std > 0 else np.zeros(shape, dtype=np.float64)


def skellam_noise(shape: Shape, mu: float, rng: np.random.Generator) -> np.ndarray:
    """Symmetric Skellam samples: difference of two independent Poisson(mu); variance 2·mu.

    Skellam is closed under summation (Sk(μ1) + Sk(μ2) = Sk(μ1 + μ2)), which is why each of n
    clients can add Sk(μ/n) and the securely aggregated sum carries exactly Sk(μ)
    (Agarwal et al. 2021).
    """
    mu = _check_scale("mu", mu)
    return rng.poisson(mu, size=shape).astype(np.int64) - rng.poisson(mu, size=shape).astype(
        np.int64
    )


def discrete_gaussian(shape: Shape, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Samples of the discrete Gaussian N_Z(0, sigma²) on the integers, as int64.

    Algorithm 3 of Canonne, Kamath & Steinke (2020), vectorized: propose from a discrete
    Laplace with scale t = floor(sigma) + 1, accept with probability
    ``exp(-(|y| - sigma²/t)² / (2 sigma²))``. Only the rejected coordinates are redrawn, so
    the Python loop runs over rejection rounds (a handful), never over coordinates.

    The discrete Laplace proposal is the difference of two geometric variables with success
    probability 1 - e^(-1/t) (its exact law). CKS draw the Bernoulli(exp(-γ)) acceptance with
    exact rational arithmetic; here it is a float64 uniform compared with a float64 exp, so
    the output law matches N_Z(0, sigma²) up to float64 rounding of the acceptance
    probabilities (relative error ~1e-16), not bit-exactly.
    """
    sigma = _check_scale("sigma", sigma)
    size = tuple(np.atleast_1d(np.asarray(shape, dtype=np.int64)).tolist())
    out = np.zeros(size, dtype=np.int64)
    if sigma == 0 or out.size == 0:
        return out
    flat = out.reshape(-1)
    t = math.floor(sigma) + 1
    p_geom = -math.expm1(-1.0 / t)  # 1 - e^{-1/t}
    sigma2 = sigma * sigma
    pending = np.arange(flat.size)
    for _ in range(_MAX_REJECTION_ROUNDS):
        k = pending.size
        # numpy's geometric counts trials (support {1, 2, ...}); the two -1 offsets cancel.
        y = rng.geometric(p_geom, size=k).astype(np.int64) - rng.geometric(p_geom, size=k)
        gamma = (np.abs(y) - sigma2 / t) ** 2 / (2.0 * sigma2)
        accept = rng.random(k) < np.exp(-gamma)
        flat[pending[accept]] = y[accept]
        pending = pending[~accept]
        if pending.size == 0:
            return out
    raise RuntimeError("discrete Gaussian rejection sampler did not converge")  # pragma: no cover


GRID_RESOLUTION = 1024
"""Grid steps per unit of the per-coordinate rounding slack (see
:func:`discrete_gaussian_mechanism`): the noise std is (1 + 1/1024) times z·Δ."""


def discrete_gaussian_mechanism(
    x: np.ndarray,
    noise_multiplier: float,
    sensitivity: float,
    rng: np.random.Generator,
    resolution: int = GRID_RESOLUTION,
) -> tuple[np.ndarray, float]:
    """The Gaussian mechanism without floating-point leaks: ``(noised x, noise std)``.

    ``x`` (any shape; d coordinates, L2 sensitivity ``sensitivity`` = Δ between neighbours)
    is rounded to the grid g·Z^d with ``g = Δ / (resolution · sqrt(d))`` and gets integer
    noise from the exact discrete Gaussian N_Z(0, σ²) per coordinate (:func:`discrete_gaussian`,
    Canonne, Kamath & Steinke 2020), then is scaled back by g:

        out = g · (round(x / g) + N_Z(0, σ²)),   σ = z · (Δ/g + sqrt(d)).

    Why this is not open to Mironov's attack: the released value is g times an *integer*, a
    deterministic function (post-processing) of an integer mechanism, so its support does not
    depend on x; the float arithmetic only enters the integer sampler's acceptance
    probabilities (relative error ~1e-16), never which values can occur.

    Accounting: neighbouring inputs' grid points differ by at most Δ/g + sqrt(d) in L2 (each
    coordinate's rounding moves it by at most 1/2), and the multivariate discrete Gaussian
    with that integer sensitivity satisfies ρ-zCDP with ρ = (Δ/g + sqrt(d))² / (2σ²) = 1/(2z²)
    (CKS 2020) — the same Rényi curve as the continuous Gaussian mechanism with multiplier z,
    so the Opacus RDP accountant's ε for z holds as it is. (PRV accounting uses the
    continuous Gaussian's privacy-loss distribution; the discrete one differs from it by terms
    of order e^(-2π²σ²), nothing at σ ≥ 1.) The price is noise std ``z·Δ·(1 + 1/resolution)``
    in x's units, returned as the second value.
    """
    z = _check_scale("noise_multiplier", noise_multiplier)
    delta = _check_scale("sensitivity", sensitivity)
    values = np.asarray(x, dtype=np.float64)
    if z == 0 or delta == 0 or values.size == 0:
        return values.copy(), 0.0
    if not np.all(np.isfinite(values)):
        raise InvalidPrivacyParameter("the input to noise contains NaN or Inf")
    if int(resolution) < 1:
        raise InvalidPrivacyParameter(f"resolution must be >= 1, got {resolution!r}")
    root_d = math.sqrt(values.size)
    step = delta / (int(resolution) * root_d)
    sigma = z * (delta / step + root_d)
    if 64.0 * sigma > 2.0**61:
        raise InvalidPrivacyParameter(
            f"noise multiplier {z:g} is too large for the int64 noise grid at d = {values.size}"
        )
    ints = np.rint(values / step)
    if np.any(np.abs(ints) > 2.0**62 - 64.0 * sigma):
        raise InvalidPrivacyParameter("the input is too large for the noise grid (int64)")
    noised = ints.astype(np.int64) + discrete_gaussian(values.shape, sigma, rng)
    return noised.astype(np.float64) * step, sigma * step


# Above this sigma the exact series equals sigma² to float64 precision (see below).
_DG_VARIANCE_EXACT_ABOVE = 8.0


def discrete_gaussian_variance(sigma: float) -> float:
    """Exact variance of N_Z(0, sigma²): Σ k² e^(-k²/2σ²) / Σ e^(-k²/2σ²).

    Strictly below sigma² (CKS 2020, Cor. 9); the gap is negligible for sigma >= 1 but not
    for small sigma, and accounting must use the true value (it is the smaller one).
    """
    sigma = _check_scale("sigma", sigma)
    if sigma == 0:
        return 0.0
    if sigma >= _DG_VARIANCE_EXACT_ABOVE:
        # By Poisson summation the relative gap to sigma² is of order e^(-2π²σ²): below
        # float64 resolution (1e-16) already at sigma ≈ 1.5, so the series would return sigma²
        # anyway, at a cost linear in sigma.
        return sigma * sigma
    # Terms beyond 40 sigma are below e^-800: nothing a float64 sum could see.
    half = math.ceil(40.0 * sigma) + 1
    k = np.arange(-half, half + 1, dtype=np.float64)
    weights = np.exp(-(k**2) / (2.0 * sigma * sigma))
    return float(np.sum(k**2 * weights) / np.sum(weights))


def next_power_of_two(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    if n < 1:
        raise InvalidPrivacyParameter(f"dimension must be >= 1, got {n}")
    return _next_power_of_two(n)


class RandomizedHadamard(BlockHadamard):
    """Orthonormal random rotation ``x ↦ R x`` with seeded ±1 diagonals, block by block.

    Used before integer rounding in distributed DP (Kairouz et al. 2021): after the rotation
    every coordinate of a vector with norm r has magnitude about r / sqrt(B) (B the block
    size; r / sqrt(d) when the mass is spread over the blocks), so a fixed integer range
    holds all coordinates of the scaled sum with high probability, and the rounding error
    spreads evenly. Clients and the server build the same rotation from the per-round shared
    seed. The rotation itself is :class:`fedsqueeze.compression.hadamard.BlockHadamard`; this
    class only reports bad input with the privacy core's typed errors.

    Parameters
    ----------
    dim
        Length d of the vectors to rotate; they are zero-padded to ``padded_dim``.
    seed
        Seed of the ±1 diagonal (non-negative int; the same on every party).
    block
        Block size (a power of two). Default: one block, ``padded_dim`` the next power of two
        of ``dim`` (the classic rotation); ``0`` = :func:`~fedsqueeze.compression.hadamard.
        auto_block` (pads only the last block).
    """

    def __init__(self, dim: int, seed: int, block: int | None = None) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
            raise InvalidPrivacyParameter(f"dim must be a positive int, got {dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise InvalidPrivacyParameter(f"seed must be a non-negative int, got {seed!r}")
        try:
            super().__init__(
                int(dim), int(seed), next_power_of_two(dim) if block is None else block
            )
        except CodecError as err:
            raise InvalidPrivacyParameter(str(err)) from None

    def rotate(self, x: np.ndarray) -> np.ndarray:
        try:
            return super().rotate(x)
        except CodecError as err:
            raise ShapeMismatchError(str(err)) from None

    def unrotate(self, y: np.ndarray) -> np.ndarray:
        try:
            return super().unrotate(y)
        except CodecError as err:
            raise ShapeMismatchError(str(err)) from None
