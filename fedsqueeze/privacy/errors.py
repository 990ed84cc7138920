"""Typed errors of the privacy core.

Every error a caller can cause with bad input derives from :class:`PrivacyError`, itself a
``ValueError``, so the CLI can report it as one clear line (exit status 2) and the server can
drop a malformed update without catching unrelated bugs.
"""

from __future__ import annotations


class PrivacyError(ValueError):
    """Base class for invalid input to the privacy core."""


class InvalidPrivacyParameter(PrivacyError):
    """A privacy parameter (noise, clip, rate, delta, bits, ...) is out of its valid range."""


class NonFiniteUpdateError(PrivacyError):
    """An update contains NaN or Inf; it cannot be clipped or noised meaningfully."""


class ShapeMismatchError(PrivacyError):
    """An array does not have the dimension the mechanism was configured for."""


class BitWidthTooSmall(PrivacyError):
    """The secure-aggregation field Z_{2^b} cannot hold the noisy sum with the requested margin."""


class RoundingFailed(PrivacyError):
    """Conditional stochastic rounding did not meet its norm bound within the retry limit."""


class BudgetExceeded(RuntimeError):
    """Taking the next step would push ε past the privacy budget.

    Not a ``ValueError``: the input is valid, the run simply has no budget left. The server
    catches it to stop cleanly *before* the round that would overspend.
    """

    def __init__(self, epsilon_after: float, budget: float) -> None:
        super().__init__(
            f"privacy budget exceeded: the next step would reach epsilon={epsilon_after:.4g} "
            f"> budget {budget:.4g}"
        )
        self.epsilon_after = epsilon_after
        self.budget = budget
