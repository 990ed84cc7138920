"""Distributed DP on a count sketch under SecAgg+ (``codec = "sketch(F)"``, ``dp = "distributed"``).

Each client sketches its update and the distributed-DP encoding clips, rotates, rounds and
noises the *sketch* (the vector that is masked and summed), so the accountant's sensitivity
is the clip whatever the sketch does to a vector's norm; the server's unsketching is
post-processing of the noised sum.

Adversaries: an honest-but-curious server that sees only the SecAgg+ sum (up to ``n - t``
clients may drop, so only ``t`` noise shares need be in it), and an active server that
describes the round's encoding and would like a client to add less noise than its floor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg
from hypothesis import given, settings
from hypothesis import strategies as st
from test_secure_glue import _plain_fedavg_delta, _run, _step

from fedsqueeze.client.secure import _encode_input
from fedsqueeze.compression import Sketch
from fedsqueeze.compression.sketch import CountSketch, SketchAccumulator, sketch_shape
from fedsqueeze.config import ConfigError, resolve_config
from fedsqueeze.contracts.streams import Stream, round_seed
from fedsqueeze.contracts.summable import (
    DistributedDPSum,
    EncodingError,
    SketchSum,
    check_privacy_floor,
    encoding_from_fields,
)
from fedsqueeze.privacy import DistributedDPParams
from fedsqueeze.secagg import from_field, to_field
from fedsqueeze.server.compose import StrategyCompositionError
from fedsqueeze.server.dp import CentralDP, DistributedDP
from fedsqueeze.server.secure import SecAggStrategy

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order")

SKETCH_DDP = {
    "dp": "distributed",
    "dp-clip": 1.0,
    "dp-noise-multiplier": 0.5,
    "dp-bits": 16,
    "codec": "sketch(64)",
}


def _sketch_ddp(cells: int, dim: int, z: float, n: int, seed: int = 3) -> SketchSum:
    params = DistributedDPParams.for_bits(cells, 1.0, 16, n, z)
    return SketchSum(DistributedDPSum(params, 11), dim, 1, cells, seed)


# --- the encoding: sensitivity in the noised space -------------------------------------------


def test_a_client_whose_sketch_exceeds_the_clip_contributes_at_most_the_clip() -> None:
    """A client aligns its whole update with one cell's signs: the sketch is ~sqrt(d / cells)
    times longer than the update, and the update itself is 1e6 times the clip. What enters
    the sum (decoded without noise) still has norm at most the clip plus rounding."""
    dim, cells = 640, 64
    enc = _sketch_ddp(cells, dim, z=1e-9, n=2)  # noise far below one unit: the clean vector
    cs = enc.sketch
    in_cell0 = cs.cells[0] == 0
    x = np.where(in_cell0, cs.signs[0].astype(np.float64), 0.0) * 1e6
    assert np.linalg.norm(cs.sketch(x)) > 3 * np.linalg.norm(x)  # the sketch amplifies it
    ints = enc.encode(x, 1, np.random.default_rng())
    params = enc.inner.params  # type: ignore[attr-defined]
    assert np.linalg.norm(ints.astype(np.float64)) <= params.l2_sensitivity
    table, _ = enc.decode_sum(ints, 1)
    assert np.linalg.norm(table) <= params.l2_sensitivity / params.scale
    assert params.l2_sensitivity / params.scale < 1.0 * 1.05  # = clip, up to rounding


@settings(max_examples=25, deadline=None)
@given(
    dim=st.integers(20, 700),
    frac=st.floats(0.05, 0.9),
    rows=st.integers(1, 3),
    seed=st.integers(0, 2**31),
    n=st.integers(2, 6),
)
def test_sketch_ddp_encoding_survives_its_description_and_the_field(
    dim: int, frac: float, rows: int, seed: int, n: int
) -> None:
    """The setup's description round-trips; the modular sum of n clients decodes to the sum
    of their clipped sketch tables, up to noise and rounding."""
    r, cols = sketch_shape(dim, frac, rows)
    params = DistributedDPParams.for_bits(r * cols, 1.0, 20, n, 1e-3)
    enc = SketchSum(DistributedDPSum(params, seed % 997), dim, r, cols, seed)
    again = encoding_from_fields(enc.to_fields())
    assert again == enc and again.vector_len == params.padded_dim
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=dim) * rng.uniform(0.01, 3) for _ in range(n)]
    field_sum = np.zeros(enc.vector_len, dtype=np.uint64)
    for x in xs:
        ints = again.encode(x, 1, rng)
        field_sum = (field_sum + to_field(ints, enc.bits, wrap=True)) & np.uint64(2**20 - 1)
    total, weight = enc.decode_sum(from_field(field_sum, enc.bits), n)
    expected = np.zeros(r * cols)
    for x in xs:
        table = enc.sketch.sketch(x) / np.sqrt(r)
        norm = np.linalg.norm(table)
        expected += table * min(1.0, 1.0 / norm) if norm > 0 else table
    expected *= np.sqrt(r)
    assert weight == n
    # Each client rounds every rotated coordinate by < 1 unit of 1/scale; the summed noise
    # has std z·C = 1e-3 per coordinate (8 sigma of its norm allowed).
    rounding = n * np.sqrt(params.padded_dim) / params.scale
    noise = 8e-3 * np.sqrt(params.padded_dim)
    assert np.linalg.norm(total - expected) <= np.sqrt(r) * (rounding + noise)


def test_the_device_floor_sees_through_a_sketch() -> None:
    """An active server wraps a weakly noised distributed-DP encoding in a sketch: the device
    still checks the floor (before the fix only random-k was unwrapped, and a sketch passed)."""
    node = {"dp-min-noise-multiplier": "1.0"}
    weak = _sketch_ddp(64, 640, z=0.3, n=5)
    with pytest.raises(EncodingError, match="effective noise multiplier"):
        check_privacy_floor(weak, node, 5)
    check_privacy_floor(_sketch_ddp(64, 640, z=3.0, n=5), node, 3)


# --- composition ------------------------------------------------------------------------------


def _ddp(**kw: Any) -> DistributedDP:
    return DistributedDP(
        FedAvg(), clip=1.0, clients_per_round=5, num_clients=5, noise_multiplier=1.0, **kw
    )


def test_composition_refusals_and_the_config() -> None:
    sketch = Sketch(0.1)
    central = CentralDP(FedAvg(), clip=1.0, clients_per_round=5, num_clients=5, noise_multiplier=1)
    with pytest.raises(StrategyCompositionError, match="needs DistributedDP"):
        SecAggStrategy(central, sketch=sketch)
    with pytest.raises(StrategyCompositionError, match="same sketch stage"):
        SecAggStrategy(_ddp(), sketch=sketch)  # DistributedDP would budget the dense length
    with pytest.raises(StrategyCompositionError, match="no sketch momentum"):
        SecAggStrategy(_ddp(sketch=Sketch(0.1, momentum=0.5)), sketch=Sketch(0.1, momentum=0.5))
    SecAggStrategy(_ddp(sketch=sketch), sketch=sketch)
    resolve_config({"secagg": True, **SKETCH_DDP})
    with pytest.raises(ConfigError, match="no central dp"):
        resolve_config({"secagg": True, **SKETCH_DDP, "dp": "central"})


def test_hashes_are_fresh_every_round_under_dp_and_fixed_without() -> None:
    def seeds(strategy: SecAggStrategy) -> list[int]:
        out = []
        for rnd in (1, 2):
            enc = strategy._encoding(640, 5, rnd)
            assert isinstance(enc, SketchSum)
            out.append(enc.seed)
        return out

    sketch = Sketch(64)
    dp_seeds = seeds(SecAggStrategy(_ddp(sketch=sketch), sketch=sketch))
    assert dp_seeds == [round_seed(0, r, Stream.SKETCH) for r in (1, 2)]
    assert seeds(SecAggStrategy(FedAvg(), sketch=sketch)) == [round_seed(0, 0, Stream.SKETCH)] * 2


# --- whole rounds through the real ClientApp (in process, 5 clients) --------------------------


def test_sketch_ddp_round_is_noised_and_budgeted_like_a_dense_update() -> None:
    # A clip no update reaches, so that the signal is the plain mean's; z·C / n = 1 per cell.
    config = {**SKETCH_DDP, "dp-clip": 100.0, "dp-noise-multiplier": 0.05}
    run = _run(config)
    (r,) = run.rounds
    assert r.arrays is not None and r.row["clients"] == 5
    d = sum(v.size for v in run.start.values())
    assert r.row["secagg_vector_len"] == 64 and r.row["secagg_bits"] == 16
    # Sensitivity, calibration and accounting: those of a dense 64-coordinate update.
    privacy = run.wrapper(DistributedDP)
    dense = DistributedDP(
        FedAvg(), clip=100.0, clients_per_round=5, num_clients=5, noise_multiplier=0.05
    ).params(64, 5)
    assert privacy._round_params == dense
    assert r.row["effective_noise_multiplier"] == pytest.approx(dense.effective_noise_multiplier(5))
    assert privacy.epsilon > 0 and r.row["epsilon"] == privacy.epsilon
    # The step is the unsketched plain mean (this round's hashes) plus noise of the
    # calibrated size: std z·C / n = 1 per cell, spread by S^T over the coordinates.
    plain = _plain_fedavg_delta({"secagg-clip": 100.0, "update-norm-factor": 0.0})
    keys = list(run.start)
    mean = np.concatenate([plain[k].ravel() for k in keys]).astype(np.float64)
    cs = CountSketch(d, 1, 64, round_seed(0, 1, Stream.SKETCH))
    clean = SketchAccumulator(cs, d).step(cs.sketch(mean))
    noise = _step(run) - clean
    per_cell = cs.sketch(noise) / np.bincount(cs.cells[0], minlength=64).clip(1)
    assert 0.7 < float(np.std(per_cell)) < 1.4  # 64 cells: the sample sd is within 10%


def test_the_clients_noise_is_secret() -> None:
    """The client mod encodes with OS entropy: the same update, encoding and run seed give
    different noised vectors, so nobody who knows the seed can subtract the noise."""
    enc = _sketch_ddp(64, 640, z=1.0, n=5)
    x = np.random.default_rng(0).normal(size=640)
    first, second = (_encode_input(enc, x, 1, "", None, {}) for _ in range(2))  # type: ignore[arg-type]
    assert first.shape == second.shape == (64,) and not np.array_equal(first, second)
