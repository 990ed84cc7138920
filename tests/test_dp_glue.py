"""DP glue without the Simulation Engine: the server privacy object and the local-DP client."""

from __future__ import annotations

import math
import pickle
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import PRVAccountant, RDPAccountant

from fedsqueeze.client.dp import STATE_KEY, plan_local_dp, train_local_dp
from fedsqueeze.client.training import make_generator
from fedsqueeze.config import ConfigError, resolve_config
from fedsqueeze.privacy import BudgetExceeded, DistributedDPParams
from fedsqueeze.server.privacy import ServerPrivacy, build_server_privacy
from fedsqueeze.server.rounds import TrainOutcome

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

BASE = {"num-clients": 100, "clients-per-round": 10, "num-rounds": 10, "model": "logreg"}


def _central(**extra: Any) -> ServerPrivacy:
    cfg = resolve_config(BASE, {"dp": "central", "dp-noise-multiplier": 1.0, **extra})
    privacy = build_server_privacy(cfg)
    assert isinstance(privacy, ServerPrivacy)
    return privacy


def _released() -> TrainOutcome:
    return TrainOutcome(arrays={"w": np.zeros(1, dtype=np.float32)}, accepted=10)


def _opacus_epsilon(z: float, q: float, steps: int, delta: float, kind: str = "rdp") -> float:
    acc = RDPAccountant() if kind == "rdp" else PRVAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=z, sample_rate=q)
    return float(acc.get_epsilon(delta=delta))


# ---- central aggregation ---------------------------------------------------------------


def test_central_noise_has_the_calibrated_std() -> None:
    z, clip, k, d = 1.3, 0.7, 10, 50_000
    privacy = _central(**{"dp-noise-multiplier": z, "dp-clip": clip})
    aggregate = privacy.aggregator()
    assert aggregate is not None
    zeros = [{"a": np.zeros(d, np.float32), "b": np.zeros((10, 10), np.float32)}] * 7
    samples = []
    for rnd in range(1, 5):
        out = aggregate(rnd, zeros, [1] * 7)
        samples.append(np.concatenate([out["a"], out["b"].ravel()]) * k)
    noise = np.concatenate(samples).astype(np.float64)
    n = noise.size
    expected = z * clip
    # The sample std of n Gaussian draws has relative standard error 1/sqrt(2n).
    assert abs(noise.std() / expected - 1) < 5 / math.sqrt(2 * n)
    assert abs(noise.mean()) < 5 * expected / math.sqrt(n)
    # One round's noise is reproducible from (seed, round) — resume gives the same model.
    again = aggregate(1, zeros, [1] * 7)
    np.testing.assert_array_equal(again["a"] * k, samples[0][:d].astype(np.float32))


def test_central_clips_each_client_and_divides_by_clients_per_round() -> None:
    clip, k = 1.0, 10
    privacy = _central(**{"dp-noise-multiplier": 1e-9, "dp-clip": clip})
    aggregate = privacy.aggregator()
    assert aggregate is not None
    big = {"w": np.array([30.0, 40.0], np.float32), "b": np.zeros(1, np.float32)}  # norm 50
    small = {"w": np.array([0.0, 0.0], np.float32), "b": np.array([0.5], np.float32)}
    out = aggregate(1, [big, small], [1000, 1])  # num_examples ignored: unweighted
    np.testing.assert_allclose(out["w"], np.array([0.6, 0.8]) / k, atol=1e-6)
    np.testing.assert_allclose(out["b"], np.array([0.5]) / k, atol=1e-6)
    row = privacy.after_round(1, _released())
    assert row["dp_clip"] == clip
    assert row["dp_unclipped_fraction"] == 0.5


def test_aggregator_only_for_central_without_secagg() -> None:
    assert _central().aggregator() is not None
    cfg = resolve_config(BASE, {"dp": "central", "dp-noise-multiplier": 1.0, "secagg": True})
    privacy = build_server_privacy(cfg)
    assert privacy is not None and privacy.aggregator() is None
    rng = np.random.default_rng(0)
    noised = privacy.noise_secure_sum(np.zeros(200_000), rng)
    assert abs(noised.std() / 1.0 - 1) < 5 / math.sqrt(2 * noised.size)
    assert build_server_privacy(resolve_config(BASE)) is None


def test_adaptive_clip_tracks_the_quantile_and_is_reported() -> None:
    privacy = _central(**{"dp-adaptive-clip": True, "dp-clip": 1.0, "dp-noise-multiplier": 0.5})
    aggregate = privacy.aggregator()
    assert aggregate is not None
    rng = np.random.default_rng(1)
    clips = []
    for rnd in range(1, 31):
        deltas = [{"w": rng.normal(size=4).astype(np.float32) * 0.05} for _ in range(10)]
        aggregate(rnd, deltas, [1] * 10)
        clips.append(privacy.after_round(rnd, _released())["dp_clip"])
    assert clips[0] == 1.0
    # Update norms are ~0.1: the median-tracking clip must shrink towards them.
    assert clips[-1] < 0.3
    assert privacy.clipper is not None
    assert privacy.summary()["dp_clip"] == privacy.clipper.clip != clips[-1]
    # The accountant is stepped with the total z, the update noise is larger (pays the count).
    assert privacy.clipper.update_noise_multiplier > 0.5
    assert privacy.accountant.history == [(0.5, 0.1, 30)]


# ---- accounting --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_epsilon_equals_opacus_for_the_same_q_sigma_steps(kind: str) -> None:
    privacy = _central(**{"dp-accountant": kind, "dp-noise-multiplier": 1.1})
    eps = [privacy.after_round(r, _released())["epsilon"] for r in range(1, 6)]
    delta = min(1e-5, 1 / 100**1.1)
    assert privacy.delta == delta
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert eps[-1] == pytest.approx(_opacus_epsilon(1.1, 0.1, 5, delta, kind), rel=1e-6)
    assert privacy.summary()["epsilon"] == eps[-1]


def test_aborted_round_is_not_accounted_and_effective_multiplier_is_used() -> None:
    privacy = _central()
    row = privacy.after_round(1, TrainOutcome(arrays=None))
    assert row["epsilon"] == 0.0 and row["dp_released"] is False
    out = _released()
    out.extra["effective_noise_multiplier"] = 0.8
    row = privacy.after_round(2, out)
    assert row["dp_noise_multiplier"] == 0.8
    assert row["epsilon"] == pytest.approx(_opacus_epsilon(0.8, 0.1, 1, privacy.delta))


def test_noised_but_dropped_aggregate_is_accounted() -> None:
    """The server computed a noised aggregate and dropped it (non-finite): it saw it."""
    privacy = _central()
    row = privacy.after_round(1, TrainOutcome(arrays=None, dp_released=True))
    assert row["dp_released"] is True
    assert privacy.accountant.total_steps == 1
    assert row["epsilon"] == pytest.approx(_opacus_epsilon(1.0, 0.1, 1, privacy.delta))
    # A round that computed nothing (abort, no usable replies) stays free.
    row = privacy.after_round(2, TrainOutcome(arrays=None))
    assert row["dp_released"] is False and privacy.accountant.total_steps == 1


def test_plain_aggregator_round_reports_dp_released_even_if_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Central DP without secagg: the noise overflows float32, the strategy drops the
    aggregate, and the round still says a noised aggregate was computed."""
    from test_secure_glue import SMALL, InProcessGrid

    from fedsqueeze.client.training import state_to_numpy
    from fedsqueeze.federation import new_model
    from fedsqueeze.server.grid import CountingGrid
    from fedsqueeze.server.rounds import plain_train_round
    from fedsqueeze.server.strategies import build_strategy
    from fedsqueeze.server.strategy import CompressedStrategy

    for name in ("_run_id", "_task_id", "_node_id"):  # what Message() needs outside an engine
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)
    cfg = resolve_config(
        SMALL, {"secagg": False, "dp": "central", "dp-noise-multiplier": 1e40, "num-rounds": 2}
    )
    privacy = build_server_privacy(cfg)
    assert privacy is not None
    strategy = CompressedStrategy(build_strategy(cfg), seed=0, aggregator=privacy.aggregator())
    grid = InProcessGrid(cfg, int(cfg["num-clients"]))
    arrays = state_to_numpy(new_model(cfg, seed=0))
    view = CountingGrid(grid, list(grid.get_node_ids()))
    with np.errstate(over="ignore"):
        outcome = plain_train_round(strategy, view, 1, arrays, 60)
    assert outcome.arrays is None and strategy.stats.aggregate_rejected
    assert outcome.dp_released is True and outcome.accepted == 5
    row = privacy.after_round(1, outcome)
    assert row["dp_released"] is True and privacy.accountant.total_steps == 1


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
        reason = privacy.refuse_round(rnd)
        if reason:
            assert f"round {rnd}" in reason and "dp-epsilon" in reason
            break
        privacy.after_round(rnd, _released())
        ran += 1
    assert ran == allowed
    assert privacy.epsilon <= budget


def test_budget_alone_calibrates_the_noise_for_the_planned_rounds() -> None:
    privacy = _central(**{"dp-noise-multiplier": 0.0, "dp-epsilon": 2.0, "num-rounds": 20})
    assert privacy.calibrated and privacy.noise_multiplier > 0.5
    for rnd in range(1, 21):
        assert privacy.refuse_round(rnd) == ""
        privacy.after_round(rnd, _released())
    assert 1.9 < privacy.epsilon <= 2.0
    assert privacy.refuse_round(21) != ""


def test_state_round_trip_gives_the_same_epsilon() -> None:
    cfg = resolve_config(
        BASE, {"dp": "central", "dp-epsilon": 4.0, "dp-adaptive-clip": True, "dp-clip": 2.0}
    )
    first = build_server_privacy(cfg)
    assert first is not None
    aggregate = first.aggregator()
    assert aggregate is not None
    deltas = [{"w": np.full(3, 0.1, np.float32)}] * 5
    for rnd in (1, 2, 3):
        aggregate(rnd, deltas, [1] * 5)
        first.after_round(rnd, _released())
    state = pickle.loads(pickle.dumps(first.state()))
    # Resuming with more planned rounds keeps the calibrated multiplier.
    resumed = build_server_privacy({**cfg, "num-rounds": 50}, state)
    assert resumed is not None
    assert resumed.epsilon == first.epsilon
    assert resumed.noise_multiplier == first.noise_multiplier
    assert resumed.clipper is not None and first.clipper is not None
    assert resumed.clipper.clip == first.clipper.clip
    res_agg = resumed.aggregator()
    assert res_agg is not None
    out_a, out_b = aggregate(4, deltas, [1] * 5), res_agg(4, deltas, [1] * 5)
    np.testing.assert_array_equal(out_a["w"], out_b["w"])
    assert (
        first.after_round(4, _released())["epsilon"]
        == resumed.after_round(4, _released())["epsilon"]
    )
    with pytest.raises(ConfigError, match="checkpoint"):
        build_server_privacy({**cfg, "dp": "local", "dp-adaptive-clip": False}, state)


def test_distributed_params_meet_the_calibrated_multiplier() -> None:
    cfg = resolve_config(
        BASE, {"dp": "distributed", "secagg": True, "dp-epsilon": 4.0, "dp-bits": 16}
    )
    privacy = build_server_privacy(cfg)
    assert privacy is not None and privacy.aggregator() is None
    params = privacy.distributed_params(410, 10)
    assert isinstance(params, DistributedDPParams)
    assert params.bits == 16 and params.mechanism == "skellam" and params.clip == 1.0
    assert params.effective_noise_multiplier() >= privacy.noise_multiplier
    assert privacy.distributed_params(410, 10) is params


def test_local_mode_reports_the_running_max_of_client_epsilons() -> None:
    cfg = resolve_config(BASE, {"dp": "local", "dp-noise-multiplier": 1.0})
    privacy = build_server_privacy(cfg)
    assert privacy is not None and privacy.aggregator() is None
    out = TrainOutcome(
        arrays={}, client_metrics=[{"epsilon": 2.0, "delta": 1e-5}, {"epsilon": 3.0}]
    )
    assert privacy.after_round(1, out)["epsilon"] == 3.0
    out = TrainOutcome(arrays={}, client_metrics=[{"epsilon": 2.5, "delta": 2e-5}])
    row = privacy.after_round(2, out)
    assert row == {"epsilon": 3.0, "epsilon_round_max": 2.5}
    summary = privacy.summary()
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
        build_server_privacy(cfg)


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
