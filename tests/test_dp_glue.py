"""DP glue without the Simulation Engine: the DP strategy wrappers and the local-DP client.

The wrappers are taken out of the strategy chain a run config builds (``build_chain``) and
driven as Flower drives a strategy: ``configure_train``, then ``aggregate_train`` on replies
holding ``global + delta`` (what ``CompressedStrategy`` hands the wrapper inside it); the
per-round fields are what their ``after_round`` adds to the round's metrics row.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from opacus.accountants import PRVAccountant, RDPAccountant

from fedsqueeze.client.dp import STATE_KEY, plan_local_dp, train_local_dp
from fedsqueeze.client.training import make_generator
from fedsqueeze.config import ConfigError, resolve_config
from fedsqueeze.contracts.records import from_record, to_record
from fedsqueeze.privacy import BudgetExceeded, DistributedDPParams
from fedsqueeze.privacy.mechanisms import GRID_RESOLUTION
from fedsqueeze.server.compose import StrategyCompositionError
from fedsqueeze.server.dp import CentralDP, DistributedDP, DPStrategy, LocalDP
from fedsqueeze.server.hooks import strategy_chain
from fedsqueeze.server.secure import SecAggStrategy
from fedsqueeze.server.strategies import build_chain

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

BASE = {"num-clients": 100, "clients-per-round": 10, "num-rounds": 10, "model": "logreg"}
Arrays = dict[str, np.ndarray]


class _Nodes:
    """The only Grid method Flower's FedAvg.configure_train needs: nodes 1..n."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> Iterable[int]:
        return list(range(1, self.n + 1))


def _wrapper(config: Mapping[str, Any], kind: type = DPStrategy) -> Any:
    """The wrapper of type ``kind`` in the strategy chain ``config`` builds."""
    return next(s for s in strategy_chain(build_chain(config)) if isinstance(s, kind))


def _central(**extra: Any) -> CentralDP:
    cfg = resolve_config(BASE, {"dp": "central", "dp-noise-multiplier": 1.0, **extra})
    privacy = _wrapper(cfg)
    assert isinstance(privacy, CentralDP) and not privacy.secure
    return privacy


def _configure(strategy: Strategy, rnd: int, base: Arrays, nodes: int) -> list[Message]:
    messages = strategy.configure_train(rnd, to_record(base), ConfigRecord(), _Nodes(nodes))
    return sorted(messages, key=lambda m: m.metadata.dst_node_id)


def _reply(to: Message, arrays: Arrays, **metrics: float) -> Message:
    content = RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=to)


def _aggregate(
    strategy: DPStrategy, rnd: int, deltas: list[Arrays], weights: list[int] | None = None
) -> Arrays | None:
    """One round of ``strategy`` on these client deltas; the mean delta it released."""
    base = {k: np.zeros_like(v) for k, v in deltas[0].items()}
    weights = weights if weights is not None else [1] * len(deltas)
    nodes = max(len(deltas), strategy.clients_per_round)
    messages = _configure(strategy, rnd, base, nodes)
    replies = [
        _reply(m, {k: base[k] + d[k] for k in base}, **{"num-examples": w})
        for m, d, w in zip(messages, deltas, weights, strict=False)
    ]
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return None if arrays is None else {k: v - base[k] for k, v in from_record(arrays).items()}


def _row(hook: Any, rnd: int) -> dict[str, Any]:
    """The fields ``hook`` adds to round ``rnd``'s metrics row."""
    row: dict[str, Any] = {}
    hook.after_round(rnd, row)
    return row


def _released(privacy: DPStrategy, rnd: int) -> dict[str, Any]:
    """Run round ``rnd`` through ``privacy`` (it releases a noised aggregate); its row."""
    _aggregate(privacy, rnd, [{"w": np.zeros(1, np.float32)}] * privacy.clients_per_round)
    assert privacy.report["dp_released"] is True
    return _row(privacy, rnd)


def _opacus_epsilon(z: float, q: float, steps: int, delta: float, kind: str = "rdp") -> float:
    acc = RDPAccountant() if kind == "rdp" else PRVAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=z, sample_rate=q)
    return float(acc.get_epsilon(delta=delta))


# ---- central aggregation ---------------------------------------------------------------


def test_central_noise_has_the_calibrated_std() -> None:
    z, clip, k, d = 1.3, 0.7, 10, 50_000
    privacy = _central(**{"dp-noise-multiplier": z, "dp-clip": clip})
    zeros = [{"a": np.zeros(d, np.float32), "b": np.zeros((10, 10), np.float32)}] * 7
    samples = []
    for rnd in range(1, 5):
        out = _aggregate(privacy, rnd, zeros)
        assert out is not None
        samples.append(np.concatenate([out["a"], out["b"].ravel()]) * k)
    noise = np.concatenate(samples).astype(np.float64)
    n = noise.size
    expected = z * clip
    # The sample std of n Gaussian draws has relative standard error 1/sqrt(2n).
    assert abs(noise.std() / expected - 1) < 5 / math.sqrt(2 * n)
    assert abs(noise.mean()) < 5 * expected / math.sqrt(n)
    # The noise is not a function of the run config: a second wrapper built from the same
    # config (same seed) releases different noise for round 1, so nobody can replay it.
    replay = _central(**{"dp-noise-multiplier": z, "dp-clip": clip})
    again = _aggregate(replay, 1, zeros)
    assert again is not None
    assert not np.array_equal(again["a"] * k, samples[0][:d].astype(np.float32))


def test_central_clips_each_client_and_divides_by_clients_per_round() -> None:
    clip, k = 1.0, 10
    privacy = _central(**{"dp-noise-multiplier": 1e-9, "dp-clip": clip})
    big = {"w": np.array([30.0, 40.0], np.float32), "b": np.zeros(1, np.float32)}  # norm 50
    small = {"w": np.array([0.0, 0.0], np.float32), "b": np.array([0.5], np.float32)}
    out = _aggregate(privacy, 1, [big, small], [1000, 1])  # num_examples ignored: unweighted
    assert out is not None
    # Up to half a step of the noise grid (clip / (1024 sqrt(d))) per coordinate, then / k.
    atol = clip / (2 * GRID_RESOLUTION * math.sqrt(3)) / k + 1e-7
    np.testing.assert_allclose(out["w"], np.array([0.6, 0.8]) / k, atol=atol)
    np.testing.assert_allclose(out["b"], np.array([0.5]) / k, atol=atol)
    row = _row(privacy, 1)
    assert row["dp_clip"] == clip
    # The exact clipped count is not released (only adaptive clipping's noised one).
    assert "dp_unclipped_fraction" not in row


def test_central_dp_aggregates_replies_itself_only_without_secagg() -> None:
    assert not _central().secure  # it clips and sums the decoded replies itself
    cfg = resolve_config(BASE, {"dp": "central", "dp-noise-multiplier": 1.0, "secagg": True})
    chain = build_chain(cfg)
    secagg = next(s for s in strategy_chain(chain) if isinstance(s, SecAggStrategy))
    privacy = next(s for s in strategy_chain(chain) if isinstance(s, CentralDP))
    # Under secagg it only noises the securely summed clipped updates SecAggStrategy decodes.
    assert secagg.dp is privacy and privacy.secure
    total = {"w": np.zeros(200_000)}
    (template, *_) = _configure(privacy, 1, {"w": np.zeros(200_000, np.float32)}, 10)
    arrays, metrics = privacy.aggregate_secure_sum(1, total, 10, _reply(template, {}), {})
    assert arrays is not None and metrics is not None and metrics["epsilon"] > 0
    noised = from_record(arrays)["w"].astype(np.float64) * privacy.clients_per_round
    assert abs(noised.std() / 1.0 - 1) < 5 / math.sqrt(2 * noised.size)
    no_dp = strategy_chain(build_chain(resolve_config(BASE)))
    assert not any(isinstance(s, DPStrategy | LocalDP) for s in no_dp)


def test_adaptive_clip_tracks_the_quantile_and_is_reported() -> None:
    privacy = _central(**{"dp-adaptive-clip": True, "dp-clip": 1.0, "dp-noise-multiplier": 0.5})
    rng = np.random.default_rng(1)
    clips = []
    for rnd in range(1, 31):
        deltas = [{"w": rng.normal(size=4).astype(np.float32) * 0.05} for _ in range(10)]
        _aggregate(privacy, rnd, deltas)
        clips.append(_row(privacy, rnd)["dp_clip"])
    assert clips[0] == 1.0
    # Update norms are ~0.1: the median-tracking clip must shrink towards them.
    assert clips[-1] < 0.3
    assert privacy.clipper is not None
    assert privacy.summary_fields()["dp_clip"] == privacy.clipper.clip != clips[-1]
    # The accountant is stepped with the total z, the update noise is larger (pays the count).
    assert privacy.clipper.update_noise_multiplier > 0.5
    assert privacy.accountant.history == [(0.5, 0.1, 30)]


# ---- accounting --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_epsilon_equals_opacus_for_the_same_q_sigma_steps(kind: str) -> None:
    privacy = _central(**{"dp-accountant": kind, "dp-noise-multiplier": 1.1})
    eps = [_released(privacy, r)["epsilon"] for r in range(1, 6)]
    delta = min(1e-5, 1 / 100**1.1)
    assert privacy.delta == delta
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert eps[-1] == pytest.approx(_opacus_epsilon(1.1, 0.1, 5, delta, kind), rel=1e-6)
    assert privacy.summary_fields()["epsilon"] == eps[-1]


def test_aborted_round_is_not_accounted_and_effective_multiplier_is_used() -> None:
    cfg = resolve_config(BASE, {"dp": "distributed", "secagg": True, "dp-noise-multiplier": 1.0})
    privacy = _wrapper(cfg)
    assert isinstance(privacy, DistributedDP) and privacy.secure
    d = 410
    # Round 1 aborts inside SecAggStrategy: the wrapper is configured, never handed a sum.
    _configure(privacy, 1, {"w": np.zeros(d, np.float32)}, 10)
    row = _row(privacy, 1)
    assert row["epsilon"] == 0.0 and row["dp_released"] is False
    assert privacy.accountant.total_steps == 0
    # Round 2: 8 of 10 clients' noise is in the sum; the accountant charges what was added.
    (template, *_) = _configure(privacy, 2, {"w": np.zeros(d, np.float32)}, 10)
    privacy.summable_encoding(dim=d, num_clients=10, bits=0, scale=0.0, rotation_seed=7)
    privacy.aggregate_secure_sum(2, {"w": np.zeros(d)}, 8, _reply(template, {}), {})
    z = privacy.params(d, 10).effective_noise_multiplier(8)
    assert 0 < z < 0.95  # fewer contributors (and rounding): less than the nominal 1.0
    row = _row(privacy, 2)
    assert row["dp_noise_multiplier"] == z == row["effective_noise_multiplier"]
    assert row["epsilon"] == pytest.approx(_opacus_epsilon(z, 0.1, 1, privacy.delta))
    # The budget check of the next round uses the worst case SecAgg+ accepts (t of 10
    # contributors), not the last round's multiplier.
    worst = privacy.params(d, 10).effective_noise_multiplier(privacy.worst_contributors(10))
    assert privacy.worst_contributors(10) < 8 and privacy.next_multiplier() == worst < z


def test_noised_but_dropped_aggregate_is_accounted() -> None:
    """The server computed a noised aggregate and dropped it (non-finite): it saw it."""
    privacy = _central(**{"dp-clip": 1e40})  # noise of std 1e40 overflows float32
    with np.errstate(over="ignore"):
        out = _aggregate(privacy, 1, [{"w": np.zeros(100, np.float32)}] * 10)
    assert out is None
    row = _row(privacy, 1)
    assert row["dp_released"] is True
    assert privacy.accountant.total_steps == 1
    assert row["epsilon"] == pytest.approx(_opacus_epsilon(1.0, 0.1, 1, privacy.delta))
    # A round that computed nothing (abort, no usable replies) stays free.
    messages = _configure(privacy, 2, {"w": np.zeros(100, np.float32)}, 10)
    failed = [Message(Error(code=0, reason="client failed"), reply_to=m) for m in messages]
    assert privacy.aggregate_train(2, failed) == (None, None)
    row = _row(privacy, 2)
    assert row["dp_released"] is False and privacy.accountant.total_steps == 1


def test_plain_aggregator_round_reports_dp_released_even_if_dropped(monkeypatch) -> None:
    """Central DP without secagg: the noised aggregate is not finite (the grid sampler's
    output always is, so a fake stands in for the overflow), the chain drops it, and the round
    still says a noised aggregate was computed."""
    import fedsqueeze.server.dp as server_dp

    monkeypatch.setattr(
        server_dp,
        "discrete_gaussian_mechanism",
        lambda x, z, sens, rng: (np.full(np.shape(x), np.inf), z * sens),
    )
    from test_secure_glue import SMALL, InProcessGrid, train_one

    from fedsqueeze.federation import new_model
    from fedsqueeze.models.weights import state_to_numpy
    from fedsqueeze.server.strategy import CompressedStrategy

    cfg = resolve_config(
        SMALL, {"secagg": False, "dp": "central", "dp-noise-multiplier": 1.0, "num-rounds": 2}
    )
    strategy = build_chain(cfg)
    privacy = next(s for s in strategy_chain(strategy) if isinstance(s, CentralDP))
    grid = InProcessGrid(cfg, int(cfg["num-clients"]))
    arrays = state_to_numpy(new_model(cfg, seed=0))
    with np.errstate(over="ignore"):
        r = train_one(strategy, grid, 1, arrays)
    assert isinstance(strategy, CompressedStrategy)
    assert r.arrays is None and strategy.stats.accepted == 5 and r.row["clients"] == 5
    assert r.row["dp_released"] is True and privacy.accountant.total_steps == 1


def test_budget_stops_before_the_round_that_would_exceed_it() -> None:
    z, budget, q = 1.0, 3.0, 0.1
    privacy = _central(**{"dp-noise-multiplier": z, "dp-epsilon": budget, "num-rounds": 100})
    delta = privacy.delta
    # Independently: the last round count whose epsilon stays within the budget.
    acc, allowed = RDPAccountant(), 0
    while True:
        acc.step(noise_multiplier=z, sample_rate=q)
        if acc.get_epsilon(delta=delta) > budget:
            break
        allowed += 1
    assert 1 < allowed < 100
    ran = 0
    for rnd in range(1, 101):
        reason = privacy.before_round(rnd)
        if reason:
            assert f"round {rnd}" in reason and "dp-epsilon" in reason
            # The wrapper itself refuses to configure that round, too.
            assert _configure(privacy, rnd, {"w": np.zeros(1, np.float32)}, 10) == []
            break
        _released(privacy, rnd)
        ran += 1
    assert ran == allowed
    assert privacy.epsilon <= budget


def test_budget_alone_calibrates_the_noise_for_the_planned_rounds() -> None:
    privacy = _central(**{"dp-noise-multiplier": 0.0, "dp-epsilon": 2.0, "num-rounds": 20})
    assert privacy.calibrated and privacy.noise_multiplier > 0.5
    for rnd in range(1, 21):
        assert privacy.before_round(rnd) == ""
        _released(privacy, rnd)
    assert 1.9 < privacy.epsilon <= 2.0
    assert privacy.before_round(21) != ""


def test_state_round_trip_gives_the_same_epsilon() -> None:
    cfg = resolve_config(
        BASE, {"dp": "central", "dp-epsilon": 4.0, "dp-adaptive-clip": True, "dp-clip": 2.0}
    )
    first = _wrapper(cfg)
    assert isinstance(first, CentralDP)
    deltas = [{"w": np.full(3, 0.1, np.float32)}] * 5
    for rnd in (1, 2, 3):
        _aggregate(first, rnd, deltas)
        _row(first, rnd)
    state = pickle.loads(pickle.dumps(first.state()))
    # Resuming with more planned rounds keeps the calibrated multiplier.
    resumed = _wrapper({**cfg, "num-rounds": 50})
    assert resumed.noise_multiplier != first.noise_multiplier  # planned for 50 rounds
    resumed.restore(state)
    assert resumed.epsilon == first.epsilon
    assert resumed.noise_multiplier == first.noise_multiplier
    assert resumed.clipper is not None and first.clipper is not None
    assert resumed.clipper.clip == first.clipper.clip
    out_a, out_b = _aggregate(first, 4, deltas), _aggregate(resumed, 4, deltas)
    assert out_a is not None and out_b is not None
    np.testing.assert_array_equal(out_a["w"], out_b["w"])
    assert _row(first, 4)["epsilon"] == _row(resumed, 4)["epsilon"]
    with pytest.raises(ConfigError, match="checkpoint"):
        _wrapper({**cfg, "dp": "local", "dp-adaptive-clip": False}, LocalDP).restore(state)


def test_distributed_params_meet_the_calibrated_multiplier() -> None:
    cfg = resolve_config(
        BASE, {"dp": "distributed", "secagg": True, "dp-epsilon": 4.0, "dp-bits": 16}
    )
    privacy = _wrapper(cfg)
    assert isinstance(privacy, DistributedDP)
    with pytest.raises(StrategyCompositionError, match="only secure sums"):
        privacy.aggregate_train(1, [])
    params = privacy.params(410, 10)
    assert isinstance(params, DistributedDPParams)
    assert params.bits == 16 and params.mechanism == "skellam" and params.clip == 1.0
    assert params.effective_noise_multiplier() >= privacy.noise_multiplier
    assert privacy.params(410, 10) is params


def test_distributed_calibration_that_cannot_reach_its_multiplier_is_refused() -> None:
    # At 8 bits the field is so narrow that raising the noise only coarsens the rounding
    # (the sensitivity grows with it): the effective multiplier stalls below the calibrated
    # one. Before, params() returned such an encoding silently (below the calibrated
    # multiplier, at a nominal z of ~800: noise hundreds of times the clip); now it is a
    # one-line config error.
    cfg = resolve_config(BASE, {"dp": "distributed", "secagg": True, "dp-epsilon": 4.0})
    wide = _wrapper({**cfg, "dp-bits": 10})
    worst = wide.worst_contributors(10)
    assert wide.params(4096, 10).effective_noise_multiplier(worst) >= wide.noise_multiplier
    narrow = _wrapper({**cfg, "dp-bits": 8})
    with pytest.raises(ConfigError, match=r"dp-bits = 8: .*cannot reach .*raise dp-bits"):
        narrow.params(4096, 10)


def test_local_mode_reports_the_running_max_of_client_epsilons() -> None:
    cfg = resolve_config(BASE, {"dp": "local", "dp-noise-multiplier": 1.0})
    privacy = build_chain(cfg)
    assert isinstance(privacy, LocalDP)  # outermost: it only reads what clients report
    base = {"w": np.zeros(3, np.float32)}

    def run(rnd: int, client_metrics: list[dict[str, float]]) -> MetricRecord | None:
        messages = _configure(privacy, rnd, base, 10)
        replies = [
            _reply(m, base, **{"num-examples": 1, **metrics})
            for m, metrics in zip(messages, client_metrics, strict=False)
        ]
        return privacy.aggregate_train(rnd, replies)[1]

    # Every reply carries the same metric keys (Flower's FedAvg refuses mixed ones).
    out = run(1, [{"epsilon": 2.0, "delta": 1e-5}, {"epsilon": 3.0, "delta": 1e-5}])
    assert out is not None and out["epsilon"] == 3.0
    assert _row(privacy, 1)["epsilon"] == 3.0
    run(2, [{"epsilon": 2.5, "delta": 2e-5}])
    row = _row(privacy, 2)
    assert row == {"epsilon": 3.0, "epsilon_round_max": 2.5}
    summary = privacy.summary_fields()
    assert summary["epsilon"] == 3.0 and summary["delta"] == 2e-5 and summary["dp_unit"] == "sample"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"dp": "central"}, "dp-noise-multiplier > 0 or"),
        ({"dp": "distributed", "dp-noise-multiplier": 1.0}, "secagg = true"),
        ({"dp": "local", "dp-noise-multiplier": 1.0, "dp-adaptive-clip": True}, "adaptive"),
        ({"dp": "local", "dp-noise-multiplier": 1.0, "strategy": "fedprox"}, "fedprox"),
        (
            {"dp": "central", "dp-noise-multiplier": 1.0, "dp-adaptive-clip": True,
             "dp-target-quantile": 0.0},
            "dp-target-quantile",
        ),
    ],
)  # fmt: skip
def test_bad_dp_configs_are_rejected_in_one_line(extra: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        resolve_config(BASE, extra)
    assert "\n" not in str(info.value)


def test_unreachable_budget_is_a_config_error() -> None:
    cfg = resolve_config(BASE, {"dp": "central", "dp-epsilon": 1e-6})
    with pytest.raises(ConfigError, match="dp-epsilon"):
        build_chain(cfg)


# ---- local DP client ---------------------------------------------------------------------

LOCAL = {**BASE, "dp": "local", "local-epochs": 2, "batch-size": 8, "lr": 0.1}


def _local_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 64)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def test_local_dp_epsilon_grows_and_matches_one_accountant_over_all_rounds() -> None:
    cfg = resolve_config(LOCAL, {"dp-noise-multiplier": 1.0, "dp-clip": 1.0})
    x, y = _local_data()
    state = RecordDict()
    eps, steps = [], 0
    for rnd in (1, 2, 3):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        before = [p.detach().clone() for p in model.parameters()]
        loss, metrics = train_local_dp(model, x, y, cfg, state, make_generator(0, rnd, 0))
        assert math.isfinite(loss)
        assert list(model.state_dict()) == ["1.weight", "1.bias"]  # plain module, no _module.
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        eps.append(metrics["epsilon"])
        steps += int(metrics["dp-steps"])
    assert eps[0] < eps[1] < eps[2]
    assert steps == 3 * 2 * 5  # rounds x epochs x ceil(40 / 8)
    delta = min(1e-5, 1 / 40**1.1)
    assert metrics["delta"] == delta
    assert eps[-1] == pytest.approx(_opacus_epsilon(1.0, 1 / 5, steps, delta), rel=1e-9)
    assert state.config_records[STATE_KEY]["noise-multiplier"] == 1.0


def test_local_dp_budget_calibrates_once_and_refuses_past_it() -> None:
    cfg = resolve_config(LOCAL, {"dp-epsilon": 5.0, "num-rounds": 2})
    x, y = _local_data()
    plan = plan_local_dp(cfg, len(x))
    assert plan.noise_multiplier > 0 and plan.steps_per_round == 10
    state = RecordDict()
    for rnd in (1, 2):
        model = torch.nn.Linear(64, 10)
        _, metrics = train_local_dp(model, x, y, cfg, state, make_generator(0, rnd, 0))
        assert metrics["dp-noise-multiplier"] == plan.noise_multiplier
    assert 4.5 < metrics["epsilon"] <= 5.0
    # A third round (e.g. after a resume with more rounds) keeps z and would overspend.
    longer = {**cfg, "num-rounds": 10}
    with pytest.raises(BudgetExceeded):
        train_local_dp(torch.nn.Linear(64, 10), x, y, longer, state, make_generator(0, 3, 0))
