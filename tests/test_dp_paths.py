"""Central DP through the plain and the secure path, and distributed DP, release the same thing.

Issue 5's privacy table once showed central DP through the secure-aggregation path ~1.4 pp
above the plain path. These tests pin down why that was not a code-path difference: for the
same client deltas both central paths clip to the same ``dp-clip``, draw the *same* Gaussian
noise (the round's ``(seed, round, 0xD9)`` stream) and divide by ``clients-per-round``; and
distributed DP's decoded noise has the same per-coordinate std z·C as central DP's.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedsqueeze.client.secure import (
    choose_encoding,
    decode_integers,
    encode_integers,
    flatten,
)
from fedsqueeze.config import resolve_config
from fedsqueeze.privacy.distributed import DistributedDPClient, center_mod, decode_sum, wrap_mod
from fedsqueeze.server.privacy import ServerPrivacy

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


def _deltas(rng: np.random.Generator, scale: float = 0.02) -> list[dict[str, np.ndarray]]:
    return [
        {
            name: (rng.normal(size=shape) * scale).astype(np.float32)
            for name, shape in SHAPES.items()
        }
        for _ in range(K)
    ]


def _secure_central(
    privacy: ServerPrivacy, deltas: list[dict[str, np.ndarray]], rnd: int, seed: int
) -> np.ndarray:
    """What ``fedsqueeze.server.secure`` computes for central DP, without the protocol (masks
    cancel): clients clip/scale/round, the server decodes the integer sum, noises it with
    the round's ``(seed, round, 0xD9)`` stream and divides by clients-per-round."""
    enc = choose_encoding(num_clients=K, clip=privacy.clip, weighted=False)
    rng = np.random.default_rng(99)
    total = sum(encode_integers(flatten(d), enc, 1, None, rng) for d in deltas)
    values, _ = decode_integers(np.asarray(total), enc)
    noised = privacy.noise_secure_sum(values, np.random.default_rng([seed, rnd, 0xD9]))
    return noised / privacy.clients_per_round


def test_central_plain_and_secure_paths_release_the_same_aggregate() -> None:
    plain = ServerPrivacy(resolve_config({**SUITE, "dp": "central"}))
    secure = ServerPrivacy(resolve_config({**SUITE, "dp": "central", "secagg": True}))
    assert plain.noise_multiplier == secure.noise_multiplier
    aggregate = plain.aggregator()
    assert aggregate is not None and secure.aggregator() is None
    deltas = _deltas(np.random.default_rng(0))  # norms ≈ 0.5 > clip: every client is clipped
    assert all(np.linalg.norm(flatten(d)) > plain.clip for d in deltas)
    for rnd in (1, 7):
        out_plain = flatten(aggregate(rnd, deltas, [14] * K))
        out_secure = _secure_central(secure, deltas, rnd, seed=0)
        # Only the secure path's stochastic rounding differs: |error| <= K / scale / K.
        enc = choose_encoding(num_clients=K, clip=plain.clip, weighted=False)
        np.testing.assert_allclose(out_plain, out_secure, rtol=0, atol=1.0 / enc.scale + 1e-6)
        # Not trivially equal: the noise dominates the clipped mean (norm <= clip).
        assert np.linalg.norm(out_plain) > 2 * plain.clip


def test_central_plain_and_secure_paths_add_the_same_noise_std() -> None:
    plain = ServerPrivacy(resolve_config({**SUITE, "dp": "central"}))
    secure = ServerPrivacy(resolve_config({**SUITE, "dp": "central", "secagg": True}))
    aggregate = plain.aggregator()
    assert aggregate is not None
    zeros = [{k: np.zeros(s, np.float32) for k, s in SHAPES.items()}] * K
    a = np.concatenate([flatten(aggregate(r, zeros, [1] * K)) for r in range(1, 201)])
    b = np.concatenate([_secure_central(secure, zeros, r, seed=0) for r in range(1, 201)])
    expected = plain.noise_multiplier * plain.clip / K
    tol = 5 / math.sqrt(2 * a.size)
    assert abs(a.std() / expected - 1) < tol
    assert abs(b.std() / expected - 1) < tol


def test_distributed_decoded_noise_has_central_std_and_no_bias() -> None:
    cfg = resolve_config({**SUITE, "dp": "distributed", "secagg": True, "dp-bits": 16})
    privacy = ServerPrivacy(cfg)
    central_std = ServerPrivacy(resolve_config({**SUITE, "dp": "central"})).noise_multiplier * 0.3
    params = privacy.distributed_params(650, K)
    assert params.effective_noise_multiplier() >= privacy.noise_multiplier
    rng = np.random.default_rng(5)
    client = DistributedDPClient(params)
    errors = []
    for trial in range(15):
        xs = [rng.normal(size=650) for _ in range(K)]
        xs = [x / np.linalg.norm(x) * rng.uniform(0.2, 0.45) for x in xs]
        exact = sum(x * min(1.0, 0.3 / np.linalg.norm(x)) for x in xs)
        seed = 1000 + trial
        total = sum(wrap_mod(client.encode(x, rng, seed), params.bits) for x in xs)
        decoded = decode_sum(
            center_mod(wrap_mod(np.asarray(total), params.bits), params.bits), K, params, seed
        )
        errors.append(decoded - exact)
    err = np.concatenate(errors)
    # Noise std = nominal z·C (>= the central z·C by the rounding-inflated sensitivity, 0.1%).
    expected = params.noise_multiplier * params.clip
    assert abs(err.std() / expected - 1) < 5 / math.sqrt(2 * err.size)
    assert expected == pytest.approx(central_std, rel=3e-3)
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
