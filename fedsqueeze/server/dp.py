"""Differential privacy as strategy wrappers: one small class per mode, one interface.

In the shape of Opacus's accountants: :class:`DPStrategy` holds what every mode shares (the
accountant, the budget, calibration, checkpoint state, ε in the round's MetricRecord) and
each mode says only where its noise comes from.

- :class:`CentralDP` (user level, trusted server) — each client's update is clipped to
  ``clip`` (L2 over all tensors), the server sums, adds N(0, (z·Δ)²) and divides by
  ``clients_per_round`` (DP-FedAvg's fixed denominator: the mean is *unweighted*, so a
  client's number of examples cannot leak through the weights). Without secure aggregation
  the server clips the decoded updates (``CompressedStrategy(CentralDP(FedAvg()))``, Δ =
  clip); inside ``SecAggStrategy`` clients clip and round conditionally, and Δ is the
  rounded contribution's bound (a hair above clip).
- :class:`DistributedDP` (user level, the server only sees a noised secure sum) — clients
  add their share of discrete noise before masking; only directly inside ``SecAggStrategy``.
- :class:`LocalDP` (sample level, untrusted server) — clients run DP-SGD with their own
  Opacus accountant; this wrapper reports the largest ε a client has reported.

Threat model, per mode
----------------------
What ε bounds is always the same statement — how much more likely any release is with one
client's data (central, distributed: all of a client's data; local: one training example)
than without it — but each mode makes it against different parties.

**Central DP** protects against everyone *except the server*: readers of the released
models (``model.pt``, every round's global model sent to clients), readers of the run
directory, and other clients. The server sees every client's clipped update (or, under
SecAgg, the exact sum of the clipped updates) before it adds noise; it must be trusted.
The noise, the adaptive-clipping count noise and, under any user-level DP, the choice of
clients per round are drawn from a secret key (OS entropy) that lives only in
``checkpoint.npz`` (mode 0600): someone with ``config.toml`` or the seed cannot regenerate
them; someone who can read the checkpoint can, and is as trusted as the server.
``metrics.jsonl`` and ``summary.json`` hold only noised quantities and public
parameters: ε, δ, z, the clip (with adaptive clipping: the clip computed from the noised
count, and that noised fraction), counts of clients that replied, bytes, and the central
test accuracy of the (noised) model — never per-client losses or exact clipping counts.

**Distributed DP** (with SecAgg+) protects against an honest-but-curious server as well:
it learns only the noised sum of at least ``min_contributors`` clients' contributions,
each client adding its own secret share of the noise (from its own OS entropy). The
guarantee holds as long as secure aggregation does (its own threat model bounds what an
active server can do) and the clients that drop out were not colluding with the server
to withdraw their noise: the accountant charges the noise of the clients actually
included, and the budget check assumes the fewest a round accepts. What the server and
the run directory see beyond the noised model: which sampled clients replied (counts), the
SecAgg+ protocol metadata, bytes. Clients send no loss, example count or other per-client
statistic in the clear (their example counts travel inside the mask, or not at all).

**Local DP** (DP-SGD on each client) protects every client's examples against the server
and everyone downstream: each client's noise and Poisson batches come from its own OS
entropy, so the server cannot replay its training. ε is per example, per client, and is
what the client reports (the server takes the largest). The server sees each update
(noised by DP-SGD) and, without SecAgg, each client's example count as FedAvg's weight
plus the ε/δ it reports (both depend on that count); clients send no training loss.

Accounting: q = clients_per_round / num_clients, one step of the subsampled Gaussian
mechanism per round in which the server computed a noised aggregate (even if that aggregate
was then dropped as non-finite), composed by Opacus's RDP or PRV accountant. Opacus analyses
Poisson subsampling while clients are sampled without replacement — the usual DP-FedAvg
approximation; the amplification holds only because the sampled set is secret (under DP
fedsqueeze's loop samples from a secret stream). Distributed DP is accounted as the
Gaussian mechanism with the effective multiplier of the summed discrete noise over the
rounding-inflated sensitivity.

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

from fedsqueeze.compression.sketch import DEFAULT_ROWS, sketch_shape
from fedsqueeze.compression.stages import Sketch, resolve_k
from fedsqueeze.contracts.checks import ConfigError
from fedsqueeze.contracts.records import RecordNames, flatten, from_record, single_metrics
from fedsqueeze.contracts.streams import Secret, SecretStreams
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
    discrete_gaussian_mechanism,
    fedavg_sample_rate,
    noise_for_budget,
)
from fedsqueeze.privacy.distributed import DEFAULT_BETA
from fedsqueeze.server.compose import (
    FLOWER_DP,
    DelegatingStrategy,
    StrategyCompositionError,
    below,
    refuse_below,
)
from fedsqueeze.server.hooks import RoundHook
from fedsqueeze.server.strategy import CompressedStrategy, merge_delta

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


class DPStrategy(DelegatingStrategy, _PrivacyHook):
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
        refusal = self._refuse_round(server_round, len(messages))
        if refusal:
            log.warning("round %d not run: %s", server_round, refusal)
            return []
        self.report["dp_noise_multiplier"] = self.next_multiplier()
        return messages

    def _refuse_round(self, server_round: int, num_messages: int) -> str:
        """A mode's last check once the round's clients are known (before anything is sent)."""
        return ""

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

    Against whom: everyone but the server — readers of the released models and of the run
    directory, other clients. The server sees every clipped update (or, under SecAgg, the
    exact clipped sum) before it adds the noise; it is trusted.

    The Gaussian noise and adaptive clipping's count noise come from
    :class:`~fedsqueeze.contracts.streams.SecretStreams`: a key drawn from OS entropy when
    the wrapper is built, kept in :meth:`state` (the server's owner-only checkpoint) and
    nowhere else, so a resumed run releases exactly the noise the uninterrupted run would,
    and nobody without the checkpoint can regenerate it. ``noise_seed`` replaces the key by
    one derived from a public seed — anyone who knows it removes the noise (ε = ∞): for
    experiments that replay a run on purpose only; fedsqueeze's own app never sets it.

    ``adaptive_quantile`` in (0, 1) tracks that quantile of the update norms (Andrew et al.
    2021; not under secure aggregation).

    Under secure aggregation the clients round their scaled updates to integers. The noise
    is calibrated to what one client can actually contribute after rounding:
    :attr:`~fedsqueeze.contracts.summable.ClippedSum.l2_sensitivity` with conditional
    rounding (Kairouz et al. 2021), i.e. std ``z * Δ`` with ``Δ >= clip`` (slightly), so
    the accountant's multiplier ``z`` is exact.
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
        self._sensitivity = self.clip

    @property
    def noise_seed(self) -> int | None:
        """The public seed the noise is derived from (None: secret, the default)."""
        return self._noise_seed

    @noise_seed.setter
    def noise_seed(self, seed: int | None) -> None:
        self._noise_seed = seed
        self.streams = SecretStreams() if seed is None else SecretStreams.from_public_seed(seed)

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
        return self.streams.rng(server_round, Secret.CENTRAL_DP_NOISE)

    def summable_encoding(
        self, *, dim: int, num_clients: int, bits: int, scale: float, rotation_seed: int
    ) -> SummableEncoding:
        """Clients clip to ``clip``, round conditionally and send the unweighted sum."""
        enc = choose_integer_encoding(
            dim=dim, num_clients=num_clients, clip=self.clip, bits=bits, scale=scale,
            beta=DEFAULT_BETA,
        )  # fmt: skip
        self._sensitivity = enc.l2_sensitivity
        return enc

    def _noised_mean(
        self,
        total: Mapping[str, np.ndarray],
        std: float,
        sensitivity: float,
        rng: np.random.Generator,
    ) -> tuple[Arrays, float]:
        """The noised mean and the noise std it got (z = ``std / sensitivity``).

        The noise is the discrete Gaussian on a fine grid over the whole flattened update
        (:func:`~fedsqueeze.privacy.discrete_gaussian_mechanism`), not a float Gaussian:
        safe against floating-point attacks, accounted with the same z.
        """
        keys = list(total)
        flat = np.concatenate([np.asarray(total[k], np.float64).ravel() for k in keys])
        noised, actual = discrete_gaussian_mechanism(flat, std / sensitivity, sensitivity, rng)
        out, start = {}, 0
        for k in keys:
            size = int(np.size(total[k]))
            out[k] = noised[start : start + size].reshape(np.shape(total[k]))
            out[k] = out[k] / self.clients_per_round
            start += size
        return out, actual

    def aggregate_secure_sum(
        self,
        server_round: int,
        total: Arrays,
        contributors: int,
        template: Message,
        metrics: Mapping[str, float],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Calibrated to the rounded contribution's bound, not to clip (finding: rounding
        # lengthens a contribution by up to sqrt(d)/scale).
        mean, std = self._noised_mean(
            total, self.noise_multiplier * self._sensitivity, self._sensitivity,
            self._rng(server_round),
        )  # fmt: skip
        # Client metrics (their exact train losses) are not released: only the noised model.
        arrays, out = merge_delta(
            self.inner, server_round, self._global, mean, template, self.names, {}
        )
        return arrays, self._release(
            self.noise_multiplier,
            out,
            dp_clip=self.clip,
            dp_sensitivity=self._sensitivity,
            dp_noise_std=std,
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
        for msg in usable:
            local = from_record(msg.content.array_records[self.names.arrays])
            clipped, norm = clip_l2({k: local[k] - self._global[k] for k in total}, clip)
            unclipped += int(norm <= clip)
            for k in total:
                total[k] += clipped[k]
        std = self.clipper.update_noise_std() if self.clipper else self.noise_multiplier * clip
        rng = self._rng(server_round)  # one stream: the count noise continues it
        mean, std = self._noised_mean(total, std, clip, rng)
        if self.clipper is not None:
            self.clipper.update(unclipped, len(usable), rng)
        # Neither the clients' exact losses nor the exact unclipped count are released: only
        # the noised model and, with adaptive clipping, the noised fraction it computed.
        arrays, out = merge_delta(
            self.inner, server_round, self._global, mean, usable[0], self.names, {}
        )
        noised = {}
        if self.clipper is not None and self.clipper.last_unclipped_fraction is not None:
            noised["dp_unclipped_fraction_noised"] = self.clipper.last_unclipped_fraction
        return arrays, self._release(
            self.noise_multiplier, out, dp_clip=clip, dp_noise_std=std, **noised
        )

    def state(self) -> dict[str, Any]:
        """Includes the secret noise key: this state belongs in the private checkpoint only."""
        return {
            **super().state(),
            "adaptive_clip": self.clipper.clip if self.clipper else None,
            "noise_key": self.streams.state(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        super().restore(state)
        if state.get("noise_key") is not None:
            self.streams = SecretStreams.restore(state["noise_key"])
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

    Against whom: an honest-but-curious server (and anyone who sees what it releases or
    writes) — it only ever sees the securely summed, noised vector, as long as SecAgg+ holds
    (see the secure-aggregation threat model) and at least ``min_contributors`` clients'
    noise is in the sum. Each client's noise share is drawn from its own OS entropy.

    ``bits`` is the field width of the noised sum; ``mechanism`` ``"skellam"`` or
    ``"dgauss"``. Every round is checked, before any message is sent, against the *worst*
    round SecAgg+ can accept: only ``min_contributors`` of the sampled clients' noise
    shares in the sum (the SecAgg+ threshold t; 0 = ``n // 2 + 1``, ``SecAggStrategy``'s
    default with the full graph), with the rounding-inflated sensitivity of the round's
    actual encoding. A round whose worst case would exceed ``epsilon`` is not run, so a run
    never exceeds its budget, whatever drops out. With a budget and no explicit multiplier,
    the nominal multiplier is raised until that worst case reaches the calibrated z (with
    full participation the round is charged less). ``randk`` (or ``sketch``) must be the
    random-k amount (the ``sketch(F)`` stage) of the ``SecAggStrategy`` outside: the encoded
    length is predicted from it. With a sketch the noised vector is the client's count-sketch
    table, clipped to ``clip`` by the encoding itself, so sensitivity, calibration and
    accounting are those of a dense update of ``rows x cols`` coordinates.
    """

    mode = "distributed"

    def __init__(
        self,
        inner: Strategy,
        *,
        bits: int = 16,
        mechanism: str = "skellam",
        min_contributors: int = 0,
        randk: float | int = 1.0,
        sketch: Sketch | None = None,
        **kwargs: Any,
    ) -> None:
        self.bits = int(bits)
        self.sketch = sketch
        self.noise_kind = mechanism
        self.min_contributors = int(min_contributors)
        self.randk = randk
        self._params: dict[tuple[int, int], DistributedDPParams] = {}
        super().__init__(inner, **kwargs)
        self.last_effective: float | None = None
        self._predicted: float | None = None
        self._predicted_key: tuple[int, int] | None = None
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

    def worst_contributors(self, num_clients: int) -> int:
        """The fewest contributors a round of ``num_clients`` can be unmasked with."""
        t = self.min_contributors if self.min_contributors > 0 else num_clients // 2 + 1
        return max(1, min(t, num_clients))

    def next_multiplier(self) -> float:
        """The worst-case effective multiplier of the next round (nominal until the first
        round's encoding is known; :meth:`configure_train` checks the exact one)."""
        return self._predicted if self._predicted is not None else self.noise_multiplier

    def _refuse_round(self, server_round: int, num_messages: int) -> str:
        if num_messages < 2:
            return ""  # SecAggStrategy runs no protocol: nothing is released
        d = int(flatten(self._global).size)
        if self.sketch is not None:
            rows, cols = sketch_shape(d, self.sketch.amount, self.sketch.rows or DEFAULT_ROWS)
            dim = rows * cols
        else:
            dim = resolve_k(self.randk, d)
        params = self.params(dim, num_messages)
        self._predicted_key = (dim, num_messages)
        self._predicted = float(
            params.effective_noise_multiplier(self.worst_contributors(num_messages))
        )
        return self.before_round(server_round)

    def params(self, dim: int, num_clients: int) -> DistributedDPParams:
        """The encoding's parameters for a ``dim``-long update summed over ``num_clients``."""
        key = (int(dim), int(num_clients))
        if key not in self._params:
            z = self.noise_multiplier
            worst = self.worst_contributors(num_clients)
            try:
                params = self._for(dim, num_clients, z)
                if self.calibrated:
                    for _ in range(_MAX_CALIBRATION_STEPS):
                        eff = params.effective_noise_multiplier(worst)
                        if eff >= self.noise_multiplier:
                            break
                        z *= 1.001 * self.noise_multiplier / eff
                        params = self._for(dim, num_clients, z)
                    eff = params.effective_noise_multiplier(worst)
                    if eff < self.noise_multiplier:
                        # More noise needs a coarser scale to fit the field, and rounding
                        # then grows the sensitivity as fast as the noise: never reached.
                        raise InvalidPrivacyParameter(
                            f"{dim} coordinates summed over {num_clients} clients cannot reach "
                            f"the calibrated noise multiplier {self.noise_multiplier:.3f} "
                            f"(reached {eff:.3f} at a nominal {z:.3g}): rounding to "
                            f"{self.bits}-bit integers dominates; raise dp-bits"
                        )
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
        key = (int(dim), int(num_clients))
        if self._predicted_key is not None and key != self._predicted_key:
            # The budget check ran on another encoding: refuse rather than release unchecked.
            raise ConfigError(
                f"DistributedDP checked the budget for {self._predicted_key[0]} coordinates "
                f"of {self._predicted_key[1]} clients, SecAggStrategy encodes {dim} of "
                f"{num_clients}: give DistributedDP the same randk / sketch as SecAggStrategy"
            )
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
        if self._predicted is not None and z < self._predicted * (1 - 1e-9):
            log.error(
                "round %d: only %d contributors, fewer than the %d the budget check assumed",
                server_round, contributors, self.worst_contributors(self._round_params.num_clients),
            )  # fmt: skip
        mean = {k: v / self.clients_per_round for k, v in total.items()}
        # Per-client metrics (exact train losses) never leave the DP boundary: dropped.
        arrays, out = merge_delta(
            self.inner, server_round, self._global, mean, template, self.names, {}
        )
        self.last_effective = z
        return arrays, self._release(z, out, effective_noise_multiplier=z, dp_clip=self.clip)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        raise StrategyCompositionError("DistributedDP aggregates only secure sums")

    def state(self) -> dict[str, Any]:
        return {
            **super().state(),
            "last_effective": self.last_effective,
            "predicted": self._predicted,
        }

    def restore(self, state: dict[str, Any]) -> None:
        super().restore(state)
        last = state.get("last_effective")
        self.last_effective = None if last is None else float(last)
        predicted = state.get("predicted")
        self._predicted = None if predicted is None else float(predicted)


class LocalDP(DelegatingStrategy, _PrivacyHook):
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
