"""A client's own privacy floor: the least noise it accepts, set on the device.

Under distributed and local DP the server is who DP protects against, yet the server
describes the mechanism (noise multiplier, clip, field width, number of noise shares,
batch size, epochs). A client that applied whatever it is sent would add as little noise
as an active server asks for. So each device keeps a floor in its node config — set by
whoever deploys it, never by the server — and refuses a round below it:

``dp-min-noise-multiplier``  distributed DP: the *effective* noise multiplier of the
                             secure sum in the worst case the round allows (only the
                             SecAgg+ threshold's clients' noise shares in the sum, with the
                             rounding-inflated sensitivity at the described field width and
                             scale) must be at least this. One number covers a lowered z, a
                             claimed larger cohort (smaller per-client shares), a coarse scale
                             and few bits. Local DP: DP-SGD's noise multiplier must be at
                             least this.
``dp-max-epsilon``           local DP: the client's own ε ceiling; a round whose DP-SGD
                             (noise, sampling rate from the batch size, steps from the epochs)
                             would take this client's accountant past it is refused before
                             training.

Absent or empty keys mean no floor. A clip larger than expected needs no separate check:
the noise multiplier is relative to the clip, so ε does not depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .distributed import DistributedDPParams
from .errors import InvalidPrivacyParameter, PrivacyError

__all__ = ["MAX_EPSILON_KEY", "MIN_NOISE_KEY", "BelowPrivacyFloor", "PrivacyFloor"]

MIN_NOISE_KEY = "dp-min-noise-multiplier"
MAX_EPSILON_KEY = "dp-max-epsilon"


class BelowPrivacyFloor(PrivacyError):
    """The DP parameters a client was sent give less privacy than its own floor."""


def _node_float(node_config: Mapping[str, Any], key: str) -> float | None:
    raw = node_config.get(key)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise InvalidPrivacyParameter(f"node config {key} = {raw!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise InvalidPrivacyParameter(f"node config {key} = {raw!r} must be a number > 0")
    return value


@dataclass(frozen=True)
class PrivacyFloor:
    """The least privacy a device accepts (module doc); None = no floor."""

    min_noise_multiplier: float | None = None
    max_epsilon: float | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> PrivacyFloor:
        """Read the floor from a node config (absent keys: no floor).

        Raises
        ------
        InvalidPrivacyParameter
            A key holds something other than a positive number.
        """
        return cls(
            _node_float(node_config, MIN_NOISE_KEY), _node_float(node_config, MAX_EPSILON_KEY)
        )

    def check_distributed(self, params: DistributedDPParams, min_contributors: int) -> None:
        """Refuse a distributed-DP encoding whose sum, over as few as ``min_contributors``
        noise shares (the SecAgg+ threshold), is noised less than the floor."""
        if self.min_noise_multiplier is None:
            return
        worst = max(1, min(int(min_contributors), params.num_clients))
        z = params.effective_noise_multiplier(worst)
        if z < self.min_noise_multiplier:
            raise BelowPrivacyFloor(
                f"distributed DP: the secure sum of {worst} clients would carry an effective "
                f"noise multiplier of {z:.4g}, below this device's {MIN_NOISE_KEY} = "
                f"{self.min_noise_multiplier:g}"
            )

    def check_local(self, noise_multiplier: float, epsilon_after: float) -> None:
        """Refuse a DP-SGD round with less noise, or a higher resulting ε, than the floor."""
        if self.min_noise_multiplier is not None and noise_multiplier < self.min_noise_multiplier:
            raise BelowPrivacyFloor(
                f"local DP: noise multiplier {noise_multiplier:.4g} is below this device's "
                f"{MIN_NOISE_KEY} = {self.min_noise_multiplier:g}"
            )
        if self.max_epsilon is not None and epsilon_after > self.max_epsilon:
            raise BelowPrivacyFloor(
                f"local DP: this round would take the device to epsilon = {epsilon_after:.4g}, "
                f"above its {MAX_EPSILON_KEY} = {self.max_epsilon:g}"
            )
