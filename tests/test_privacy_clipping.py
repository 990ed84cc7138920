"""L2 clipping and the adaptive (quantile) clipper."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from opacus.accountants import RDPAccountant

from fedsqueeze.privacy import (
    AdaptiveClipper,
    InvalidPrivacyParameter,
    NonFiniteUpdateError,
    clip_l2,
    effective_noise_multiplier,
    l2_norm,
    update_noise_multiplier,
)

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
update_st = st.dictionaries(
    st.sampled_from(["w", "b", "conv.weight"]),
    arrays(np.float32, st.integers(0, 20), elements=finite),
    min_size=1,
)


@settings(max_examples=50, deadline=None)
@given(update=update_st, clip=st.floats(1e-3, 1e3))
def test_clip_l2_properties(update: dict[str, np.ndarray], clip: float) -> None:
    flat = np.concatenate([a.astype(np.float64).ravel() for a in update.values()])
    norm = float(np.linalg.norm(flat))
    assert l2_norm(update) == pytest.approx(norm, rel=1e-9, abs=1e-12)

    clipped, reported = clip_l2(update, clip)
    assert reported == pytest.approx(norm, rel=1e-9, abs=1e-12)
    assert set(clipped) == set(update)
    for name, arr in clipped.items():
        assert arr.dtype == update[name].dtype and arr.shape == update[name].shape
    new_flat = np.concatenate([a.astype(np.float64).ravel() for a in clipped.values()])
    if norm <= clip:
        np.testing.assert_array_equal(new_flat, flat)
    else:
        assert np.linalg.norm(new_flat) == pytest.approx(clip, rel=1e-5)
        # Same direction: a positive multiple of the original.
        np.testing.assert_allclose(new_flat, flat * (clip / norm), rtol=1e-5, atol=1e-6)


def test_clip_does_not_mutate_input() -> None:
    update = {"w": np.full(4, 3.0, dtype=np.float32)}
    clip_l2(update, 1.0)
    np.testing.assert_array_equal(update["w"], np.full(4, 3.0))


def test_clip_rejects_bad_input() -> None:
    with pytest.raises(NonFiniteUpdateError):
        clip_l2({"w": np.array([1.0, np.nan])}, 1.0)
    with pytest.raises(NonFiniteUpdateError):
        l2_norm({"w": np.array([np.inf])})
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(InvalidPrivacyParameter):
            clip_l2({"w": np.ones(2)}, bad)


@settings(max_examples=30, deadline=None)
@given(z=st.floats(0.3, 5.0), extra=st.floats(1.01, 20.0))
def test_noise_split_inverts(z: float, extra: float) -> None:
    sigma_b = extra * z / 2  # any sigma_b with 2 sigma_b > z
    s_delta = update_noise_multiplier(z, sigma_b)
    assert s_delta > z
    assert effective_noise_multiplier(s_delta, sigma_b) == pytest.approx(z, rel=1e-9)


@pytest.mark.parametrize("z, sigma_b", [(1.0, 5.0), (0.7, 0.5)])
def test_noise_split_matches_composition_in_opacus(z: float, sigma_b: float) -> None:
    # Releasing the update sum (multiplier sigma_delta) and the centred count (noise sigma_b,
    # sensitivity 1/2, i.e. multiplier 2 sigma_b) must cost exactly one Gaussian at z.
    s_delta = update_noise_multiplier(z, sigma_b)
    pair, single = RDPAccountant(), RDPAccountant()
    for _ in range(3):
        pair.step(noise_multiplier=s_delta, sample_rate=1.0)
        pair.step(noise_multiplier=2 * sigma_b, sample_rate=1.0)
        single.step(noise_multiplier=z, sample_rate=1.0)
    assert pair.get_epsilon(1e-5) == pytest.approx(single.get_epsilon(1e-5), rel=1e-6)


def test_noise_split_rejects_too_little_count_noise() -> None:
    with pytest.raises(InvalidPrivacyParameter):
        update_noise_multiplier(1.0, 0.5)  # 2 sigma_b == z
    with pytest.raises(InvalidPrivacyParameter):
        AdaptiveClipper(1.0, 0.5, 0.2, count_noise_std=0.1, expected_clients=10, noise_multiplier=1)


def _clipper(**kw: float) -> AdaptiveClipper:
    args = dict(
        initial_clip=0.1,
        target_quantile=0.5,
        learning_rate=0.2,
        count_noise_std=2.5,
        expected_clients=50,
        noise_multiplier=1.0,
    )
    args.update(kw)
    return AdaptiveClipper(**args)  # type: ignore[arg-type]


def test_adaptive_clip_moves_the_right_way() -> None:
    rng = np.random.default_rng(0)
    c = _clipper(count_noise_std=0.6)
    start = c.clip
    c.update(unclipped_count=50, num_reports=50, rng=rng)  # all fit: clip too large
    assert c.clip < start
    low = c.clip
    c.update(unclipped_count=0, num_reports=50, rng=rng)  # none fit: clip too small
    assert c.clip > low
    # With all updates unclipped the noiseless step is exp(-eta (1 - gamma)).
    assert low / start == pytest.approx(math.exp(-0.2 * 0.5), rel=0.05)


@pytest.mark.parametrize("quantile", [0.3, 0.8])
def test_adaptive_clip_tracks_quantile(quantile: float) -> None:
    rng = np.random.default_rng(1)
    c = _clipper(target_quantile=quantile)
    for _ in range(300):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=50)
        bits = [c.unclipped_bit(v) for v in norms]
        c.update(sum(bits), len(bits), rng)
    # Fraction of the norm distribution under the final clip.
    reference = rng.lognormal(mean=0.0, sigma=0.5, size=100_000)
    assert abs(float(np.mean(reference <= c.clip)) - quantile) < 0.1


def test_adaptive_clipper_noise_and_errors() -> None:
    c = _clipper()
    assert c.effective_noise_multiplier == 1.0
    assert c.update_noise_std() == pytest.approx(update_noise_multiplier(1.0, 2.5) * c.clip)
    assert c.unclipped_bit(0.05) == 1 and c.unclipped_bit(0.2) == 0
    with pytest.raises(InvalidPrivacyParameter):
        c.update(51, 50, np.random.default_rng(0))
    with pytest.raises(NonFiniteUpdateError):
        c.unclipped_bit(float("nan"))
    with pytest.raises(InvalidPrivacyParameter):
        _clipper(target_quantile=1.0)
