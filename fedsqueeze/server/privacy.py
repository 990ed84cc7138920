"""Server-side privacy glue: the run's DP mode, its noise, its accountant and its budget.

``build_server_privacy(config, state)`` returns None when ``dp = "none"`` and otherwise a
:class:`ServerPrivacy`, which the round loop (``fedsqueeze.server.rounds``) drives:

- ``aggregator()`` — central DP without secure aggregation: clip every decoded client delta
  to ``dp-clip`` (L2 over all tensors), sum, add Gaussian noise of std
  ``noise_multiplier * clip`` and divide by ``clients-per-round`` (DP-FedAvg's fixed
  denominator, McMahan et al. 2018: the mean is *unweighted*, so one client's number of
  examples cannot leak through the weights);
- ``refuse_round(rnd)`` — "" to go, or why the next round would overspend ``dp-epsilon``;
- ``after_round(rnd, outcome)`` — steps the accountant when the round released an
  aggregate, or computed a noised one it then dropped (``outcome.dp_released``), and
  returns ``epsilon`` (and friends) for ``metrics.jsonl``;
- ``state()`` / ``build_server_privacy(config, state)`` — checkpoint and resume;
- ``summary()`` — final ε, δ, noise multiplier, accountant for ``summary.json``.

For the secure-aggregation path it also provides ``noise_secure_sum`` (central DP on the
securely summed clipped updates) and ``distributed_params`` (distributed DP's encoding).

Accounting
----------
Central and distributed DP are *user-level*: the unit is a client, the sampling rate is
q = clients-per-round / num-clients and one round is one step of the subsampled Gaussian
mechanism, composed by Opacus's RDP or PRV accountant (``dp-accountant``). Opacus analyses
Poisson subsampling while the round loop samples exactly ``clients-per-round`` clients
without replacement; this is the usual DP-FedAvg approximation (McMahan et al. 2018, TFF).
Local DP is *sample-level*: every client runs DP-SGD with its own Opacus accountant (kept in
its ``Context.state``, see ``fedsqueeze.client.dp``) and reports its cumulative ε; the
server reports the largest ε any client has reported so far.

Order with compression (central DP, no secure aggregation)
----------------------------------------------------------
client trains → codec (sparsify/quantize, error feedback) → server decodes → **clip** →
sum → **Gaussian noise** → ÷ clients-per-round → strategy. With central DP the server is
trusted: the guarantee is about what leaves the server (the noised aggregate, and every model
after it), not about the uplink. The codec is a function of the client's own data only, so
the server may clip whatever it decoded; clipping that decoded delta bounds each client's
contribution — compression error included — by ``dp-clip``, which is all the Gaussian
mechanism needs. Noise added after clipping and before anything else is released makes every
later step (averaging, the strategy's update, the downlink codec) post-processing. Adding the
noise before the lossy stages would not help: the server must see a bounded contribution, and
only clipping *after* decoding bounds what it actually sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedsqueeze.config import ConfigError
from fedsqueeze.privacy import (
    AdaptiveClipper,
    DistributedDPParams,
    InvalidPrivacyParameter,
    PrivacyAccountant,
    clip_l2,
    default_delta,
    fedavg_sample_rate,
    gaussian_noise,
    noise_for_budget,
)

__all__ = [
    "ADAPTIVE_CLIP_LR",
    "ServerPrivacy",
    "build_server_privacy",
    "check_dp_config",
    "resolve_delta",
]

STATE_VERSION = 1
ADAPTIVE_CLIP_LR = 0.2
"""η of the geometric clip update (Andrew et al. 2021 use 0.2)."""
_NOISE_STREAM = 0xD9
_MAX_CALIBRATION_STEPS = 30

Aggregator = Callable[[int, list[dict[str, np.ndarray]], list[int]], dict[str, np.ndarray]]


def check_dp_config(config: Mapping[str, Any]) -> None:
    """Cheap consistency checks of the ``dp-*`` keys (no accountant is run here).

    Raises
    ------
    ConfigError
        On a DP setting that cannot run; the message names the key.
    """
    mode = str(config["dp"])
    if mode == "none":
        return
    if float(config["dp-noise-multiplier"]) <= 0 and float(config["dp-epsilon"]) <= 0:
        raise ConfigError(f"dp = {mode!r} needs dp-noise-multiplier > 0 or a budget dp-epsilon > 0")
    if mode == "distributed" and not bool(config["secagg"]):
        raise ConfigError("dp = 'distributed' needs secagg = true (the noise is added on clients)")
    if bool(config["dp-adaptive-clip"]):
        if mode != "central" or bool(config["secagg"]):
            raise ConfigError("dp-adaptive-clip works only with dp = 'central' and secagg = false")
        if not 0 < float(config["dp-target-quantile"]) < 1:
            raise ConfigError("dp-target-quantile must be in (0, 1) with dp-adaptive-clip")
    if mode == "local" and str(config["strategy"]) == "fedprox":
        raise ConfigError(
            "dp = 'local' cannot use strategy = 'fedprox': DP-SGD's per-sample clipping would "
            "silently drop the proximal term"
        )


def resolve_delta(config: Mapping[str, Any], num_units: int | None = None) -> float:
    """``dp-delta``, or ``min(1e-5, 1/N^1.1)`` for N privacy units (clients by default)."""
    delta = float(config["dp-delta"])
    if delta > 0:
        return delta
    n = int(config["num-clients"]) if num_units is None else int(num_units)
    return default_delta(n)


class ServerPrivacy:
    """The server's view of a DP run (see the module docstring).

    Parameters
    ----------
    config
        The resolved run config (``dp`` must not be ``"none"``).
    state
        ``state()`` of a checkpoint to resume from, or None for a new run.
    """

    def __init__(self, config: Mapping[str, Any], state: Mapping[str, Any] | None = None) -> None:
        check_dp_config(config)
        self.mode = str(config["dp"])
        self.unit = "sample" if self.mode == "local" else "user"
        self.secagg = bool(config["secagg"])
        self.seed = int(config["seed"])
        self.clients_per_round = int(config["clients-per-round"])
        self.num_clients = int(config["num-clients"])
        self.num_rounds = int(config["num-rounds"])
        self.clip = float(config["dp-clip"])
        self.budget = float(config["dp-epsilon"])
        self.mechanism = str(config["dp-accountant"])
        self.bits = int(config["dp-bits"])
        self.noise_kind = str(config["dp-mechanism"])
        self.sample_rate = fedavg_sample_rate(self.clients_per_round, self.num_clients)
        # Local DP: each client has its own delta; this one is what the server reports
        # until clients tell it theirs (and what dp-delta forces, when set).
        self.delta = resolve_delta(config)
        self.accountant = PrivacyAccountant(self.mechanism)  # type: ignore[arg-type]
        self.epsilon = 0.0
        self.max_local_delta = 0.0
        self.last_effective: float | None = None
        self.calibrated = False
        self._round_info: dict[str, Any] = {}
        self._aggregated_round = 0
        self._dist_cache: dict[tuple[int, int], DistributedDPParams] = {}

        configured_z = float(config["dp-noise-multiplier"])
        if state is not None:
            self._restore(state, configured_z)
        elif configured_z > 0:
            self.noise_multiplier = configured_z
        else:
            self.noise_multiplier = self._calibrate() if self.mode != "local" else 0.0
            self.calibrated = self.mode != "local"
        self.clipper: AdaptiveClipper | None = None
        if bool(config["dp-adaptive-clip"]):
            m = self.clients_per_round
            # Andrew et al. suggest count noise m/20; it must exceed z/2 or the count alone
            # would spend the whole budget, so it is raised to z for small cohorts.
            self.clipper = AdaptiveClipper(
                initial_clip=self.clip,
                target_quantile=float(config["dp-target-quantile"]),
                learning_rate=ADAPTIVE_CLIP_LR,
                count_noise_std=max(m / 20.0, self.noise_multiplier),
                expected_clients=m,
                noise_multiplier=self.noise_multiplier,
            )
            if state is not None and state.get("adaptive_clip") is not None:
                self.clipper.clip = float(state["adaptive_clip"])

    # ---- set-up ----------------------------------------------------------------------
    def _calibrate(self) -> float:
        """Noise multiplier that spends exactly the budget over the planned rounds."""
        try:
            return noise_for_budget(
                self.budget,
                self.delta,
                self.sample_rate,
                self.num_rounds,
                self.mechanism,  # type: ignore[arg-type]
            )
        except InvalidPrivacyParameter as err:
            raise ConfigError(f"dp-epsilon = {self.budget}: {err}") from None

    def _restore(self, state: Mapping[str, Any], configured_z: float) -> None:
        if int(state.get("version", -1)) != STATE_VERSION:
            raise ConfigError(f"privacy checkpoint has an unknown version {state.get('version')!r}")
        if state["mode"] != self.mode or state["accountant"] != self.mechanism:
            raise ConfigError(
                f"the checkpoint was made with dp = {state['mode']!r} / dp-accountant = "
                f"{state['accountant']!r}; the config says {self.mode!r} / {self.mechanism!r}"
            )
        self.accountant = PrivacyAccountant.from_list(state["history"], self.mechanism)  # type: ignore[arg-type]
        # A calibrated multiplier is kept: re-planning on resume (e.g. with more rounds)
        # would change the noise mid-run. An explicit dp-noise-multiplier wins.
        self.noise_multiplier = (
            configured_z if configured_z > 0 else float(state["noise_multiplier"])
        )
        self.calibrated = bool(state.get("calibrated", False)) and configured_z <= 0
        self.epsilon = float(state["epsilon"])
        self.max_local_delta = float(state.get("max_local_delta", 0.0))
        last = state.get("last_effective")
        self.last_effective = None if last is None else float(last)

    # ---- central DP without secure aggregation -----------------------------------------
    def aggregator(self) -> Aggregator | None:
        """The clip + sum + noise + average step for central DP without secagg, else None."""
        if self.mode != "central" or self.secagg:
            return None
        return self._aggregate

    def _round_rng(self, server_round: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, server_round, _NOISE_STREAM])

    def _aggregate(
        self, server_round: int, deltas: list[dict[str, np.ndarray]], num_examples: list[int]
    ) -> dict[str, np.ndarray]:
        if not deltas:
            raise ValueError("central DP aggregation needs at least one client delta")
        clip = self.clipper.clip if self.clipper is not None else self.clip
        total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in deltas[0].items()}
        unclipped = 0
        for delta in deltas:
            clipped, norm = clip_l2(delta, clip)
            unclipped += int(norm <= clip)
            for k in total:
                total[k] += clipped[k]
        rng = self._round_rng(server_round)
        if self.clipper is not None:
            std = self.clipper.update_noise_std()
        else:
            std = self.noise_multiplier * clip
        for k in total:
            total[k] += gaussian_noise(total[k].shape, std, rng)
        out = {k: (v / self.clients_per_round).astype(np.float32) for k, v in total.items()}
        self._round_info = {
            "dp_clip": clip,
            "dp_noise_std": std,
            "dp_unclipped_fraction": unclipped / len(deltas),
        }
        if self.clipper is not None:
            self.clipper.update(unclipped, len(deltas), rng)
        self._aggregated_round = server_round
        return out

    # ---- for the secure-aggregation path -------------------------------------------------
    def noise_secure_sum(self, sum_flat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Central DP under secagg: the float sum of clipped updates plus N(0, (z·C)²)."""
        if self.mode != "central":
            raise ValueError(f"noise_secure_sum is for dp = 'central', not {self.mode!r}")
        std = self.noise_multiplier * self.clip
        self._round_info = {"dp_clip": self.clip, "dp_noise_std": std}
        flat = np.asarray(sum_flat, dtype=np.float64)
        return flat + gaussian_noise(flat.shape, std, rng)

    def distributed_params(self, dim: int, num_clients: int) -> DistributedDPParams:
        """Distributed DP's encoding for a ``dim``-long update summed over ``num_clients``.

        With a calibrated (budget) multiplier z, the nominal multiplier is raised until the
        *effective* one (rounding inflates the sensitivity, see
        ``fedsqueeze.privacy.distributed``) reaches z, so the planned rounds fit the budget.
        An explicit ``dp-noise-multiplier`` is used as the nominal one as it is.
        """
        if self.mode != "distributed":
            raise ValueError(f"distributed_params is for dp = 'distributed', not {self.mode!r}")
        key = (int(dim), int(num_clients))
        if key in self._dist_cache:
            return self._dist_cache[key]
        z = self.noise_multiplier
        try:
            params = self._dist(dim, num_clients, z)
            if self.calibrated:
                for _ in range(_MAX_CALIBRATION_STEPS):
                    eff = params.effective_noise_multiplier()
                    if eff >= self.noise_multiplier:
                        break
                    z *= 1.001 * self.noise_multiplier / eff
                    params = self._dist(dim, num_clients, z)
        except InvalidPrivacyParameter as err:
            raise ConfigError(f"distributed DP with dp-bits = {self.bits}: {err}") from None
        self._dist_cache[key] = params
        return params

    def _dist(self, dim: int, num_clients: int, z: float) -> DistributedDPParams:
        return DistributedDPParams.for_bits(
            dim,
            self.clip,
            self.bits,
            num_clients,
            z,
            self.noise_kind,  # type: ignore[arg-type]
        )

    # ---- the round loop's hooks ----------------------------------------------------------
    def _next_multiplier(self) -> float:
        if self.mode == "distributed" and self.last_effective is not None:
            return self.last_effective
        return self.noise_multiplier

    def refuse_round(self, rnd: int) -> str:
        """Empty if round ``rnd`` may run; otherwise why it would exceed ``dp-epsilon``.

        Central/distributed: one more step at the next round's multiplier (distributed: the
        last effective one) is tried on a copy of the accountant. Local DP: each client
        enforces its own budget (it refuses to train past it), so the server never refuses.
        """
        if self.budget <= 0 or self.mode == "local":
            return ""
        trial = self.accountant.copy()
        trial.step(self._next_multiplier(), self.sample_rate)
        eps = trial.epsilon(self.delta)
        if eps > self.budget:
            return (
                f"privacy budget: round {rnd} would reach epsilon={eps:.4g} "
                f"> dp-epsilon={self.budget:g} (delta={self.delta:.3g})"
            )
        return ""

    def after_round(self, rnd: int, outcome: Any) -> dict[str, Any]:
        """Account the round; the fields it adds to the round's ``metrics.jsonl`` row."""
        info, self._round_info = self._round_info, {}
        if self.mode == "local":
            return self._after_local_round(outcome)
        z = float(outcome.extra.get("effective_noise_multiplier", self.noise_multiplier))
        # A noised aggregate (or, with adaptive clipping, a noised count) that the server
        # computed but then dropped as non-finite was still seen: that round is accounted too.
        released = (
            outcome.arrays is not None or bool(outcome.dp_released) or self._aggregated_round == rnd
        )
        row: dict[str, Any] = {"dp_noise_multiplier": z, "dp_released": released}
        if released:
            if not (math.isfinite(z) and z > 0):
                raise InvalidPrivacyParameter(f"round {rnd}: effective noise multiplier {z!r}")
            self.accountant.step(z, self.sample_rate)
            self.last_effective = z
            self.epsilon = self.accountant.epsilon(self.delta)
        row["epsilon"] = self.epsilon
        row.update(info)
        return row

    def _after_local_round(self, outcome: Any) -> dict[str, Any]:
        eps = [float(m["epsilon"]) for m in outcome.client_metrics if "epsilon" in m]
        deltas = [float(m["delta"]) for m in outcome.client_metrics if "delta" in m]
        if eps:
            self.epsilon = max(self.epsilon, max(eps))
        if deltas:
            self.max_local_delta = max(self.max_local_delta, max(deltas))
        row: dict[str, Any] = {"epsilon": self.epsilon}
        if eps:
            row["epsilon_round_max"] = max(eps)
        return row

    def state(self) -> dict[str, Any]:
        """Picklable state for the checkpoint (restored by ``build_server_privacy``)."""
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "accountant": self.mechanism,
            "history": self.accountant.to_list(),
            "noise_multiplier": self.noise_multiplier,
            "calibrated": self.calibrated,
            "epsilon": self.epsilon,
            "max_local_delta": self.max_local_delta,
            "last_effective": self.last_effective,
            "adaptive_clip": self.clipper.clip if self.clipper is not None else None,
        }

    def summary(self) -> dict[str, Any]:
        """Fields for ``summary.json``."""
        local = self.mode == "local"
        out: dict[str, Any] = {
            "epsilon": self.epsilon,
            "delta": self.max_local_delta if local and self.max_local_delta > 0 else self.delta,
            "dp_mode": self.mode,
            "dp_unit": self.unit,
            "dp_accountant": self.mechanism,
            "dp_budget": self.budget if self.budget > 0 else None,
        }
        if not local:
            out["dp_noise_multiplier"] = self.noise_multiplier
            out["dp_noise_calibrated"] = self.calibrated
            out["dp_sample_rate"] = self.sample_rate
            out["dp_rounds_accounted"] = self.accountant.total_steps
            out["dp_clip"] = self.clipper.clip if self.clipper is not None else self.clip
        return out


def build_server_privacy(
    config: Mapping[str, Any], state: Mapping[str, Any] | None = None
) -> ServerPrivacy | None:
    """The run's server privacy object, or None without DP.

    Raises
    ------
    ConfigError
        On inconsistent ``dp-*`` keys or a budget no noise multiplier can meet.
    """
    if str(config["dp"]) == "none":
        return None
    return ServerPrivacy(config, state)
