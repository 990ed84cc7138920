"""Central DP through the plain and the secure path, and distributed DP, release the same thing.

Issue 5's privacy table once showed central DP through the secure-aggregation path ~1.4 pp
above the plain path. These tests pin down why that was not a code-path difference: for the
same client deltas both central paths clip to the same ``dp-clip``, draw the *same* Gaussian
noise (the wrapper's secret per-round stream) and divide by
``clients-per-round``; and distributed DP's decoded noise has the same per-coordinate std
z·C as central DP's. Both paths are the ``CentralDP`` wrapper a run config builds: without
secagg it aggregates the replies itself, inside ``SecAggStrategy`` it noises the decoded sum.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedsqueeze.config import resolve_config
from fedsqueeze.contracts.records import flatten, from_record, to_record, unflatten
from fedsqueeze.contracts.summable import ClippedSum, DistributedDPSum
from fedsqueeze.secagg.field import from_field, to_field
from fedsqueeze.server.dp import CentralDP, DistributedDP
from fedsqueeze.server.hooks import strategy_chain
from fedsqueeze.server.strategies import build_chain

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")

# The privacy suite's federation (simulations/privacy/*.toml): logreg on digits, 650 params.
SUITE = {
    "dataset": "digits",
    "model": "logreg",
    "num-clients": 100,
    "clients-per-round": 20,
    "num-rounds": 30,
    "dp-clip": 0.3,
    "dp-epsilon": 4.0,
}
SHAPES = {"fc.weight": (10, 64), "fc.bias": (10,)}
K = 20
Arrays = dict[str, np.ndarray]


class _Nodes:
    """The only Grid method Flower's FedAvg.configure_train needs: K nodes."""

    def get_node_ids(self) -> list[int]:
        return list(range(1, K + 1))


def _wrapper(overrides: dict[str, Any], kind: type) -> Any:
    """The ``kind`` wrapper of the strategy chain the suite's config builds."""
    chain = build_chain(resolve_config({**SUITE, **overrides}))
    return next(s for s in strategy_chain(chain) if isinstance(s, kind))


def _deltas(rng: np.random.Generator, scale: float = 0.02) -> list[Arrays]:
    return [
        {
            name: (rng.normal(size=shape) * scale).astype(np.float32)
            for name, shape in SHAPES.items()
        }
        for _ in range(K)
    ]


def _configure(privacy: CentralDP, rnd: int, like: Arrays) -> list[Message]:
    base = {k: np.zeros_like(v) for k, v in like.items()}
    messages = privacy.configure_train(rnd, to_record(base), ConfigRecord(), _Nodes())
    return sorted(messages, key=lambda m: m.metadata.dst_node_id)


def _reply(to: Message, arrays: Arrays) -> Message:
    metrics = MetricRecord({"num-examples": 14})  # ignored: the DP mean is unweighted
    return Message(RecordDict({"arrays": to_record(arrays), "metrics": metrics}), reply_to=to)


def _plain_central(privacy: CentralDP, deltas: list[Arrays], rnd: int) -> np.ndarray:
    """The plain path: the wrapper gets ``global + delta`` replies (global = 0 here), clips,
    sums, noises and divides by clients-per-round."""
    assert not privacy.secure
    messages = _configure(privacy, rnd, deltas[0])
    replies = [_reply(m, d) for m, d in zip(messages, deltas, strict=True)]
    arrays, _ = privacy.aggregate_train(rnd, replies)
    assert arrays is not None
    return flatten(from_record(arrays))


def _secure_central(privacy: CentralDP, deltas: list[Arrays], rnd: int) -> np.ndarray:
    """What ``SecAggStrategy`` computes for central DP, without the protocol (masks cancel):
    clients clip/scale/round with the wrapper's summable encoding, the server decodes the
    integer sum and hands it to the wrapper, which noises it with the round's
    secret per-round stream and divides by clients-per-round."""
    assert privacy.secure
    (template, *_) = _configure(privacy, rnd, deltas[0])
    dim = flatten(deltas[0]).size
    enc = privacy.summable_encoding(dim=dim, num_clients=K, bits=0, scale=0.0, rotation_seed=0)
    assert isinstance(enc, ClippedSum) and enc.clip == privacy.clip
    rng = np.random.default_rng(99)
    int_sum = sum(enc.encode(flatten(d), 1, rng) for d in deltas)
    total, _ = enc.decode_sum(np.asarray(int_sum), K)
    total_arrays = unflatten(total, deltas[0])
    arrays, _ = privacy.aggregate_secure_sum(rnd, total_arrays, K, _reply(template, {}), {})
    assert arrays is not None
    return flatten(from_record(arrays))


def test_central_plain_and_secure_paths_release_the_same_aggregate() -> None:
    plain = _wrapper({"dp": "central"}, CentralDP)
    secure = _wrapper({"dp": "central", "secagg": True}, CentralDP)
    assert plain.noise_multiplier == secure.noise_multiplier
    secure.streams = plain.streams  # the same secret noise key, so the noises line up
    deltas = _deltas(np.random.default_rng(0))  # norms ≈ 0.5 > clip: every client is clipped
    assert all(np.linalg.norm(flatten(d)) > plain.clip for d in deltas)
    enc = secure.summable_encoding(dim=650, num_clients=K, bits=0, scale=0.0, rotation_seed=0)
    for rnd in (1, 7):
        out_plain = _plain_central(plain, deltas, rnd)
        out_secure = _secure_central(secure, deltas, rnd)
        # The secure path's stochastic rounding differs (|error| <= K / scale / K), and its
        # noise is calibrated to the rounded contribution's bound, a hair above clip.
        assert 1 < enc.l2_sensitivity / secure.clip < 1.001
        np.testing.assert_allclose(out_plain, out_secure, rtol=0, atol=1.0 / enc.scale + 1e-6)
        # Not trivially equal: the noise is there (the clipped mean has norm <= clip; with
        # the secret noise the released norm is ~0.63 = 2.1 clip, sd ~0.015 over keys).
        assert np.linalg.norm(out_plain) > 1.5 * plain.clip


def test_central_plain_and_secure_paths_add_the_same_noise_std() -> None:
    # The suite's calibrated multiplier, without its budget. Every released round is
    # accounted (~0.2 s of Opacus), so the 130,000 noise samples come from 5 rounds of a
    # wider model rather than 200 rounds of the suite's 650 parameters.
    z = _wrapper({"dp": "central"}, CentralDP).noise_multiplier
    fixed = {"dp": "central", "dp-epsilon": 0.0, "dp-noise-multiplier": z}
    plain = _wrapper(fixed, CentralDP)
    secure = _wrapper({**fixed, "secagg": True}, CentralDP)
    zeros = [{"fc.weight": np.zeros((400, 64), np.float32), "fc.bias": np.zeros(400, np.float32)}]
    a = np.concatenate([_plain_central(plain, zeros * K, r) for r in range(1, 6)])
    b = np.concatenate([_secure_central(secure, zeros * K, r) for r in range(1, 6)])
    assert a.size == b.size == 200 * 650
    expected = plain.noise_multiplier * plain.clip / K
    tol = 5 / math.sqrt(2 * a.size)
    assert abs(a.std() / expected - 1) < tol
    assert abs(b.std() / expected - 1) < tol


def test_distributed_decoded_noise_has_central_std_and_no_bias() -> None:
    privacy = _wrapper({"dp": "distributed", "secagg": True, "dp-bits": 16}, DistributedDP)
    central_std = _wrapper({"dp": "central"}, CentralDP).noise_multiplier * 0.3
    params = privacy.params(650, K)
    assert params.effective_noise_multiplier() >= privacy.noise_multiplier
    rng = np.random.default_rng(5)
    mask = np.uint64((1 << params.bits) - 1)
    errors = []
    for trial in range(15):
        xs = [rng.normal(size=650) for _ in range(K)]
        xs = [x / np.linalg.norm(x) * rng.uniform(0.2, 0.45) for x in xs]
        exact = sum(x * min(1.0, 0.3 / np.linalg.norm(x)) for x in xs)
        # The round's encoding, as SecAggStrategy asks the wrapper for it.
        enc = privacy.summable_encoding(
            dim=650, num_clients=K, bits=0, scale=0.0, rotation_seed=1000 + trial
        )
        assert isinstance(enc, DistributedDPSum) and enc.params is params
        total = sum(to_field(enc.encode(x, 1, rng), params.bits, wrap=True) for x in xs)
        decoded, _ = enc.decode_sum(from_field(np.asarray(total) & mask, params.bits), K)
        errors.append(decoded - exact)
    err = np.concatenate(errors)
    # Noise std = nominal z·C, calibrated so that even the fewest contributors SecAgg+
    # accepts (their noise shares only) give the central z over the rounded sensitivity;
    # with all K clients the noise is larger than central DP's by about sqrt(K / t).
    expected = params.noise_multiplier * params.clip
    assert abs(err.std() / expected - 1) < 5 / math.sqrt(2 * err.size)
    worst = privacy.worst_contributors(K)
    assert worst < K
    central_z = central_std / 0.3
    assert params.effective_noise_multiplier(worst) == pytest.approx(central_z, rel=3e-3)
    assert expected >= central_std * math.sqrt(K / worst) * (1 - 3e-3)
    assert abs(err.mean()) < 5 * expected / math.sqrt(err.size)


def _load_runner() -> Any:
    path = Path(__file__).resolve().parents[1] / "simulations" / "privacy" / "run.py"
    spec = importlib.util.spec_from_file_location("privacy_run", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("privacy_run", module)
    spec.loader.exec_module(module)
    return module


def _run(cfg: dict[str, Any], accs: list[float]) -> dict[str, Any]:
    return {"summary": {"config": cfg}, "rounds": [{"accuracy": a} for a in accs], "label": "x"}


def test_report_groups_central_and_distributed_16_bit_runs_by_epsilon() -> None:
    runner = _load_runner()
    runs = [
        _run({"dp": "central", "dp-epsilon": 4.0}, [0.8] * 5),
        _run({"dp": "central", "dp-epsilon": 4.0, "seed": 1}, [0.9] * 5),
        _run({"dp": "central", "dp-epsilon": 1.0}, [0.1, 0.2, 0.6, 0.6, 0.6, 0.6, 0.6]),
        _run({"dp": "central", "dp-epsilon": 4.0, "secagg": True}, [0.5] * 5),
        _run({"dp": "distributed", "secagg": True, "dp-bits": 16, "dp-epsilon": 8.0}, [0.7]),
        _run({"dp": "distributed", "secagg": True, "dp-bits": 12, "dp-epsilon": 4.0}, [0.2]),
        _run(
            {
                "dp": "distributed",
                "secagg": True,
                "dp-bits": 16,
                "dp-epsilon": 4.0,
                "secagg-randk": 0.1,
            },
            [0.3],
        ),
        _run({"dp": "none"}, [0.9]),
    ]
    got = runner.curves(runs)
    assert set(got) == {"central", "distributed-16"}
    eps, means, values = zip(*got["central"], strict=True)
    assert eps == (1.0, 4.0)
    assert means == pytest.approx((0.6, 0.85))
    assert sorted(values[1]) == pytest.approx([0.8, 0.9])
    assert got["distributed-16"] == [(8.0, pytest.approx(0.7), [pytest.approx(0.7)])]


def test_report_reads_the_noise_spread_files(tmp_path: Path) -> None:
    runner = _load_runner()
    lines = [
        '{"mode": "central", "epsilon": 4.0, "noise_seed": 0, "mean_last5": 0.8}',
        '{"mode": "central", "epsilon": 4.0, "noise_seed": 1, "mean_last5": 0.9}',
        "central: 2 seeds, mean of last 5 = 0.8500 ± 0.0707 (sd)",
    ]
    (tmp_path / "noise_spread_central_eps4.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "unrelated.txt").write_text('{"mode": "x"}\n')
    assert runner.noise_spread(tmp_path) == {("central", 4.0): [0.8, 0.9]}
