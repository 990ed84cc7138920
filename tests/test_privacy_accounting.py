"""Accounting wrapper: ε agrees with Opacus, serialization, budgets."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedsqueeze.privacy import (
    BudgetExceeded,
    InvalidPrivacyParameter,
    PrivacyAccountant,
    default_delta,
    fedavg_sample_rate,
    noise_for_budget,
    would_exceed,
)

DELTA = 1e-5
# Two phases with different noise / rate, as when a run changes its config on resume.
SCHEDULE = [(1.1, 0.1, 30), (0.9, 0.05, 20)]


def _opacus_eps(mechanism: str, schedule: list[tuple[float, float, int]]) -> float:
    acc = RDPAccountant() if mechanism == "rdp" else PRVAccountant()
    for z, q, steps in schedule:
        for _ in range(steps):
            acc.step(noise_multiplier=z, sample_rate=q)
    return acc.get_epsilon(delta=DELTA)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_epsilon_equals_opacus(mechanism: str) -> None:
    acc = PrivacyAccountant(mechanism)  # type: ignore[arg-type]
    assert acc.epsilon(DELTA) == 0.0
    # Mix bulk and single steps: the wrapper must merge them as Opacus would.
    z, q, steps = SCHEDULE[0]
    acc.step(z, q, steps - 1)
    acc.step(z, q)
    acc.step(*SCHEDULE[1])
    assert acc.total_steps == 50
    assert acc.history == SCHEDULE
    assert acc.epsilon(DELTA) == pytest.approx(_opacus_eps(mechanism, SCHEDULE), rel=1e-9)


def test_epsilon_grows_with_steps_and_prv_is_tighter() -> None:
    rdp, prv = PrivacyAccountant("rdp"), PrivacyAccountant("prv")
    last = 0.0
    for _ in range(3):
        rdp.step(1.0, 0.1, 10)
        prv.step(1.0, 0.1, 10)
        eps = rdp.epsilon(DELTA)
        assert eps > last
        last = eps
    assert prv.epsilon(DELTA) < rdp.epsilon(DELTA)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_history_round_trips_through_json(mechanism: str) -> None:
    acc = PrivacyAccountant(mechanism)  # type: ignore[arg-type]
    for z, q, steps in SCHEDULE:
        acc.step(z, q, steps)
    flat = acc.to_list()
    assert all(isinstance(v, float) for v in flat)
    restored = PrivacyAccountant.from_list(json.loads(json.dumps(flat)), mechanism)  # type: ignore[arg-type]
    assert restored.history == acc.history
    assert restored.epsilon(DELTA) == acc.epsilon(DELTA)


@pytest.mark.parametrize(
    "bad",
    [[1.0, 0.1], [0.0, 0.1, 3.0], [1.0, 1.5, 3.0], [1.0, 0.1, 2.5], [1.0, 0.1, 0.0]],
)
def test_from_list_rejects_malformed(bad: list[float]) -> None:
    with pytest.raises(InvalidPrivacyParameter):
        PrivacyAccountant.from_list(bad)


def test_step_and_epsilon_reject_bad_input() -> None:
    acc = PrivacyAccountant()
    for args in ((0.0, 0.1), (1.0, 0.0), (1.0, 1.01), (float("nan"), 0.5)):
        with pytest.raises(InvalidPrivacyParameter):
            acc.step(*args)
    with pytest.raises(InvalidPrivacyParameter):
        acc.step(1.0, 0.1, steps=0)
    with pytest.raises(InvalidPrivacyParameter):
        acc.epsilon(0.0)
    with pytest.raises(InvalidPrivacyParameter):
        PrivacyAccountant("gdp")  # type: ignore[arg-type]
    assert acc.history == []


def test_default_delta_and_sample_rate() -> None:
    assert default_delta(100) == 1e-5  # 100^-1.1 ~ 6e-3, capped
    assert default_delta(10**6) == pytest.approx(10**-6.6)
    assert default_delta(10**6) < 1 / 10**6  # always below 1/N once N is large
    with pytest.raises(InvalidPrivacyParameter):
        default_delta(0)
    assert fedavg_sample_rate(10, 1000) == 0.01
    with pytest.raises(InvalidPrivacyParameter):
        fedavg_sample_rate(11, 10)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_noise_for_budget_then_planned_rounds_fit_and_one_more_does_not(mechanism: str) -> None:
    budget, q, rounds = 3.0, 0.2, 5
    z = noise_for_budget(budget, DELTA, q, rounds, mechanism)  # type: ignore[arg-type]
    acc = PrivacyAccountant(mechanism)  # type: ignore[arg-type]
    acc.step(z, q, rounds - 1)
    assert not would_exceed(acc, z, q, DELTA, budget)
    acc.spend(z, q, DELTA, budget)  # the last planned round: raises if the plan overspends
    eps = acc.epsilon(DELTA)
    assert budget - 0.05 < eps <= budget  # the noise is the budget-tight one
    assert would_exceed(acc, z, q, DELTA, budget)
    history = acc.history
    with pytest.raises(BudgetExceeded) as info:
        acc.spend(z, q, DELTA, budget)
    assert info.value.epsilon_after > budget
    assert acc.history == history  # refused step left no trace
    # Less noise than planned would not have fit the same rounds.
    less = PrivacyAccountant(mechanism)  # type: ignore[arg-type]
    less.step(0.9 * z, q, rounds)
    assert less.epsilon(DELTA) > budget


def test_noise_for_budget_rejects_bad_input() -> None:
    with pytest.raises(InvalidPrivacyParameter):
        noise_for_budget(0.0, DELTA, 0.1, 10)
    with pytest.raises(InvalidPrivacyParameter):
        noise_for_budget(1.0, DELTA, 0.1, 0)
    with pytest.raises(InvalidPrivacyParameter):
        noise_for_budget(1.0, 2.0, 0.1, 10)
