"""The DP guarantees hold against the parties they exist to protect from.

Each test is an attack that worked on the code before the guarantees work (issue 9's
findings 1, 2, 6, 7, 8 and 9): replaying central DP's noise from the run config, replaying
a local-DP client's DP-SGD, knowing the sampled clients from the seed, a rounded
contribution longer than the noise was calibrated for, a distributed-DP budget overspent
after dropouts or at low bits, and exact per-client statistics on the wire or in the run
directory. Everything runs in this process (the real ClientApp and round loop, no engine).
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import inprocess
import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsqueeze.client.app import build_client_app
from fedsqueeze.client.dp import train_local_dp
from fedsqueeze.client.training import make_generator
from fedsqueeze.config import resolve_config
from fedsqueeze.contracts.records import flatten, from_record, to_record
from fedsqueeze.contracts.streams import Stream, round_rng
from fedsqueeze.contracts.summable import ClippedSum
from fedsqueeze.federation import client_train_data, new_model
from fedsqueeze.models.weights import load_numpy_state, state_to_numpy
from fedsqueeze.privacy import gaussian_noise, noise_for_budget
from fedsqueeze.privacy.mechanisms import GRID_RESOLUTION
from fedsqueeze.server.dp import CentralDP, DistributedDP
from fedsqueeze.server.hooks import strategy_chain
from fedsqueeze.server.rounds import ClientSampler, run_federation, sample_partitions
from fedsqueeze.server.rundir import CHECKPOINT, RunDir
from fedsqueeze.server.strategies import build_chain

pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing", "ignore:Secure RNG turned off", "ignore:Optimal order"
)

Arrays = dict[str, np.ndarray]
BASE = {"num-clients": 100, "clients-per-round": 10, "num-rounds": 10, "model": "logreg"}
RUN = {
    "dataset": "digits",
    "model": "logreg",
    "num-clients": 8,
    "clients-per-round": 2,
    "num-rounds": 4,
    "local-epochs": 1,
    "lr": 0.1,
}


class _Nodes:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> Iterable[int]:
        return list(range(1, self.n + 1))


def _wrapper(config: dict[str, Any], kind: type) -> Any:
    chain = build_chain(resolve_config(BASE, config))
    return next(s for s in strategy_chain(chain) if isinstance(s, kind))


def _configure(strategy: Any, rnd: int, base: Arrays, nodes: int) -> list[Message]:
    messages = strategy.configure_train(rnd, to_record(base), ConfigRecord(), _Nodes(nodes))
    return sorted(messages, key=lambda m: m.metadata.dst_node_id)


def _reply(to: Message, arrays: Arrays, **metrics: float) -> Message:
    content = RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=to)


# ---- finding 1: central-DP noise is secret ----------------------------------------------------


def _central_release(privacy: CentralDP, deltas: list[Arrays]) -> Arrays:
    base = {k: np.zeros_like(v) for k, v in deltas[0].items()}
    messages = _configure(privacy, 1, base, privacy.clients_per_round)
    replies = [_reply(m, d, **{"num-examples": 1}) for m, d in zip(messages, deltas, strict=False)]
    arrays, _ = privacy.aggregate_train(1, replies)
    assert arrays is not None
    return from_record(arrays)


def test_server_cannot_replay_central_noise_from_the_run_config() -> None:
    """The attack of finding 1: with the run seed, regenerate round 1's noise and subtract it
    from the released model — that recovered the exact sum of the clipped updates."""
    cfg = {"dp": "central", "dp-noise-multiplier": 1.0, "dp-clip": 1.0, "seed": 7}
    privacy = _wrapper(cfg, CentralDP)
    assert privacy.noise_seed is None
    rng = np.random.default_rng(0)
    deltas = [{"w": (rng.normal(size=2000) * 0.01).astype(np.float32)} for _ in range(10)]
    released = _central_release(privacy, deltas)["w"].astype(np.float64) * 10
    true_sum = sum(d["w"].astype(np.float64) for d in deltas)
    # What the old code drew: default_rng([seed, round, CENTRAL_DP_NOISE]), std z * C.
    replayed = gaussian_noise((2000,), 1.0, round_rng(7, 1, Stream.CENTRAL_DP_NOISE))
    recovered = released - replayed
    assert np.linalg.norm(recovered - true_sum) > 0.5 * math.sqrt(2 * 2000)  # still all noise
    # Nor does a second server built from the same config release the same noise.
    again = _central_release(_wrapper(cfg, CentralDP), deltas)["w"].astype(np.float64) * 10
    assert np.linalg.norm(again - released) > 0.5 * math.sqrt(2 * 2000)


def test_adaptive_count_noise_is_secret_and_restored_from_the_checkpoint() -> None:
    cfg = {"dp": "central", "dp-noise-multiplier": 1.0, "dp-adaptive-clip": True}
    a, b = _wrapper(cfg, CentralDP), _wrapper(cfg, CentralDP)
    deltas = [{"w": np.full(3, 0.05, np.float32)}] * 10
    _central_release(a, deltas), _central_release(b, deltas)
    assert a.clipper is not None and b.clipper is not None
    assert a.clipper.clip != b.clipper.clip  # independent secret count noise
    # Restoring a's state continues a's streams exactly.
    c = _wrapper(cfg, CentralDP)
    c.restore(pickle.loads(pickle.dumps(a.state())))
    out_a = _central_release(a, deltas)
    out_c = _central_release(c, deltas)
    np.testing.assert_array_equal(out_a["w"], out_c["w"])


# ---- finding 7: central DP under SecAgg is calibrated to the rounded contribution ----------


def test_realised_secure_contribution_never_exceeds_the_calibrated_sensitivity() -> None:
    """Finding 7: stochastic rounding lengthened a contribution by up to sqrt(d)/scale while
    the noise assumed clip. Adversarial inputs sit at fractional .5 after scaling."""
    cfg = {"dp": "central", "secagg": True, "dp-noise-multiplier": 1.0, "dp-clip": 1.0}
    privacy = _wrapper(cfg, CentralDP)
    d = 100_000
    (template, *_) = _configure(privacy, 1, {"w": np.zeros(d, np.float32)}, 10)
    enc = privacy.summable_encoding(dim=d, num_clients=10, bits=12, scale=0.0, rotation_seed=0)
    assert isinstance(enc, ClippedSum)
    privacy.aggregate_secure_sum(1, {"w": np.zeros(d)}, 10, _reply(template, {}), {})
    calibrated = privacy.report["dp_noise_std"] / privacy.noise_multiplier
    rng = np.random.default_rng(3)
    attacks = [
        np.full(d, 0.5 / enc.scale),  # every coordinate rounds to 0 or 1
        np.full(d, 1.0 / math.sqrt(d)),  # norm exactly clip, all coordinates rounded
        rng.normal(size=d),  # clipped to norm clip
    ]
    norms = [
        float(np.linalg.norm(enc.encode(x, 1, rng).astype(np.float64) / enc.scale))
        for x in attacks
        for _ in range(3)
    ]
    assert max(norms) > privacy.clip  # rounding does lengthen contributions...
    assert max(norms) <= calibrated * (1 + 1e-12)  # ...but never past what the noise covers
    # The grid mechanism's std is (1 + 1/GRID_RESOLUTION) times z over that bound.
    assert calibrated == pytest.approx(enc.l2_sensitivity * (1 + 1 / GRID_RESOLUTION))
    assert privacy.accountant.history == [(1.0, 0.1, 1)]  # accounted at z over that bound


# ---- finding 8: distributed DP never overspends --------------------------------------------


def _ddp_round(privacy: DistributedDP, rnd: int, d: int, contributors: int) -> bool:
    """One round as SecAggStrategy drives it; False if the wrapper refused it."""
    messages = _configure(privacy, rnd, {"w": np.zeros(d, np.float32)}, 10)
    if not messages:
        return False
    privacy.summable_encoding(dim=d, num_clients=10, bits=0, scale=0.0, rotation_seed=rnd)
    privacy.aggregate_secure_sum(rnd, {"w": np.zeros(d)}, contributors, _reply(messages[0], {}), {})
    return True


def test_distributed_budget_holds_when_clients_drop_out_in_the_last_round() -> None:
    """Finding 8: the check predicted with the last round's multiplier; a round with more
    dropouts then charged a smaller effective multiplier (4.095 > 4)."""
    cfg = {"dp": "distributed", "secagg": True, "dp-epsilon": 4.0, "num-rounds": 5}
    privacy = _wrapper(cfg, DistributedDP)
    t = privacy.worst_contributors(10)
    assert t < 10
    ran = 0
    for rnd, contributors in enumerate([10, 10, 10, 10, t], start=1):
        if privacy.before_round(rnd) or not _ddp_round(privacy, rnd, 410, contributors):
            break
        ran += 1
        assert privacy.epsilon <= 4.0
    assert ran == 5  # calibrated for the worst case: every planned round fits


def test_distributed_budget_holds_at_low_bits_in_round_one() -> None:
    """Finding 8: an explicit z at 8 bits was checked with the nominal multiplier but
    charged the (much lower) effective one in round 1 (1.289 > 1.0)."""
    nominal = {"dp": "distributed", "secagg": True, "dp-noise-multiplier": 1.0}
    probe = _wrapper(nominal, DistributedDP)
    z = 1.001 * noise_for_budget(1.0, probe.delta, probe.sample_rate, 1, "rdp")
    cfg = {
        "dp": "distributed",
        "secagg": True,
        "dp-bits": 8,
        "dp-noise-multiplier": z,
        "dp-epsilon": 1.0,
    }
    privacy = _wrapper(cfg, DistributedDP)
    assert privacy.before_round(1) == ""  # the nominal z fits the budget...
    ran = _ddp_round(privacy, 1, 410, 10)
    assert privacy.epsilon <= 1.0  # ...but the round is refused before anything is released
    assert not ran and privacy.accountant.total_steps == 0
    assert "dp-epsilon" in privacy.before_round(2)  # and the run stops


# ---- findings 2 and 9: local DP and what clients send ---------------------------------------


def _client_round(cfg: dict[str, Any], nodes: int = 2) -> tuple[list[Message], Arrays]:
    """Round 1 of FedAvg through the real ClientApp; the replies and the global model."""
    grid = inprocess.InProcessGrid(build_client_app(cfg), nodes)
    arrays = state_to_numpy(new_model(cfg, seed=0))
    messages = FedAvg(fraction_train=1.0, min_available_nodes=1).configure_train(
        1, to_record(arrays), ConfigRecord(), grid
    )
    return list(grid.send_and_receive(messages)), arrays


def test_server_cannot_replay_a_local_dp_client() -> None:
    """Finding 2: DP-SGD's noise and batches came from (seed, round, partition-id), so the
    server replayed ``train_local_dp`` bit for bit."""
    cfg = resolve_config(RUN, {"dp": "local", "dp-noise-multiplier": 1.0, "num-clients": 2})
    replies, arrays = _client_round(cfg)
    client = from_record(replies[0].content["arrays"])
    # The server's replay of partition 0, with everything it knows.
    model = new_model(cfg)
    load_numpy_state(model, arrays)
    x, y = client_train_data(cfg, 0, 2)
    train_local_dp(model, x, y, cfg, RecordDict(), make_generator(int(cfg["seed"]), 1, 0))
    replay = state_to_numpy(model)
    assert not np.array_equal(flatten(replay), flatten(client))
    # Two clients' rounds with the same data and config differ too (fresh secret noise).
    again = from_record(_client_round(cfg)[0][0].content["arrays"])
    assert not np.array_equal(flatten(again), flatten(client))


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_no_per_client_loss_leaves_the_client_under_dp(mode: str) -> None:
    """Finding 9: each client's exact train-loss reached the server (the secure mod forwards
    the reply's metrics minus the weight key)."""
    extra = {"dp": mode, "dp-noise-multiplier": 1.0, "num-clients": 2}
    if mode == "distributed":
        extra["secagg"] = True
    cfg = resolve_config(RUN, extra)
    replies, _ = _client_round(cfg)
    for reply in replies:
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        keys = {k for rec in reply.content.metric_records.values() for k in rec}
        assert "train-loss" not in keys
        assert keys <= {"num-examples", "epsilon", "delta"}
    plain, _ = _client_round(resolve_config(RUN, {"num-clients": 2}))
    assert "train-loss" in plain[0].content["metrics"]  # without DP it still reports it


def test_handshake_does_not_send_the_number_of_examples() -> None:
    cfg = resolve_config(RUN, {"dp": "central", "dp-noise-multiplier": 1.0})
    app = build_client_app(cfg)
    grid = inprocess.InProcessGrid(app, 2)
    query = Message(
        content=RecordDict({"config": ConfigRecord()}), message_type="query", dst_node_id=1000
    )
    (reply,) = grid.send_and_receive([query])
    assert dict(reply.content["node"]) == {"partition-id": 0, "num-partitions": 2}


# ---- findings 1, 6, 9 through the round loop; bit-identical resume ---------------------------


class _Recording(inprocess.InProcessGrid):
    """Records which partitions were sent train messages in each round."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(build_client_app(cfg), int(cfg["num-clients"]))
        self.trained: list[list[int]] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == "train"]
        if train and "arrays" in train[0].content:
            self.trained.append(sorted(m.metadata.dst_node_id - 1000 for m in train))
        return super().send_and_receive(messages, timeout=timeout)


def _run(cfg: dict[str, Any], path: Path, copy_after: int = 0) -> _Recording:
    grid = _Recording(cfg)

    def on_round(row: dict[str, Any]) -> None:
        if row["round"] == copy_after:
            shutil.copytree(path, path.with_name(path.name + "-copy"))

    run_federation(grid, cfg, RunDir(path), on_round=on_round, node_timeout=5)
    return grid


def _model(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "model.pt")  # type: ignore[no-any-return]


def test_central_dp_run_is_secret_and_resumes_bit_identically(tmp_path: Path) -> None:
    cfg = resolve_config(RUN, {"dp": "central", "dp-noise-multiplier": 0.5, "dp-clip": 1.0})
    full = _run(cfg, tmp_path / "a", copy_after=2)
    # Finding 6: the sampled clients are not sample_partitions(seed, ...).
    public = [sample_partitions(int(cfg["seed"]), r, 8, 2) for r in range(1, 5)]
    assert len(full.trained) == 4 and full.trained != public
    # Finding 9: no client loss and no exact clipping count in metrics.jsonl.
    rows = RunDir(tmp_path / "a").read_metrics()
    assert all("train_loss" not in r and "dp_unclipped_fraction" not in r for r in rows)
    # The checkpoint holds the secret keys and is owner-only.
    ckpt = tmp_path / "a" / CHECKPOINT
    assert stat.S_IMODE(os.stat(ckpt).st_mode) == 0o600
    # Resume the copy taken after round 2: rounds 3-4 repeat the uninterrupted run exactly.
    resumed = _run(cfg, tmp_path / "a-copy")
    assert resumed.trained == full.trained[2:]
    a, b = _model(tmp_path / "a"), _model(tmp_path / "a-copy")
    assert all(torch.equal(a[k], b[k]) for k in a)
    timing = ("wall_s", "elapsed_s")
    resumed_rows = RunDir(tmp_path / "a-copy").read_metrics()
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed_rows] == [
        {k: v for k, v in r.items() if k not in timing} for r in rows
    ]
    # A second run with the same config and seed releases different noise.
    _run(cfg, tmp_path / "b")
    c = _model(tmp_path / "b")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_sampling_is_secret_under_user_level_dp_and_by_seed_otherwise() -> None:
    for mode in ("central", "distributed"):
        cfg = resolve_config(BASE, {"dp": mode, "dp-noise-multiplier": 1.0, "secagg": True})
        sampler = ClientSampler(cfg)
        got = [sampler.sample(r, 100, 10) for r in range(1, 21)]
        public = [sample_partitions(0, r, 100, 10) for r in range(1, 21)]
        assert sum(g == p for g, p in zip(got, public, strict=True)) == 0
        again = ClientSampler(cfg)
        again.restore(pickle.loads(pickle.dumps(sampler.state())))
        assert [again.sample(r, 100, 10) for r in range(1, 21)] == got
    for mode in ("none", "local"):
        cfg = resolve_config(BASE, {"dp": mode, "dp-noise-multiplier": 1.0})
        sampler = ClientSampler(cfg)
        assert [sampler.sample(r, 100, 10) for r in range(1, 6)] == [
            sample_partitions(0, r, 100, 10) for r in range(1, 6)
        ]


def test_checkpoint_is_written_owner_only(tmp_path: Path) -> None:
    from fedsqueeze.server.rundir import Checkpoint

    old = os.umask(0)
    try:
        run_dir = RunDir(tmp_path)
        run_dir.save_checkpoint(Checkpoint(1, {}, b""))
        run_dir.write_json("summary.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / CHECKPOINT).st_mode) == 0o600
