"""Central DP's noise is safe against floating-point attacks (Mironov 2012).

The adversary sees one released value ``y = x + noise`` and knows the two neighbouring
inputs x, x'. With float Gaussian noise the set of floats ``x + N`` can produce depends on x,
so y can rule one neighbour out. The grid mechanism releases g times an integer: its support
is g·Z for every input. The distribution tests are property tests over sigma and seed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.privacy import (
    AdaptiveClipper,
    InvalidPrivacyParameter,
    discrete_gaussian,
    discrete_gaussian_mechanism,
    discrete_gaussian_variance,
    gaussian_noise,
)
from fedsqueeze.privacy.mechanisms import GRID_RESOLUTION

N = 20_000
SIGMAS = st.one_of(st.floats(0.3, 10.0), st.floats(10.0, 1e7))


def _looks_like(x: np.ndarray, sigma: float) -> bool:
    """Mean 0, the exact N_Z(0, sigma²) variance and symmetry, each within ~6 standard errors
    (estimated from the sample: for small sigma the draws are mostly 0, heavy-tailed in x²)."""
    var = discrete_gaussian_variance(sigma)
    sq = x * x
    var_se = float(sq.std()) / math.sqrt(x.size)
    pos, neg = int(np.sum(x > 0)), int(np.sum(x < 0))
    return (
        abs(float(x.mean())) < 6 * math.sqrt(var / x.size)
        and abs(float(sq.mean()) - var) < 6 * var_se + 1e-12
        and abs(pos - neg) < 6 * math.sqrt(pos + neg) + 1
    )


@settings(max_examples=25, deadline=None)
@given(sigma=SIGMAS, seed=st.integers(0, 2**32 - 1))
def test_discrete_gaussian_mean_variance_and_symmetry(sigma: float, seed: int) -> None:
    x = discrete_gaussian(N, sigma, np.random.default_rng(seed)).astype(np.float64)
    assert np.array_equal(x, np.round(x))
    assert _looks_like(x, sigma)


def test_property_bounds_catch_a_wrong_sampler() -> None:
    """The bounds above are not vacuous: a sampler 5% too wide, shifted by 0.1 sd, or
    one-sided fails them."""
    rng = np.random.default_rng(0)
    assert _looks_like(discrete_gaussian(N, 50.0, rng).astype(np.float64), 50.0)
    assert not _looks_like(discrete_gaussian(N, 52.5, rng).astype(np.float64), 50.0)
    assert not _looks_like(discrete_gaussian(N, 50.0, rng).astype(np.float64) + 5, 50.0)
    skewed = np.abs(discrete_gaussian(N, 0.5, rng)).astype(np.float64)
    assert not _looks_like(skewed, 0.5)


@settings(max_examples=25, deadline=None)
@given(
    z=st.floats(0.3, 20.0),
    sens=st.floats(1e-3, 1e3),
    d=st.integers(1, 3000),
    seed=st.integers(0, 2**32 - 1),
    offset=st.floats(-1e3, 1e3),
)
def test_mechanism_releases_grid_points_with_the_accounted_std(
    z: float, sens: float, d: int, seed: int, offset: float
) -> None:
    rng = np.random.default_rng(seed)
    x = offset + rng.normal(size=d) * sens
    out, std = discrete_gaussian_mechanism(x, z, sens, rng)
    assert std == pytest.approx(z * sens * (1 + 1 / GRID_RESOLUTION), rel=1e-12)
    step = sens / (GRID_RESOLUTION * math.sqrt(d))
    k = out / step
    assert np.allclose(k, np.round(k), rtol=0, atol=1e-6 * np.maximum(1, np.abs(k)))
    if d >= 500:
        noise = out - x
        assert abs(noise.mean()) < 6 * std / math.sqrt(d)
        assert abs(noise.std() / std - 1) < 6 * math.sqrt(2 / d)


def test_release_support_does_not_depend_on_the_input() -> None:
    """Neighbours x = 0 and x' = 2^-30 (a sum with and without a tiny last update). The
    float release ``x + N`` can take values the other cannot (Mironov's attack tests which
    set y falls in); the grid release of either is g times an integer — one lattice."""
    rng = np.random.default_rng(5)
    d = 1000
    step = 1.0 / (GRID_RESOLUTION * math.sqrt(d))  # sensitivity 1

    def on_lattice(v: np.ndarray) -> bool:
        k = v / step
        return bool(np.allclose(k, np.round(k), rtol=0, atol=1e-6))

    for value in (0.0, 2.0**-30):
        out, _ = discrete_gaussian_mechanism(np.full(d, value), 1.0, 1.0, rng)
        assert on_lattice(out)
        # The float Gaussian's release is on no input-independent lattice.
        assert not on_lattice(value + gaussian_noise(d, 1.0, rng))


def test_mechanism_zero_noise_and_bad_input() -> None:
    rng = np.random.default_rng(0)
    x = np.arange(5.0)
    out, std = discrete_gaussian_mechanism(x, 0.0, 1.0, rng)
    assert std == 0 and np.array_equal(out, x)
    with pytest.raises(InvalidPrivacyParameter):
        discrete_gaussian_mechanism(np.array([np.nan]), 1.0, 1.0, rng)
    with pytest.raises(InvalidPrivacyParameter):
        discrete_gaussian_mechanism(x, -1.0, 1.0, rng)
    with pytest.raises(InvalidPrivacyParameter, match="too large"):
        discrete_gaussian_mechanism(np.array([1e300]), 1.0, 1.0, rng)


def test_adaptive_clipping_count_noise_is_on_the_integer_grid() -> None:
    clipper = AdaptiveClipper(
        initial_clip=1.0, target_quantile=0.5, learning_rate=0.2, count_noise_std=2.0,
        expected_clients=10, noise_multiplier=1.0,
    )  # fmt: skip
    for _ in range(20):
        clipper.update(4, 10, np.random.default_rng())
        assert clipper.last_unclipped_fraction is not None
        noised_count = (clipper.last_unclipped_fraction - 0.5) * 10 + 5
        step = 1.0 / GRID_RESOLUTION
        assert abs(noised_count / step - round(noised_count / step)) < 1e-6
