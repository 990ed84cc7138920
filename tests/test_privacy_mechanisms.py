"""Noise samplers and the randomized Hadamard rotation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.privacy import (
    InvalidPrivacyParameter,
    PrivacyError,
    RandomizedHadamard,
    ShapeMismatchError,
    discrete_gaussian,
    discrete_gaussian_variance,
    gaussian_noise,
    skellam_noise,
)

N_DRAWS = 200_000


def _variance_and_se(x: np.ndarray) -> tuple[float, float]:
    """Sample variance and its standard error, both estimated from the sample itself."""
    centred = x - x.mean()
    sq = centred**2
    return float(sq.mean()), float(sq.std() / math.sqrt(x.size))


def _dg_series(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Support and exact pmf of N_Z(0, sigma^2), by direct normalization of the series."""
    k = np.arange(-60, 61, dtype=np.float64)
    w = np.exp(-(k**2) / (2 * sigma**2))
    return k, w / w.sum()


def test_gaussian_noise_has_calibrated_std() -> None:
    std = 1.7
    x = gaussian_noise(N_DRAWS, std, np.random.default_rng(1))
    # Std of the sample-std estimator of a Gaussian is std / sqrt(2N).
    se_std = std / math.sqrt(2 * N_DRAWS)
    assert abs(x.std() - std) < 5 * se_std
    assert abs(x.mean()) < 5 * std / math.sqrt(N_DRAWS)
    assert gaussian_noise((3, 4), 0.0, np.random.default_rng(0)).tolist() == [[0.0] * 4] * 3


@pytest.mark.parametrize("mu", [0.3, 4.0])
def test_sum_of_skellam_shares_has_variance_2n_mu(mu: float) -> None:
    n = 7
    shares = skellam_noise((n, N_DRAWS), mu, np.random.default_rng(2))
    assert shares.dtype == np.int64
    total = shares.sum(axis=0)
    var, se = _variance_and_se(total.astype(np.float64))
    assert abs(var - 2 * n * mu) < 5 * se
    assert abs(total.mean()) < 5 * math.sqrt(2 * n * mu / N_DRAWS)


@pytest.mark.parametrize("sigma", [0.5, 1.3, 6.0])
def test_discrete_gaussian_variance_matches_series(sigma: float) -> None:
    k, p = _dg_series(sigma)
    assert discrete_gaussian_variance(sigma) == pytest.approx(float(np.sum(k**2 * p)), rel=1e-12)


def test_sum_of_discrete_gaussian_shares_has_exact_series_variance() -> None:
    n, sigma_i = 5, 0.5
    shares = discrete_gaussian((n, N_DRAWS), sigma_i, np.random.default_rng(3))
    assert shares.dtype == np.int64
    k, p = _dg_series(sigma_i)
    expected = n * float(np.sum(k**2 * p))
    var, se = _variance_and_se(shares.sum(axis=0).astype(np.float64))
    assert abs(var - expected) < 5 * se
    # At this small sigma the discrete Gaussian is markedly narrower than N(0, sigma^2);
    # the sampler must reproduce that, not the continuous variance.
    assert abs(var - n * sigma_i**2) > 10 * se


@pytest.mark.parametrize("sigma", [0.8, 3.2])
def test_discrete_gaussian_pmf(sigma: float) -> None:
    x = discrete_gaussian(N_DRAWS, sigma, np.random.default_rng(4))
    k, p = _dg_series(sigma)
    for value, prob in zip(k, p, strict=True):
        if prob < 1e-4:
            continue
        freq = float(np.mean(x == value))
        assert abs(freq - prob) < 5 * math.sqrt(prob * (1 - prob) / N_DRAWS), value


def test_discrete_gaussian_shapes_and_zero_sigma() -> None:
    rng = np.random.default_rng(5)
    assert discrete_gaussian((2, 3), 1.0, rng).shape == (2, 3)
    assert discrete_gaussian(0, 1.0, rng).shape == (0,)
    assert not discrete_gaussian(10, 0.0, rng).any()


@pytest.mark.parametrize(
    "call",
    [
        lambda r: gaussian_noise(3, -1.0, r),
        lambda r: gaussian_noise(3, float("nan"), r),
        lambda r: skellam_noise(3, -0.1, r),
        lambda r: discrete_gaussian(3, float("inf"), r),
        lambda r: discrete_gaussian_variance(-2.0),
    ],
)
def test_samplers_reject_bad_scale(call) -> None:
    with pytest.raises(InvalidPrivacyParameter):
        call(np.random.default_rng(0))


@settings(max_examples=40, deadline=None)
@given(
    dim=st.integers(1, 300),
    seed=st.integers(0, 2**32),
    data_seed=st.integers(0, 2**32),
)
def test_hadamard_round_trip_and_norm(dim: int, seed: int, data_seed: int) -> None:
    x = np.random.default_rng(data_seed).normal(size=dim) * 10
    rot = RandomizedHadamard(dim, seed)
    y = rot.rotate(x)
    assert y.shape == (rot.padded_dim,)
    assert rot.padded_dim >= dim and rot.padded_dim & (rot.padded_dim - 1) == 0
    assert rot.padded_dim < 2 * dim or dim == 1
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(rot.unrotate(y), x, rtol=0, atol=1e-10)


def _sylvester_hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return h


def test_hadamard_matches_explicit_matrix_and_depends_on_seed() -> None:
    dim = 12
    rot = RandomizedHadamard(dim, seed=7)
    n = rot.padded_dim
    # Columns of the rotation restricted to the first `dim` inputs.
    q = rot.rotate(np.eye(dim))  # row i = rotation of e_i
    explicit = (_sylvester_hadamard(n) @ np.diag(rot.signs) / math.sqrt(n))[:, :dim].T
    np.testing.assert_allclose(q, explicit, atol=1e-12)
    np.testing.assert_allclose(q @ q.T, np.eye(dim), atol=1e-12)
    same = RandomizedHadamard(dim, seed=7).rotate(np.arange(dim, dtype=float))
    other = RandomizedHadamard(dim, seed=8).rotate(np.arange(dim, dtype=float))
    np.testing.assert_array_equal(same, rot.rotate(np.arange(dim, dtype=float)))
    assert not np.allclose(same, other)


def test_hadamard_flattens_a_spike() -> None:
    # The point of the rotation: a one-hot vector's mass spreads over all coordinates.
    rot = RandomizedHadamard(1024, seed=3)
    y = rot.rotate(np.eye(1024)[5])
    np.testing.assert_allclose(np.abs(y), 1 / 32, rtol=1e-12)


def test_hadamard_rejects_bad_input() -> None:
    rot = RandomizedHadamard(10, seed=1)
    with pytest.raises(ShapeMismatchError):
        rot.rotate(np.zeros(11))
    with pytest.raises(ShapeMismatchError):
        rot.unrotate(np.zeros(10))
    with pytest.raises(PrivacyError):
        RandomizedHadamard(0, seed=1)
    with pytest.raises(PrivacyError):
        RandomizedHadamard(4, seed=-1)
