"""Differential privacy as strategy wrappers: one small class per mode, one interface.

In the shape of Opacus's accountants: :class:`DPStrategy` holds what every mode shares (the
accountant, the budget, calibration, checkpoint state, ε in the round's MetricRecord) and
each mode says only where its noise comes from.

- :class:`CentralDP` (user level, trusted server) — each client's update is clipped to
  ``clip`` (L2 over all tensors), the server sums, adds N(0, (z·C)²) and divides by
  ``clients_per_round`` (DP-FedAvg's fixed denominator: the mean is *unweighted*, so a
  client's number of examples cannot leak through the weights). Without secure aggregation
  the server clips the decoded updates (``CompressedStrategy(CentralDP(FedAvg()))``); inside
  ``SecAggStrategy`` clients clip and the server noises the secure sum.
- :class:`DistributedDP` (user level, the server only sees a noised secure sum) — clients
  add their share of discrete noise before masking; only directly inside ``SecAggStrategy``.
- :class:`LocalDP` (sample level, untrusted server) — clients run DP-SGD with their own
  Opacus accountant; this wrapper reports the largest ε a client has reported.

Accounting: q = clients_per_round / num_clients, one step of the subsampled Gaussian
mechanism per round in which the server computed a noised aggregate (even if that aggregate
was then dropped as non-finite), composed by Opacus's RDP or PRV accountant. Opacus analyses
Poisson subsampling while clients are sampled without replacement — the usual DP-FedAvg
approximation. Distributed DP is accounted as the Gaussian mechanism with the effective
multiplier of the summed discrete noise over the rounding-inflated sensitivity.

Order with compression (central DP, no secure aggregation): client trains → codec → server
decodes → **clip** → sum → **noise** → ÷ clients_per_round → strategy. The server is trusted
under central DP; clipping what it decoded bounds each client's contribution (compression
error included), and everything after the noise is post-processing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsqueeze.contracts.checks import ConfigError
from fedsqueeze.contracts.records import RecordNames, from_record, single_metrics
from fedsqueeze.contracts.streams import Stream, round_rng
from fedsqueeze.contracts.summable import (
    DistributedDPSum,
    SummableEncoding,
    choose_integer_encoding,
)
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
from fedsqueeze.server.compose import (
    FLOWER_DP,
    StrategyCompositionError,
    below,
    refuse_below,
)
from fedsqueeze.server.hooks import RoundHook
from fedsqueeze.server.strategy import CompressedStrategy, mean_metric, merge_delta

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
STATE_VERSION = 2
ADAPTIVE_CLIP_LR = 0.2
"""η of the geometric clip update (Andrew et al. 2021 use 0.2)."""
_MAX_CALIBRATION_STEPS = 30


def _refuse_aggregators_below(wrapper: Strategy) -> None:
    refuse_below(
        wrapper,
        (CompressedStrategy, DPStrategy, LocalDP, *FLOWER_DP),
        "DP wrappers go inside the wrapper that decodes or securely sums, one DP mode per "
        "chain: CompressedStrategy(CentralDP(FedAvg())) or SecAggStrategy(CentralDP(...))",
    )
    if any(getattr(s, "secure_sum", False) for s in below(wrapper)):
        raise StrategyCompositionError(
            f"{type(wrapper).__name__} cannot wrap SecAggStrategy: put it inside, "
            f"SecAggStrategy({type(wrapper).__name__}(FedAvg(...)))"
        )


def _check_checkpoint(state: dict[str, Any], mode: str, mechanism: str) -> None:
    """Refuse privacy state saved by another DP mode, accountant or state version."""
    if int(state.get("version", -1)) != STATE_VERSION:
        raise ConfigError(f"privacy checkpoint has an unknown version {state.get('version')!r}")
    if state["mode"] != mode or state["accountant"] != mechanism:
        raise ConfigError(
            f"the checkpoint was made with dp = {state['mode']!r} / dp-accountant = "
            f"{state['accountant']!r}; the config says {mode!r} / {mechanism!r}"
        )


class _Delegating(Strategy):
    """Evaluation and summary pass through to ``self.inner``."""

    inner: Strategy

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log.info("%s", type(self).__name__)
        self.inner.summary()


class _PrivacyHook(RoundHook):
    """The round-hook side every DP mode shares: ε and the round's fields in the row."""

    mode = ""
    hook_name = "privacy"
    mechanism: str
    epsilon: float
    report: dict[str, Any]

    def after_round(self, server_round: int, row: dict[str, Any]) -> None:
        row.update(self.report)
        row["epsilon"] = self.epsilon

    def state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "accountant": self.mechanism,
            "epsilon": self.epsilon,
        }


class DPStrategy(_Delegating, _PrivacyHook):
    """What every user-level DP mode shares: accountant, budget, calibration, state.

    Parameters
    ----------
    inner
        The strategy that applies the noised mean (FedAvg and its family).
    clip
        L2 bound of one client's update.
    clients_per_round, num_clients
        Sampled clients per round (the fixed denominator) and the population.
    noise_multiplier
        z; 0 with an ``epsilon`` budget calibrates z for ``num_rounds`` rounds.
    epsilon
        Budget: the run stops before a round that would exceed it (0 = none).
    num_rounds
        Rounds planned (for calibration only).
    delta
        δ; 0 = ``min(1e-5, 1/num_clients^1.1)``.
    accountant
        ``"rdp"`` or ``"prv"`` (Opacus).
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        clip: float,
        clients_per_round: int,
        num_clients: int,
        noise_multiplier: float = 0.0,
        epsilon: float = 0.0,
        num_rounds: int = 0,
        delta: float = 0.0,
        accountant: str = "rdp",
    ) -> None:
        self.inner = inner
        _refuse_aggregators_below(self)
        if noise_multiplier <= 0 and epsilon <= 0:
            raise ConfigError(f"dp = {self.mode!r} needs a noise multiplier > 0 or a budget > 0")
        self.names = RecordNames.of(inner)
        self.clip = float(clip)
        self.clients_per_round = int(clients_per_round)
        self.num_rounds = int(num_rounds)
        self.budget = float(epsilon)
        self.mechanism = accountant
        self.sample_rate = fedavg_sample_rate(self.clients_per_round, int(num_clients))
        self.delta = float(delta) if delta > 0 else default_delta(int(num_clients))
        self.accountant = PrivacyAccountant(accountant)  # type: ignore[arg-type]
        self.epsilon = 0.0
        self.calibrated = noise_multiplier <= 0
        self.noise_multiplier = float(noise_multiplier) if noise_multiplier > 0 else 0.0
        if self.calibrated:
            self.noise_multiplier = self._calibrate()
        self.secure = False
        self._global: Arrays = {}
        self.report: dict[str, Any] = {}

    def attach_secure_sum(self) -> None:
        """Called by the ``SecAggStrategy`` directly outside: the sum arrives securely."""
        self.secure = True

    def _calibrate(self) -> float:
        """Noise multiplier that spends exactly the budget over the planned rounds."""
        if self.num_rounds < 1:
            raise ConfigError("a dp epsilon budget without a noise multiplier needs num_rounds")
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

    # ---- accounting ---------------------------------------------------------------------
    def next_multiplier(self) -> float:
        """The multiplier the next round will be accounted with."""
        return self.noise_multiplier

    def before_round(self, server_round: int) -> str:
        """Empty if the round may run; otherwise why it would exceed the budget."""
        if self.budget <= 0:
            return ""
        trial = self.accountant.copy()
        trial.step(self.next_multiplier(), self.sample_rate)
        eps = trial.epsilon(self.delta)
        if eps > self.budget:
            return (
                f"privacy budget: round {server_round} would reach epsilon={eps:.4g} "
                f"> dp-epsilon={self.budget:g} (delta={self.delta:.3g})"
            )
        return ""

    def _release(self, z: float, metrics: MetricRecord | None, **fields: Any) -> MetricRecord:
        """Account one noised aggregate; ε goes into the round's MetricRecord and report."""
        if not (math.isfinite(z) and z > 0):
            raise InvalidPrivacyParameter(f"noise multiplier {z!r}")
        self.accountant.step(z, self.sample_rate)
        self.epsilon = self.accountant.epsilon(self.delta)
        self.report = {"dp_noise_multiplier": z, "dp_released": True, **fields}
        out = metrics if metrics is not None else MetricRecord()
        out["epsilon"] = float(self.epsilon)
        out["delta"] = float(self.delta)
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        refusal = self.before_round(server_round)
        if refusal:
            log.warning("round %d not run: %s", server_round, refusal)
            return []
        self._global = from_record(arrays)
        self.report = {"dp_noise_multiplier": self.next_multiplier(), "dp_released": False}
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if len(messages) > self.clients_per_round:
            # The accountant's q and the fixed denominator assume at most that many.
            raise ValueError(
                f"round {server_round}: the strategy sampled {len(messages)} clients, but "
                f"{type(self).__name__}(clients_per_round={self.clients_per_round}) accounts "
                "for at most that many; sample fewer or raise clients_per_round"
            )
        return messages

    def state(self) -> dict[str, Any]:
        return {
            **super().state(),
            "history": self.accountant.to_list(),
            "noise_multiplier": self.noise_multiplier,
            "calibrated": self.calibrated,
        }

    def restore(self, state: dict[str, Any]) -> None:
        _check_checkpoint(state, self.mode, self.mechanism)
        self.accountant = PrivacyAccountant.from_list(state["history"], self.mechanism)  # type: ignore[arg-type]
        # A calibrated multiplier is kept: re-planning on resume (e.g. with more rounds)
        # would change the noise mid-run. An explicit multiplier wins.
        if self.calibrated and state.get("calibrated", False):
            self.noise_multiplier = float(state["noise_multiplier"])
        self.epsilon = float(state["epsilon"])

    def summary_fields(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "dp_mode": self.mode,
            "dp_unit": "user",
            "dp_accountant": self.mechanism,
            "dp_budget": self.budget if self.budget > 0 else None,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_noise_calibrated": self.calibrated,
            "dp_sample_rate": self.sample_rate,
            "dp_rounds_accounted": self.accountant.total_steps,
            "dp_clip": self.clip,
        }


class CentralDP(DPStrategy):
    """Central DP: clip each client's update, noise the sum, divide by clients_per_round.

    ``noise_seed`` makes the noise reproducible from the run seed (fedsqueeze's own app
    uses it for bit-identical resume; anyone who knows the seed can then remove the noise).
    ``None`` draws it from OS entropy. ``adaptive_quantile`` in (0, 1) tracks that quantile
    of the update norms (Andrew et al. 2021; not under secure aggregation).
    """

    mode = "central"

    def __init__(
        self,
        inner: Strategy,
        *,
        noise_seed: int | None = None,
        adaptive_quantile: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(inner, **kwargs)
        self.noise_seed = noise_seed
        self.adaptive_quantile = float(adaptive_quantile)
        self.clipper = self._new_clipper(self.clip) if adaptive_quantile else None

    def _new_clipper(self, clip: float) -> AdaptiveClipper:
        """An adaptive clipper at ``clip`` that splits the current noise multiplier."""
        m = self.clients_per_round
        # Andrew et al. suggest count noise m/20; it must exceed z/2 or the count alone
        # would spend the whole budget, so it is raised to z for small cohorts.
        return AdaptiveClipper(
            initial_clip=clip,
            target_quantile=self.adaptive_quantile,
            learning_rate=ADAPTIVE_CLIP_LR,
            count_noise_std=max(m / 20.0, self.noise_multiplier),
            expected_clients=m,
            noise_multiplier=self.noise_multiplier,
        )

    def attach_secure_sum(self) -> None:
        if self.clipper is not None:
            raise StrategyCompositionError("adaptive clipping does not work under SecAggStrategy")
        super().attach_secure_sum()

    def _rng(self, server_round: int) -> np.random.Generator:
        if self.noise_seed is None:
            return np.random.default_rng()
        return round_rng(self.noise_seed, server_round, Stream.CENTRAL_DP_NOISE)

    def summable_encoding(
        self, *, dim: int, num_clients: int, bits: int, scale: float, rotation_seed: int
    ) -> SummableEncoding:
        """Clients clip to ``clip`` and send the unweighted sum."""
        return choose_integer_encoding(
            dim=dim, num_clients=num_clients, clip=self.clip, bits=bits, scale=scale
        )

    def _noised_mean(
        self, total: Mapping[str, np.ndarray], std: float, rng: np.random.Generator
    ) -> Arrays:
        return {
            k: (np.asarray(v, np.float64) + gaussian_noise(np.shape(v), std, rng))
            / self.clients_per_round
            for k, v in total.items()
        }

    def aggregate_secure_sum(
        self,
        server_round: int,
        total: Arrays,
        contributors: int,
        template: Message,
        metrics: Mapping[str, float],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        std = self.noise_multiplier * self.clip
        mean = self._noised_mean(total, std, self._rng(server_round))
        arrays, out = merge_delta(
            self.inner, server_round, self._global, mean, template, self.names, metrics
        )
        return arrays, self._release(
            self.noise_multiplier, out, dp_clip=self.clip, dp_noise_std=std
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        usable = [m for m in replies if not m.has_error() and self.names.arrays in m.content]
        if not usable:
            return None, None
        clip = self.clipper.clip if self.clipper is not None else self.clip
        total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in self._global.items()}
        unclipped = 0
        rows = []
        for msg in usable:
            local = from_record(msg.content.array_records[self.names.arrays])
            clipped, norm = clip_l2({k: local[k] - self._global[k] for k in total}, clip)
            unclipped += int(norm <= clip)
            for k in total:
                total[k] += clipped[k]
            metrics = single_metrics(msg.content)
            if metrics is not None:
                rows.append({k: float(v) for k, v in metrics[1].items() if k == "train-loss"})
        std = self.clipper.update_noise_std() if self.clipper else self.noise_multiplier * clip
        rng = self._rng(server_round)  # one stream: the count noise continues it
        mean = self._noised_mean(total, std, rng)
        if self.clipper is not None:
            self.clipper.update(unclipped, len(usable), rng)
        arrays, out = merge_delta(
            self.inner,
            server_round,
            self._global,
            mean,
            usable[0],
            self.names,
            mean_metric(rows, "train-loss"),
        )
        return arrays, self._release(
            self.noise_multiplier,
            out,
            dp_clip=clip,
            dp_noise_std=std,
            dp_unclipped_fraction=unclipped / len(usable),
        )

    def state(self) -> dict[str, Any]:
        return {**super().state(), "adaptive_clip": self.clipper.clip if self.clipper else None}

    def restore(self, state: dict[str, Any]) -> None:
        super().restore(state)
        if self.clipper is not None:
            # Rebuilt: the restored multiplier (kept from the checkpoint's calibration) may
            # differ from the one this wrapper was built with, and the clipper's split of
            # the noise between update sum and count must follow what the accountant charges.
            clip = state.get("adaptive_clip")
            self.clipper = self._new_clipper(self.clipper.clip if clip is None else float(clip))

    def summary_fields(self) -> dict[str, Any]:
        out = super().summary_fields()
        if self.clipper is not None:
            out["dp_clip"] = self.clipper.clip
        return out


class DistributedDP(DPStrategy):
    """Distributed DP: clients add discrete noise before masking (inside ``SecAggStrategy``).

    ``bits`` is the field width of the noised sum; ``mechanism`` ``"skellam"`` or
    ``"dgauss"``. With a calibrated (budget) multiplier z the nominal multiplier is raised
    until the *effective* one (rounding inflates the sensitivity) reaches z.
    """

    mode = "distributed"

    def __init__(
        self, inner: Strategy, *, bits: int = 16, mechanism: str = "skellam", **kwargs: Any
    ) -> None:
        super().__init__(inner, **kwargs)
        self.bits = int(bits)
        self.noise_kind = mechanism
        self.last_effective: float | None = None
        self._params: dict[tuple[int, int], DistributedDPParams] = {}
        self._round_params: DistributedDPParams | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.secure:
            raise StrategyCompositionError(
                "DistributedDP works only directly inside SecAggStrategy: "
                "SecAggStrategy(DistributedDP(FedAvg(...)), ...)"
            )
        return super().configure_train(server_round, arrays, config, grid)

    def next_multiplier(self) -> float:
        return self.last_effective if self.last_effective is not None else self.noise_multiplier

    def params(self, dim: int, num_clients: int) -> DistributedDPParams:
        """The encoding's parameters for a ``dim``-long update summed over ``num_clients``."""
        key = (int(dim), int(num_clients))
        if key not in self._params:
            z = self.noise_multiplier
            try:
                params = self._for(dim, num_clients, z)
                if self.calibrated:
                    for _ in range(_MAX_CALIBRATION_STEPS):
                        eff = params.effective_noise_multiplier()
                        if eff >= self.noise_multiplier:
                            break
                        z *= 1.001 * self.noise_multiplier / eff
                        params = self._for(dim, num_clients, z)
            except InvalidPrivacyParameter as err:
                raise ConfigError(f"distributed DP with dp-bits = {self.bits}: {err}") from None
            self._params[key] = params
        return self._params[key]

    def _for(self, dim: int, num_clients: int, z: float) -> DistributedDPParams:
        return DistributedDPParams.for_bits(
            dim,
            self.clip,
            self.bits,
            num_clients,
            z,
            self.noise_kind,  # type: ignore[arg-type]
        )

    def summable_encoding(
        self, *, dim: int, num_clients: int, bits: int, scale: float, rotation_seed: int
    ) -> SummableEncoding:
        if bits and bits != self.bits:
            log.warning("secagg bits = %s ignored: distributed DP uses bits = %d", bits, self.bits)
        self._round_params = self.params(dim, num_clients)
        return DistributedDPSum(self._round_params, rotation_seed)

    def aggregate_secure_sum(
        self,
        server_round: int,
        total: Arrays,
        contributors: int,
        template: Message,
        metrics: Mapping[str, float],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._round_params is not None
        z = float(self._round_params.effective_noise_multiplier(contributors))
        mean = {k: v / self.clients_per_round for k, v in total.items()}
        arrays, out = merge_delta(
            self.inner, server_round, self._global, mean, template, self.names, metrics
        )
        self.last_effective = z
        return arrays, self._release(z, out, effective_noise_multiplier=z, dp_clip=self.clip)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        raise StrategyCompositionError("DistributedDP aggregates only secure sums")

    def state(self) -> dict[str, Any]:
        return {**super().state(), "last_effective": self.last_effective}

    def restore(self, state: dict[str, Any]) -> None:
        super().restore(state)
        last = state.get("last_effective")
        self.last_effective = None if last is None else float(last)


class LocalDP(_Delegating, _PrivacyHook):
    """Local DP (DP-SGD on every client): reports the largest ε any client has reported.

    Reads the ``epsilon``/``delta`` metrics of the clients' replies, so it goes outside
    every other wrapper (it changes nothing).
    """

    mode = "local"

    def __init__(self, inner: Strategy, *, accountant: str = "rdp", delta: float = 0.0) -> None:
        self.inner = inner
        self.mechanism = accountant
        self.delta = float(delta)
        self.epsilon = 0.0
        self.max_local_delta = 0.0
        self.report: dict[str, Any] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        eps, deltas = [], []
        for msg in replies:
            metrics = None if msg.has_error() else single_metrics(msg.content)
            if metrics is not None:
                if isinstance(metrics[1].get("epsilon"), int | float):
                    eps.append(float(metrics[1]["epsilon"]))
                if isinstance(metrics[1].get("delta"), int | float):
                    deltas.append(float(metrics[1]["delta"]))
        self.epsilon = max([self.epsilon, *eps])
        self.max_local_delta = max([self.max_local_delta, *deltas])
        self.report = {"epsilon_round_max": max(eps)} if eps else {}
        arrays, metrics_out = self.inner.aggregate_train(server_round, replies)
        out = metrics_out if metrics_out is not None else MetricRecord()
        out["epsilon"] = float(self.epsilon)
        return arrays, out

    def state(self) -> dict[str, Any]:
        return {**super().state(), "max_local_delta": self.max_local_delta}

    def restore(self, state: dict[str, Any]) -> None:
        _check_checkpoint(state, self.mode, self.mechanism)
        self.epsilon = float(state.get("epsilon", 0.0))
        self.max_local_delta = float(state.get("max_local_delta", 0.0))

    def summary_fields(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "delta": self.max_local_delta if self.max_local_delta > 0 else self.delta,
            "dp_mode": self.mode,
            "dp_unit": "sample",
            "dp_accountant": self.mechanism,
            "dp_budget": None,
        }
