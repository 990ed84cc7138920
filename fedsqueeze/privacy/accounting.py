"""Privacy accounting: a thin, serializable wrapper over Opacus's accountants.

No ε formula lives here: every number comes from ``opacus.accountants.RDPAccountant`` or
``PRVAccountant`` (Poisson-subsampled Gaussian mechanism). This module only keeps the
history in a form that survives a Flower ``ConfigRecord`` or a JSON checkpoint, and adds
the budget checks the server needs to stop *before* a round that would overspend.

Opacus is imported lazily (it pulls in torch), so importing :mod:`fedsqueeze.privacy` stays
numpy-only until an ε is actually asked for.

For user-level DP-FedAvg (McMahan et al. 2018) the unit of privacy is a client: the sample
rate is ``clients_per_round / num_clients`` (:func:`fedavg_sample_rate`) and each round is
one step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal

from .errors import BudgetExceeded, InvalidPrivacyParameter

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

__all__ = [
    "BudgetExceeded",
    "Mechanism",
    "PrivacyAccountant",
    "default_delta",
    "fedavg_sample_rate",
    "history_from_list",
    "history_to_list",
    "noise_for_budget",
    "would_exceed",
]

Mechanism = Literal["rdp", "prv"]
HistoryEntry = tuple[float, float, int]


def _check_mechanism(mechanism: str) -> Mechanism:
    if mechanism not in ("rdp", "prv"):
        raise InvalidPrivacyParameter(f"mechanism must be 'rdp' or 'prv', got {mechanism!r}")
    return mechanism  # type: ignore[return-value]


def _check_noise(noise_multiplier: float) -> float:
    z = float(noise_multiplier)
    if not (math.isfinite(z) and z > 0):
        raise InvalidPrivacyParameter(
            f"noise_multiplier must be finite and > 0 (zero noise has infinite epsilon), "
            f"got {noise_multiplier!r}"
        )
    return z


def _check_rate(sample_rate: float) -> float:
    q = float(sample_rate)
    if not (math.isfinite(q) and 0 < q <= 1):
        raise InvalidPrivacyParameter(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return q


def _check_steps(steps: float) -> int:
    if isinstance(steps, bool) or float(steps) != int(steps) or int(steps) < 1:
        raise InvalidPrivacyParameter(f"steps must be a positive integer, got {steps!r}")
    return int(steps)


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not (math.isfinite(d) and 0 < d < 1):
        raise InvalidPrivacyParameter(f"delta must be in (0, 1), got {delta!r}")
    return d


def _opacus_accountant(mechanism: Mechanism) -> IAccountant:
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if mechanism == "rdp" else PRVAccountant()


class PrivacyAccountant:
    """Composition of Poisson-subsampled Gaussian steps, accounted by Opacus.

    Parameters
    ----------
    mechanism
        ``"rdp"`` (Rényi DP, Mironov et al. 2019) or ``"prv"`` (privacy random variables,
        Gopi et al. 2021; tighter, slower).

    Notes
    -----
    The history has Opacus's shape, a list of ``(noise_multiplier, sample_rate, steps)``
    with consecutive identical settings merged, so it can be handed to an Opacus
    accountant (or a ``PrivacyEngine``) unchanged.
    """

    def __init__(self, mechanism: Mechanism = "rdp") -> None:
        self.mechanism: Mechanism = _check_mechanism(mechanism)
        self._history: list[HistoryEntry] = []

    @property
    def history(self) -> list[HistoryEntry]:
        """A copy of the composed steps, ``[(noise_multiplier, sample_rate, steps), ...]``."""
        return list(self._history)

    @property
    def total_steps(self) -> int:
        """Number of steps composed so far."""
        return sum(s for _, _, s in self._history)

    def __len__(self) -> int:
        return self.total_steps

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Compose ``steps`` more steps of the subsampled Gaussian mechanism."""
        z = _check_noise(noise_multiplier)
        q = _check_rate(sample_rate)
        n = _check_steps(steps)
        if self._history and self._history[-1][:2] == (z, q):
            self._history[-1] = (z, q, self._history[-1][2] + n)
        else:
            self._history.append((z, q, n))

    def epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (0.0 before any step)."""
        delta = _check_delta(delta)
        if not self._history:
            return 0.0
        acc = _opacus_accountant(self.mechanism)
        acc.history = list(self._history)
        return float(acc.get_epsilon(delta=delta))

    def copy(self) -> PrivacyAccountant:
        """An independent accountant with the same history."""
        other = PrivacyAccountant(self.mechanism)
        other._history = list(self._history)
        return other

    def spend(
        self, noise_multiplier: float, sample_rate: float, delta: float, budget: float
    ) -> float:
        """Take one step if ε stays within ``budget``; otherwise raise and leave state alone.

        Returns
        -------
        float
            ε after the step.

        Raises
        ------
        BudgetExceeded
            If the step would push ε above ``budget`` (the history is not changed).
        """
        trial = self.copy()
        trial.step(noise_multiplier, sample_rate)
        eps = trial.epsilon(delta)
        if eps > float(budget):
            raise BudgetExceeded(eps, float(budget))
        self._history = trial._history
        return eps

    def to_list(self) -> list[float]:
        """Flat ``[z1, q1, steps1, z2, q2, steps2, ...]`` — fits a ConfigRecord or JSON."""
        return [float(v) for entry in self._history for v in entry]

    @classmethod
    def from_list(cls, values: Sequence[float], mechanism: Mechanism = "rdp") -> PrivacyAccountant:
        """Rebuild from :meth:`to_list` output, validating every entry."""
        acc = cls(mechanism)
        for z, q, n in history_from_list(values):
            acc.step(z, q, n)
        return acc


def history_from_list(values: Sequence[float]) -> list[HistoryEntry]:
    """Parse a flat ``[z, q, steps, ...]`` list into Opacus history tuples.

    Raises
    ------
    InvalidPrivacyParameter
        On a length that is not a multiple of 3 or any invalid entry.
    """
    vals = list(values)
    if len(vals) % 3:
        raise InvalidPrivacyParameter(
            f"history list length must be a multiple of 3, got {len(vals)}"
        )
    return [
        (_check_noise(vals[i]), _check_rate(vals[i + 1]), _check_steps(vals[i + 2]))
        for i in range(0, len(vals), 3)
    ]


def history_to_list(history: Iterable[tuple[float, float, int]]) -> list[float]:
    """Flatten Opacus history tuples into ``[z, q, steps, ...]`` floats."""
    return [float(v) for entry in history for v in entry]


def default_delta(num_units: int) -> float:
    """δ = min(1e-5, 1 / N^1.1) for N privacy units (clients, or local examples)."""
    if isinstance(num_units, bool) or int(num_units) != num_units or num_units < 1:
        raise InvalidPrivacyParameter(f"num_units must be a positive int, got {num_units!r}")
    return min(1e-5, 1.0 / math.pow(float(num_units), 1.1))


def fedavg_sample_rate(clients_per_round: int, num_clients: int) -> float:
    """User-level sampling rate q = clients_per_round / num_clients."""
    if not (1 <= int(clients_per_round) <= int(num_clients)):
        raise InvalidPrivacyParameter(
            f"need 1 <= clients_per_round <= num_clients, got {clients_per_round}/{num_clients}"
        )
    return int(clients_per_round) / int(num_clients)


def noise_for_budget(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    mechanism: Mechanism = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to ``epsilon_tolerance``) that keeps ε <= target.

    Delegates to ``opacus.accountants.utils.get_noise_multiplier``, whose binary search
    returns a σ whose ε is at most the target.
    """
    eps = float(target_epsilon)
    if not (math.isfinite(eps) and eps > 0):
        raise InvalidPrivacyParameter(f"target_epsilon must be finite and > 0, got {eps!r}")
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=eps,
                target_delta=_check_delta(delta),
                sample_rate=_check_rate(sample_rate),
                steps=_check_steps(steps),
                accountant=_check_mechanism(mechanism),
                epsilon_tolerance=float(epsilon_tolerance),
            )
        )
    except ValueError as exc:  # Opacus: "The privacy budget is too low."
        if isinstance(exc, InvalidPrivacyParameter):
            raise
        raise InvalidPrivacyParameter(f"no noise multiplier reaches epsilon={eps}: {exc}") from exc


def would_exceed(
    accountant: PrivacyAccountant,
    noise_multiplier: float,
    sample_rate: float,
    delta: float,
    budget: float,
) -> bool:
    """True if one more step at (noise_multiplier, sample_rate) would push ε above budget.

    Does not modify ``accountant``.
    """
    trial = accountant.copy()
    trial.step(noise_multiplier, sample_rate)
    return trial.epsilon(delta) > float(budget)
