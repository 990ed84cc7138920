"""L2 clipping of client updates, fixed and adaptive (quantile-based).

Pure numpy: no torch, no Flower. An update is a ``dict[str, np.ndarray]`` of named arrays
(the model's parameter deltas); clipping treats the whole dict as one flat vector, which is
what user-level DP-FedAvg bounds (McMahan et al. 2018).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .errors import InvalidPrivacyParameter, NonFiniteUpdateError
from .mechanisms import discrete_gaussian_mechanism

__all__ = [
    "AdaptiveClipper",
    "clip_l2",
    "effective_noise_multiplier",
    "l2_norm",
    "update_noise_multiplier",
]


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidPrivacyParameter(f"{name} must be finite and {bound}, got {value!r}")
    return value


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm of a set of named arrays, as if they were concatenated.

    Accumulates in float64 so a float16/float32 update does not overflow or lose the norm.

    Raises
    ------
    NonFiniteUpdateError
        If any array holds NaN or Inf.
    """
    total = 0.0
    for name, array in arrays.items():
        flat = np.asarray(array, dtype=np.float64).ravel()
        if not np.all(np.isfinite(flat)):
            raise NonFiniteUpdateError(f"array {name!r} contains NaN or Inf")
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip_l2(arrays: Mapping[str, np.ndarray], clip: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale ``arrays`` jointly so their global L2 norm is at most ``clip``.

    Parameters
    ----------
    arrays
        Named arrays (the update). Not modified.
    clip
        The L2 bound C > 0.

    Returns
    -------
    clipped, norm
        New arrays (same names, shapes and dtypes) scaled by ``min(1, C / norm)``, and the
        *original* norm (the adaptive clipper needs it to report whether it was clipped).
    """
    clip = _check_positive("clip", clip)
    norm = l2_norm(arrays)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    clipped: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        arr = np.asarray(array)
        if factor == 1.0:
            clipped[name] = arr.copy()
        else:
            clipped[name] = (arr.astype(np.float64) * factor).astype(arr.dtype, copy=False)
    return clipped, norm


def update_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Noise multiplier σ_Δ for the update sum when adaptive clipping shares the budget.

    Andrew et al. (2021), Thm. 1: releasing the noised sum of clipped updates (multiplier
    σ_Δ, sensitivity C) together with the noised sum of centred clip indicators
    ``b_i - 1/2`` (noise std σ_b, sensitivity 1/2) is, for accounting, one Gaussian mechanism
    with multiplier z where ``z^-2 = σ_Δ^-2 + (2 σ_b)^-2``. Solving for the update part:

        σ_Δ = (z^-2 - (2 σ_b)^-2)^(-1/2)

    Raises
    ------
    InvalidPrivacyParameter
        If ``2 σ_b <= z``: the count alone would already spend the whole budget.
    """
    z = _check_positive("noise_multiplier", noise_multiplier)
    sigma_b = _check_positive("count_noise_std", count_noise_std)
    rest = z**-2 - (2.0 * sigma_b) ** -2
    if rest <= 0:
        raise InvalidPrivacyParameter(
            f"count_noise_std={sigma_b} is too small for noise_multiplier={z}: "
            f"need 2*count_noise_std > noise_multiplier"
        )
    return math.pow(rest, -0.5)


def effective_noise_multiplier(update_multiplier: float, count_noise_std: float) -> float:
    """Inverse of :func:`update_noise_multiplier`: z = (σ_Δ^-2 + (2 σ_b)^-2)^(-1/2).

    This is the multiplier to give the accountant when the update sum is noised with σ_Δ·C
    and the clipped count with σ_b.
    """
    s = _check_positive("update_multiplier", update_multiplier)
    sigma_b = _check_positive("count_noise_std", count_noise_std)
    return math.pow(s**-2 + (2.0 * sigma_b) ** -2, -0.5)


@dataclass
class AdaptiveClipper:
    """Quantile-based adaptive clip norm (Andrew et al., NeurIPS 2021).

    Each round, every sampled client reports one bit ``b_i = 1[||Δ_i|| <= C]``. The server
    releases the noised fraction

        b̂ = (Σ_i (b_i - 1/2) + N(0, σ_b²)) / m + 1/2,

    with m the expected number of clients per round, and updates the clip geometrically:

        C ← C · exp(-η (b̂ - γ)),

    so C tracks the γ-quantile of the update norms.

    Privacy: the clipped-count query is a second Gaussian mechanism on the same clients each
    round. Centring the bit gives it sensitivity 1/2, and the pair (update sum with noise
    σ_Δ·C, centred count with noise σ_b) composes to a single Gaussian mechanism with
    multiplier z, ``z^-2 = σ_Δ^-2 + (2 σ_b)^-2`` (Andrew et al., Thm. 1). So: give the
    accountant :attr:`noise_multiplier` (z, one step per round at q = m / N), and noise the
    sum of clipped updates with std ``update_noise_multiplier * clip`` — slightly more than z·C,
    which pays for the count.

    Parameters
    ----------
    initial_clip
        Starting C > 0.
    target_quantile
        γ in (0, 1): fraction of updates that should end up unclipped.
    learning_rate
        η > 0 of the geometric update (the paper uses 0.2).
    count_noise_std
        σ_b, noise std of the clipped count in *count* units (the paper suggests m / 20).
    expected_clients
        m, expected clients per round; the denominator of b̂ (fixed so that one client's
        presence only moves the count, never the denominator).
    noise_multiplier
        z, the total noise multiplier the accountant sees.
    """

    initial_clip: float
    target_quantile: float
    learning_rate: float
    count_noise_std: float
    expected_clients: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        _check_positive("initial_clip", self.initial_clip)
        gamma = float(self.target_quantile)
        if not (0.0 < gamma < 1.0):
            raise InvalidPrivacyParameter(f"target_quantile must be in (0, 1), got {gamma!r}")
        _check_positive("learning_rate", self.learning_rate)
        _check_positive("expected_clients", self.expected_clients)
        # Validates 2 σ_b > z as a side effect.
        self._update_multiplier = update_noise_multiplier(
            self.noise_multiplier, self.count_noise_std
        )
        self.clip = float(self.initial_clip)
        self.last_unclipped_fraction: float | None = None

    @property
    def update_noise_multiplier(self) -> float:
        """σ_Δ: std of the noise on the update sum is ``σ_Δ * clip`` (clip before update)."""
        return self._update_multiplier

    @property
    def effective_noise_multiplier(self) -> float:
        """z: what the accountant must be stepped with each round."""
        return float(self.noise_multiplier)

    def update_noise_std(self) -> float:
        """Std of the Gaussian noise to add to this round's sum of clipped updates."""
        return self._update_multiplier * self.clip

    def unclipped_bit(self, norm: float) -> int:
        """Client side: 1 if an update of this (pre-clipping) norm fits under the clip."""
        norm = float(norm)
        if not math.isfinite(norm) or norm < 0:
            raise NonFiniteUpdateError(f"update norm must be finite and >= 0, got {norm!r}")
        return int(norm <= self.clip)

    def update(self, unclipped_count: float, num_reports: int, rng: np.random.Generator) -> float:
        """Server side: fold one round's (exact) count of unclipped updates into C.

        Parameters
        ----------
        unclipped_count
            Σ b_i over the ``num_reports`` clients that reported this round (under secure
            aggregation this arrives already summed).
        num_reports
            How many clients reported; used to centre the bits.
        rng
            Source of the count noise.

        Returns
        -------
        float
            The new clip norm (also stored in :attr:`clip`).
        """
        count = float(unclipped_count)
        if not (math.isfinite(count) and 0 <= count <= num_reports):
            raise InvalidPrivacyParameter(
                f"unclipped_count must be in [0, num_reports={num_reports}], got {count!r}"
            )
        if num_reports < 0:
            raise InvalidPrivacyParameter(f"num_reports must be >= 0, got {num_reports}")
        # The count has sensitivity 1; its noise comes from the grid mechanism, not a float
        # Gaussian (Mironov 2012), at (1 + 1/1024) times the accounted std.
        noised, _ = discrete_gaussian_mechanism(np.array([count]), self.count_noise_std, 1.0, rng)
        centred = float(noised[0]) - 0.5 * num_reports
        fraction = centred / self.expected_clients + 0.5
        self.last_unclipped_fraction = float(fraction)
        self.clip = self.clip * math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return self.clip
