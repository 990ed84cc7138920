"""Distributed DP under secure aggregation: the client and server halves (numpy only).

Each client clips its flat update, rotates it with a shared-seed block-wise randomized
Hadamard transform (:mod:`fedsqueeze.compression.hadamard`: equal power-of-two blocks, only
the last one padded, so the integer vector is barely longer than the update), scales it by
γ (``scale``), rounds it to integers without bias and adds its share of discrete noise —
Skellam (Agarwal et al., NeurIPS 2021) or discrete Gaussian (Kairouz, Liu & Steinke, ICML
2021). Secure aggregation then sums the integer vectors in Z_{2^b}, so the server only ever
sees the noised sum; :func:`decode_sum` turns the centred signed sum
back into a float sum of updates.

Why the blocks leave the accounting unchanged: the rotation is block-diagonal with orthonormal
blocks, hence orthonormal on the padded space — ``‖Rx‖ = ‖x‖ ≤ C`` for every clipped x, however
its mass is split among blocks — and rounding moves each of the ``padded_dim`` coordinates by
less than one unit, so Δ₂ below is the same function of the rounded length as for one block.
The block size enters only the *field width* (how large one coordinate can get: ``‖x‖/√B`` in
the worst case), in :func:`noisy_sum_coordinate_std`.

Accounting
----------
The summed noise is accounted as a *Gaussian* mechanism with the effective noise multiplier

    z_eff = (std of the summed discrete noise) / Δ₂,

where Δ₂ is the L2 sensitivity of one client's *rounded, scaled* vector (larger than γ·C
because rounding can grow the norm; Kairouz et al., Thm. 1). This is an approximation: the
sum of Skellam shares is a Skellam, whose RDP exceeds the Gaussian's by a term of order
Δ₂²/μ² and Δ₁/μ (Agarwal et al., Thm. 3.5), and the sum of n discrete Gaussians is close to,
but not exactly, a discrete Gaussian (Kairouz et al., Thm. 2). Both gaps vanish as the noise
variance grows relative to Δ₂, which is the regime a sensible ``scale`` puts us in. The
variance used is the *true* one (a discrete Gaussian's variance is below σ²), so the
approximation never credits noise that was not added. Feed
:meth:`DistributedDPParams.effective_noise_multiplier` to the accountant (one step per
round at q = clients per round / clients).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedsqueeze.compression.errors import CodecError
from fedsqueeze.compression.hadamard import padded_length, resolve_block
from fedsqueeze.secagg.field import MAX_BITS

from .errors import (
    BitWidthTooSmall,
    InvalidPrivacyParameter,
    NonFiniteUpdateError,
    RoundingFailed,
    ShapeMismatchError,
)
from .mechanisms import (
    RandomizedHadamard,
    discrete_gaussian,
    discrete_gaussian_variance,
    skellam_noise,
)

__all__ = [
    "DEFAULT_BETA",
    "DistributedDPClient",
    "DistributedDPParams",
    "bits_for_noise",
    "choose_scale",
    "choose_scale_and_bits",
    "decode_sum",
    "noisy_sum_coordinate_std",
    "rotation_block",
    "rounded_l2_sensitivity",
]

NoiseKind = Literal["skellam", "dgauss"]

#: Failure probability of one conditional-rounding attempt, as in Kairouz et al. (2021).
DEFAULT_BETA = math.exp(-0.5)
#: Largest field width: the centred sum of a few thousand clients must still fit in int64.
_MAX_ROUNDING_ATTEMPTS = 1000


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise InvalidPrivacyParameter(f"{name} must be finite and > 0, got {value!r}")
    return value


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InvalidPrivacyParameter(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_bits(bits: int) -> int:
    bits = _positive_int("bits", bits)
    if not 2 <= bits <= MAX_BITS:
        raise InvalidPrivacyParameter(f"bits must be in [2, {MAX_BITS}], got {bits}")
    return bits


def rotation_block(dim: int, block: int = 0) -> int:
    """Block size of the rotation of a ``dim``-long update (0 = the automatic choice of
    :func:`~fedsqueeze.compression.hadamard.auto_block`: only the last block is padded)."""
    try:
        return resolve_block(_positive_int("dim", dim), block)
    except CodecError as err:
        raise InvalidPrivacyParameter(str(err)) from None


def rounded_l2_sensitivity(
    dim: int, clip: float, scale: float, beta: float | None = DEFAULT_BETA
) -> float:
    """L2 bound Δ₂ on one client's scaled and rounded (pre-noise) vector.

    Unconditional stochastic rounding moves each coordinate by less than 1, so
    ``Δ₂ = γC + sqrt(d)``. With conditional rounding (retry until the norm bound holds) the
    tighter bound of Kairouz et al. (2021, Thm. 1) applies as well:

        Δ₂² = min{ (γC + sqrt(d))²,  γ²C² + d/4 + sqrt(2 ln(1/β)) (γC + sqrt(d)/2) }.

    Parameters
    ----------
    dim
        Length of the rotated vector (the padded dimension).
    clip, scale
        C and γ.
    beta
        Per-attempt failure probability of conditional rounding, or None for unconditional.
    """
    d = _positive_int("dim", dim)
    c = _positive("clip", clip) * _positive("scale", scale)
    worst = (c + math.sqrt(d)) ** 2
    if beta is None:
        return math.sqrt(worst)
    if not 0 < beta < 1:
        raise InvalidPrivacyParameter(f"beta must be in (0, 1), got {beta!r}")
    conditional = c * c + d / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + math.sqrt(d) / 2)
    return math.sqrt(min(worst, conditional))


def noisy_sum_coordinate_std(
    dim: int,
    clip: float,
    num_clients: int,
    noise_multiplier: float,
    scale: float,
    block: int = 0,
) -> float:
    """Sub-Gaussian scale of one coordinate of the summed, rotated, scaled, noised vector.

    After the block-wise random rotation a coordinate of block j of a vector x has variance
    proxy ‖x_j‖²/B ≤ ‖x‖²/B (B the block size: the worst case puts all the mass in one
    block); the sum of n clipped updates has norm at most nC (all aligned, the worst case),
    so its signal part contributes (γnC)²/B. Each client's unbiased rounding adds at most 1/4
    of variance per coordinate, and the discrete noise adds (zγC)².
    """
    d = rotation_block(dim, block)
    n = _positive_int("num_clients", num_clients)
    c = _positive("clip", clip)
    g = _positive("scale", scale)
    z = float(noise_multiplier)
    if not (math.isfinite(z) and z >= 0):
        raise InvalidPrivacyParameter(f"noise_multiplier must be finite and >= 0, got {z!r}")
    return math.sqrt((g * c) ** 2 * (n * n / d + z * z) + n / 4.0)


def choose_scale(
    dim: int,
    clip: float,
    num_clients: int,
    noise_multiplier: float,
    bits: int,
    k_sigma: float = 4.0,
    block: int = 0,
) -> float:
    """Largest γ such that k_sigma standard deviations of a summed coordinate fit in Z_{2^b}.

    Solves ``k · noisy_sum_coordinate_std(γ) = 2^(b-1)`` for γ. A larger γ shrinks the
    relative rounding error (and so the sensitivity inflation), so the largest safe γ is
    the right one.

    Raises
    ------
    BitWidthTooSmall
        If even γ → 0 does not fit: the rounding noise of n clients alone needs more bits.
    """
    d = rotation_block(dim, block)
    n = _positive_int("num_clients", num_clients)
    c = _positive("clip", clip)
    b = _check_bits(bits)
    k = _positive("k_sigma", k_sigma)
    z = float(noise_multiplier)
    if not (math.isfinite(z) and z >= 0):
        raise InvalidPrivacyParameter(f"noise_multiplier must be finite and >= 0, got {z!r}")
    budget = (2.0 ** (b - 1) / k) ** 2 - n / 4.0
    if budget <= 0:
        raise BitWidthTooSmall(
            f"{b} bits cannot hold the rounding noise of {n} clients at {k} sigma; "
            f"need at least {bits_for_noise(dim, clip, n, z, 1e-12, k, block)} bits"
        )
    # Shave a hair off so float rounding never lands the bound just above 2^(b-1), which
    # would make bits_for_noise() of the result report b + 1.
    return math.sqrt(budget / (c * c * (n * n / d + z * z))) * (1.0 - 1e-9)


def bits_for_noise(
    dim: int,
    clip: float,
    num_clients: int,
    noise_multiplier: float,
    scale: float,
    k_sigma: float = 4.0,
    block: int = 0,
) -> int:
    """Smallest b with ``k_sigma * noisy_sum_coordinate_std <= 2^(b-1)`` (at least 2).

    Raises
    ------
    BitWidthTooSmall
        If that exceeds :data:`MAX_BITS`.
    """
    k = _positive("k_sigma", k_sigma)
    bound = k * noisy_sum_coordinate_std(dim, clip, num_clients, noise_multiplier, scale, block)
    bits = max(2, math.ceil(math.log2(bound)) + 1)
    if bits > MAX_BITS:
        raise BitWidthTooSmall(f"configuration needs {bits} bits, more than {MAX_BITS}")
    return bits


def choose_scale_and_bits(
    dim: int,
    clip: float,
    num_clients: int,
    noise_multiplier: float,
    *,
    bits: int | None = None,
    scale: float | None = None,
    k_sigma: float = 4.0,
) -> tuple[float, int]:
    """Complete a (scale, bits) pair from exactly one of the two.

    Given ``bits``, pick the largest safe scale (:func:`choose_scale`); given ``scale``,
    report the bit width it needs (:func:`bits_for_noise`).
    """
    if (bits is None) == (scale is None):
        raise InvalidPrivacyParameter("give exactly one of bits= or scale=")
    if bits is not None:
        return choose_scale(dim, clip, num_clients, noise_multiplier, bits, k_sigma), int(bits)
    assert scale is not None
    return float(scale), bits_for_noise(dim, clip, num_clients, noise_multiplier, scale, k_sigma)


@dataclass(frozen=True)
class DistributedDPParams:
    """Configuration shared by all clients and the server for one distributed-DP run.

    Parameters
    ----------
    dim
        Length d of the flat update.
    clip
        L2 clip norm C, in update units.
    scale
        γ: rotated coordinates are multiplied by it before rounding.
    bits
        Field width b of secure aggregation.
    num_clients
        n: clients per round expected to add noise; each adds 1/n of the noise variance.
    noise_multiplier
        z: the total summed noise has std z·C in update units (z·γ·C in integer units).
    mechanism
        ``"skellam"`` or ``"dgauss"`` (distributed discrete Gaussian).
    conditional_rounding
        Retry stochastic rounding until the Kairouz et al. norm bound holds (tighter Δ₂).
    beta
        Per-attempt failure probability of that bound.
    block
        Block size of the shared rotation (a power of two; 0 = the automatic choice,
        :func:`rotation_block`, resolved at construction so that clients and server agree).
        The rotation is orthonormal whatever the blocks, so the sensitivity bound is the
        same function of the rounded length ``padded_dim``; the block size only sets how
        far one coordinate can reach (the field width).
    """

    dim: int
    clip: float
    scale: float
    bits: int
    num_clients: int
    noise_multiplier: float
    mechanism: NoiseKind = "skellam"
    conditional_rounding: bool = True
    beta: float = DEFAULT_BETA
    block: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "block", rotation_block(self.dim, self.block))
        _positive("clip", self.clip)
        _positive("scale", self.scale)
        _check_bits(self.bits)
        _positive_int("num_clients", self.num_clients)
        _positive("noise_multiplier", self.noise_multiplier)
        if self.mechanism not in ("skellam", "dgauss"):
            raise InvalidPrivacyParameter(
                f"mechanism must be 'skellam' or 'dgauss', got {self.mechanism!r}"
            )
        if not 0 < self.beta < 1:
            raise InvalidPrivacyParameter(f"beta must be in (0, 1), got {self.beta!r}")

    @classmethod
    def for_bits(
        cls,
        dim: int,
        clip: float,
        bits: int,
        num_clients: int,
        noise_multiplier: float,
        mechanism: NoiseKind = "skellam",
        *,
        k_sigma: float = 4.0,
        conditional_rounding: bool = True,
        beta: float = DEFAULT_BETA,
        block: int = 0,
    ) -> DistributedDPParams:
        """Parameters with the largest scale that fits ``bits`` (see :func:`choose_scale`)."""
        block = rotation_block(dim, block)
        scale = choose_scale(dim, clip, num_clients, noise_multiplier, bits, k_sigma, block)
        return cls(
            dim, clip, scale, bits, num_clients, noise_multiplier, mechanism,
            conditional_rounding, beta, block,
        )  # fmt: skip

    @property
    def padded_dim(self) -> int:
        """Length of the encoded integer vectors: ``dim`` rounded up to whole blocks."""
        return padded_length(self.dim, self.block)

    @property
    def total_noise_std(self) -> float:
        """Target std of the summed noise, in integer (scaled) units: z·γ·C."""
        return self.noise_multiplier * self.scale * self.clip

    @property
    def skellam_mu_per_client(self) -> float:
        """μ_i of each client's Skellam share: n shares of variance 2μ_i sum to z²γ²C²."""
        return self.total_noise_std**2 / (2.0 * self.num_clients)

    @property
    def dgauss_sigma_per_client(self) -> float:
        """σ_i of each client's discrete Gaussian share: σ/sqrt(n)."""
        return self.total_noise_std / math.sqrt(self.num_clients)

    def summed_noise_variance(self, num_contributors: int | None = None) -> float:
        """True variance (integer units) of the noise in a sum over ``num_contributors``.

        Defaults to ``num_clients``. Fewer contributors (dropouts after noising is decided)
        mean proportionally less noise.
        """
        m = (
            self.num_clients
            if num_contributors is None
            else _positive_int("num_contributors", num_contributors)
        )
        if self.mechanism == "skellam":
            return 2.0 * self.skellam_mu_per_client * m
        return discrete_gaussian_variance(self.dgauss_sigma_per_client) * m

    @property
    def l2_sensitivity(self) -> float:
        """Δ₂ of one client's rounded, scaled vector (integer units)."""
        return rounded_l2_sensitivity(
            self.padded_dim, self.clip, self.scale, self.beta if self.conditional_rounding else None
        )

    def effective_noise_multiplier(self, num_contributors: int | None = None) -> float:
        """Noise multiplier to give a Gaussian accountant: summed-noise std / Δ₂.

        Uses the Gaussian approximation of the Skellam / distributed discrete Gaussian sum
        (see the module docstring) and the rounding-inflated sensitivity, so it is below
        ``noise_multiplier``; how much below tells whether ``scale`` is large enough.
        """
        return math.sqrt(self.summed_noise_variance(num_contributors)) / self.l2_sensitivity

    @property
    def coordinate_std(self) -> float:
        """Sub-Gaussian scale of one coordinate of the summed encoded vector."""
        return noisy_sum_coordinate_std(
            self.dim, self.clip, self.num_clients, self.noise_multiplier, self.scale, self.block
        )

    @property
    def headroom_sigmas(self) -> float:
        """How many :attr:`coordinate_std` fit in half the field: 2^(b-1) / std."""
        return 2.0 ** (self.bits - 1) / self.coordinate_std


class DistributedDPClient:
    """Client half: turn a float update into a noised int64 vector for secure aggregation."""

    def __init__(self, params: DistributedDPParams) -> None:
        self.params = params
        p = params
        self._max_sq_norm = (
            rounded_l2_sensitivity(p.padded_dim, p.clip, p.scale, p.beta) ** 2
            if p.conditional_rounding
            else None
        )

    def _round(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Unbiased stochastic rounding, retried until the norm bound holds if conditional."""
        floor = np.floor(x)
        frac = x - floor
        base = floor.astype(np.int64)
        for _ in range(_MAX_ROUNDING_ATTEMPTS):
            rounded: np.ndarray = base + (rng.random(x.shape) < frac)
            if self._max_sq_norm is None:
                return rounded
            sq = float(np.dot(rounded.astype(np.float64), rounded.astype(np.float64)))
            if sq <= self._max_sq_norm:
                return rounded
        raise RoundingFailed(
            f"conditional rounding missed its norm bound {_MAX_ROUNDING_ATTEMPTS} times"
        )

    def encode(
        self, flat_update: np.ndarray, rng: np.random.Generator, rotation_seed: int
    ) -> np.ndarray:
        """Clip, rotate, scale, round and noise one flat update.

        Parameters
        ----------
        flat_update
            Float vector of length ``params.dim``.
        rng
            Client randomness (rounding and noise); never shared.
        rotation_seed
            The per-round seed every party uses for the rotation.

        Returns
        -------
        np.ndarray
            int64 vector of length ``params.padded_dim``, signed (not yet reduced mod 2^b;
            the secure-aggregation layer does that).
        """
        p = self.params
        x = np.asarray(flat_update, dtype=np.float64)
        if x.shape != (p.dim,):
            raise ShapeMismatchError(f"expected a flat update of shape ({p.dim},), got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise NonFiniteUpdateError("update contains NaN or Inf")
        norm = float(np.linalg.norm(x))
        if norm > p.clip:
            x = x * (p.clip / norm)
        rotated = RandomizedHadamard(p.dim, rotation_seed, p.block).rotate(x)
        rounded = self._round(rotated * p.scale, rng)
        if p.mechanism == "skellam":
            noise = skellam_noise(rounded.shape, p.skellam_mu_per_client, rng)
        else:
            noise = discrete_gaussian(rounded.shape, p.dgauss_sigma_per_client, rng)
        noised: np.ndarray = rounded + noise
        return noised


def decode_sum(
    int_sum: np.ndarray, num_clients: int, params: DistributedDPParams, rotation_seed: int
) -> np.ndarray:
    """Server half: centred signed integer sum → float sum of the (clipped) updates.

    Parameters
    ----------
    int_sum
        Sum of the clients' encoded vectors, already reduced mod 2^b and mapped to
        [-2^(b-1), 2^(b-1)) (see :func:`fedsqueeze.secagg.field.from_field`), length
        ``params.padded_dim``.
    num_clients
        How many clients' vectors are in the sum (>= 1). Decoding itself does not need it
        (rounding and noise are zero-mean, so there is nothing to debias); it is validated
        here because the caller must pass that same count to
        :meth:`DistributedDPParams.effective_noise_multiplier` when accounting.
    params, rotation_seed
        Those the clients used.

    Returns
    -------
    np.ndarray
        float64 vector of length ``params.dim``: the sum of clipped updates plus the noise,
        unscaled and un-rotated. Divide by the number of clients for a mean.
    """
    _positive_int("num_clients", num_clients)
    s = np.asarray(int_sum)
    if s.shape != (params.padded_dim,):
        raise ShapeMismatchError(
            f"expected an integer sum of shape ({params.padded_dim},), got {s.shape}"
        )
    if not np.issubdtype(s.dtype, np.integer):
        raise InvalidPrivacyParameter(f"int_sum must have an integer dtype, got {s.dtype}")
    half = 2 ** (params.bits - 1)
    if s.size and (int(s.min()) < -half or int(s.max()) >= half):
        raise InvalidPrivacyParameter(
            f"int_sum is not centred in [-2^{params.bits - 1}, 2^{params.bits - 1}); "
            f"apply from_field first"
        )
    return RandomizedHadamard(params.dim, rotation_seed, params.block).unrotate(
        s.astype(np.float64) / params.scale
    )
