"""Secure-aggregation glue: summable encodings, config refusals, and whole rounds in-process.

The round tests drive fedsqueeze's own strategy chain (``build_chain``) through the server
loop's ``train_round`` against the real ClientApp (its mods, its training) and the real
SecAgg+ core; only the transport is replaced by a grid that calls the ClientApp in this
process, which is what makes them run in milliseconds. Per-round fields are read from the
chain's round hooks, exactly as the loop writes them to ``metrics.jsonl``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import inprocess
import numpy as np
import pytest
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from test_secagg_consistency import signed

from fedsqueeze.client.app import build_client_app
from fedsqueeze.client.mods import ModPreconditionError
from fedsqueeze.client.secure import EF_STATE_KEY, STATE_KEY, _load
from fedsqueeze.config import ConfigError, resolve_config
from fedsqueeze.contracts.checks import check_secure_config
from fedsqueeze.contracts.records import CODEC_META_KEY, CODEC_STATE_KEY, from_record
from fedsqueeze.contracts.secure_wire import (
    CHECK,
    MASK,
    SETUP,
    SHARE,
    STAGES,
    UNMASK,
    SecureWireError,
    pack_reply,
    unpack_reply,
)
from fedsqueeze.contracts.streams import Stream, round_seed
from fedsqueeze.contracts.summable import (
    ClippedSum,
    DistributedDPSum,
    EncodingError,
    RandomK,
    SummableEncoding,
    choose_integer_encoding,
    encode_with_feedback,
    random_k,
)
from fedsqueeze.federation import new_model
from fedsqueeze.models.weights import state_to_numpy
from fedsqueeze.privacy import DistributedDPParams
from fedsqueeze.secagg import SecAggClient, SecAggConfig, SecAggServer, from_field, to_field
from fedsqueeze.server.dp import DPStrategy
from fedsqueeze.server.grid import CountingGrid
from fedsqueeze.server.hooks import hooks_in, strategy_chain
from fedsqueeze.server.rounds import train_round
from fedsqueeze.server.secure import SecAggStrategy, simulated_dropouts
from fedsqueeze.server.strategies import build_chain

Arrays = dict[str, np.ndarray]


def _secure_sum(vectors: dict[int, np.ndarray], bits: int, drop_after_mask: int = 0) -> Any:
    """Run the SecAgg+ core on field vectors; optionally drop clients during unmasking."""
    ids = sorted(vectors)
    n = len(ids)
    cfg = SecAggConfig(
        num_clients=n,
        neighbours=n - 1,
        threshold=SecAggConfig.min_secure_threshold(n - 1),
        bits=bits,
        vector_len=len(next(iter(vectors.values()))),
        round_seed=7,
    )
    server = SecAggServer(cfg, ids)
    setup = server.setup()
    clients = {c: SecAggClient(c, setup[c]) for c in ids}
    out = server.collect_keys({c: clients[c].advertise_keys() for c in ids})
    out = server.collect_shares({c: clients[c].share_keys(out[c]) for c in out})
    out = server.collect_masked({c: clients[c].masked_input(out[c], vectors[c]) for c in out})
    out = signed(server, clients, out)
    answering = sorted(out)[drop_after_mask:]
    return server.finish({c: clients[c].unmask(out[c]) for c in answering})


# --- encoding ------------------------------------------------------------------------------


def _integer_encoding(dim: int, n: int, clip: float, weighted: bool, cap: int, **kw: Any) -> Any:
    """The secure path's encoding: weighted by ``min(n_i, cap)`` inside the mask, or not."""
    return choose_integer_encoding(
        dim=dim, num_clients=n, clip=clip, weight_cap=cap if weighted else 0, **kw
    )


@pytest.mark.parametrize("weighted", [True, False])
def test_secure_sum_equals_plain_sum_of_integer_encodings(weighted: bool) -> None:
    rng = np.random.default_rng(0)
    n, d = 5, 300
    enc = _integer_encoding(d, n, 1.0, weighted, 50, bits=14)
    deltas = {c + 11: rng.normal(0, 0.2, d) for c in range(n)}
    sizes = {c: int(rng.integers(1, 51)) for c in deltas}
    ints = {c: enc.encode(deltas[c], sizes[c], rng) for c in deltas}
    assert all(int(np.abs(v).max()) <= enc.max_abs for v in ints.values())
    result = _secure_sum({c: to_field(v, enc.bits) for c, v in ints.items()}, enc.bits)
    signed = from_field(result.total, enc.bits)
    np.testing.assert_array_equal(signed, sum(ints.values()))  # exact, no wrap-around
    total, weight = enc.decode_sum(signed, n)
    mean = total / weight
    clipped = {c: v * min(1.0, 1.0 / np.linalg.norm(v)) for c, v in deltas.items()}
    if weighted:
        assert weight == sum(sizes.values())
        expected = sum(sizes[c] * clipped[c] for c in deltas) / weight
    else:
        assert weight == n
        expected = sum(clipped.values()) / n
    # Unbiased rounding: error per coordinate is at most one step per client.
    step = 1 / enc.scale * (enc.weight_cap / sum(sizes.values()) if weighted else 1 / n)
    assert np.abs(mean - expected).max() <= n * step + 1e-12
    assert np.abs(mean - expected).max() > 0  # rounding really happened


def test_sum_over_survivors_when_a_client_drops_during_unmasking() -> None:
    rng = np.random.default_rng(1)
    enc = _integer_encoding(40, 5, 1.0, True, 9, bits=16)
    ints = {c: enc.encode(rng.normal(0, 1, 40), 9, rng) for c in range(1, 6)}
    result = _secure_sum({c: to_field(v, 16) for c, v in ints.items()}, 16, drop_after_mask=1)
    assert len(result.included) == 5  # it sent its masked input, so it is in the sum
    np.testing.assert_array_equal(from_field(result.total, 16), sum(ints.values()))


def _unweighted(n: int, clip: float, bits: int) -> Any:
    """``inner_for(length)`` for :func:`random_k`: the unweighted encoding of that length."""
    return lambda length: choose_integer_encoding(dim=length, num_clients=n, clip=clip, bits=bits)


def test_random_k_positions_are_shared_and_only_those_are_sent() -> None:
    d = 1000
    inner_for = _unweighted(3, 100.0, 24)
    a_enc = random_k(inner_for, d, 0.1, seed=42)
    b_enc = random_k(inner_for, d, 0.1, seed=42)
    assert isinstance(a_enc, RandomK) and isinstance(b_enc, RandomK)
    a = a_enc.positions
    np.testing.assert_array_equal(a, b_enc.positions)
    assert len(a) == 100 and len(np.unique(a)) == 100
    other = random_k(inner_for, d, 0.1, seed=43)
    assert isinstance(other, RandomK) and not np.array_equal(a, other.positions)
    dense = random_k(inner_for, d, 1.0, seed=42)
    assert not isinstance(dense, RandomK) and dense.input_len == d
    x = np.arange(d, dtype=np.float64) / d
    ints = a_enc.encode(x, 1, np.random.default_rng(0))
    assert ints.shape == (100,) and a_enc.vector_len == 100
    assert isinstance(a_enc.inner, ClippedSum)
    scale = a_enc.inner.scale
    np.testing.assert_allclose(ints / scale, x[a], atol=1 / scale)
    # The server scatters the decoded sum back to the shared positions.
    total, _ = a_enc.decode_sum(ints, 1)
    assert total.shape == (d,) and np.count_nonzero(np.delete(total, a)) == 0


def test_choose_encoding_sizes_bits_and_refuses_overflow() -> None:
    enc = _integer_encoding(1, 10, 2.0, True, 100, bits=16)
    assert 10 * enc.max_abs <= 2**15 - 1
    enc = _integer_encoding(1, 10, 1.0, False, 0, scale=1000.0)
    assert enc.bits == (10 * 1000).bit_length() + 1
    with pytest.raises(EncodingError, match=r"overflow.*need 15 bits.*secagg-bits = 12"):
        _integer_encoding(1, 10, 1.0, False, 0, scale=1000.0, bits=12)
    with pytest.raises(EncodingError, match="weight coordinate"):
        _integer_encoding(1, 10, 1.0, True, 500, bits=12)
    # Auto width grows to hold the weights.
    assert _integer_encoding(1, 10, 1.0, True, 5000).bits > 16


def test_simulated_dropouts_are_seeded_and_sized() -> None:
    nodes = list(range(100, 110))
    a = simulated_dropouts(0, 3, nodes, 0.2)
    assert a == simulated_dropouts(0, 3, nodes, 0.2)
    assert len(a) == 2 and set(a.values()) <= set(STAGES) and set(a) <= set(nodes)
    assert simulated_dropouts(0, 3, nodes, 0.0) == {}


# --- config refusals -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"secagg": True, "codec": "q8"}, "codec stage 'q8' cannot run under secagg.*not linear"),
        ({"secagg": True, "codec": "topk(0.1)"}, "'topk\\(0.1\\)'"),
        ({"secagg": True, "codec": "randk(0.1)+ef21"}, "'ef21'.*only sees the masked sum"),
        (
            {"secagg": True, "codec": "randk(0.1)+ef", "dp": "distributed"},
            'error feedback.*dp = "distributed"',
        ),
        ({"secagg": True, "codec": "fp16"}, "'fp16'"),
        ({"dp": "distributed", "dp-noise-multiplier": 1.0}, "secagg"),
        ({"secagg": True, "secagg-bits": 8, "secagg-scale": 1000.0}, "overflow"),
        ({"secagg": True, "clients-per-round": 1}, "clients-per-round >= 2"),
        ({"secagg": True, "codec": "randk(0.2)", "secagg-randk": 0.1}, "both set random-k"),
        ({"simulate-dropout": 0.2}, "simulate-dropout needs secagg"),
    ],
)
def test_config_refusals(override: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        resolve_config(override)


def test_secure_configs_that_are_accepted() -> None:
    for ok in (
        {"secagg": True},
        {"secagg": True, "codec": "randk(0.1)"},
        {"secagg": True, "codec": "randk(0.1)+ef"},
        {"secagg": True, "codec": "ef"},
        {"secagg": True, "codec": "randk(0.1)+ef", "dp": "central", "dp-noise-multiplier": 1.0},
        {"secagg": False},
    ):
        check_secure_config(resolve_config(ok))


# --- error feedback under secagg -------------------------------------------------------------


def _ef_encoding(
    d: int, seed: int, *, clip: float, weighted: bool, cap: int, randk: float
) -> SummableEncoding:
    """The round's encoding as ``SecAggStrategy`` builds it: random-k around the integer one."""
    return random_k(
        lambda length: _integer_encoding(length, 4, clip, weighted, cap, bits=12), d, randk, seed
    )


@pytest.mark.parametrize(
    ("clip", "weighted", "randk"),
    [(50.0, True, 0.1), (1.0, True, 0.1), (50.0, False, 1.0), (0.5, False, 0.25)],
)
def test_error_feedback_invariant_sent_plus_residual_is_the_true_sum(
    clip: float, weighted: bool, randk: float
) -> None:
    """Over many rounds: sum of what was sent (in update units) + residual == sum of deltas."""
    rng = np.random.default_rng(3)
    d, n_i, cap = 500, 37, 80  # n_i < cap: the weight w = n_i / cap < 1 is undone in "sent"
    w = n_i / cap if weighted else 1.0
    residual = np.zeros(d, dtype=np.float32)
    total_delta = np.zeros(d)
    total_sent = np.zeros(d)
    for rnd in range(12):
        encoding = _ef_encoding(d, 1000 + rnd, clip=clip, weighted=weighted, cap=cap, randk=randk)
        inner = encoding.inner if isinstance(encoding, RandomK) else encoding
        assert isinstance(inner, ClippedSum)
        delta = rng.normal(0, 0.1, d)
        ints, new_residual = encode_with_feedback(encoding, delta, residual, n_i, rng)
        positions = encoding.positions if isinstance(encoding, RandomK) else None
        sent = np.zeros(d)
        values = ints[:-1] if weighted else ints
        if weighted:
            assert ints[-1] == n_i  # the weight coordinate is unchanged by feedback
        # The server-side meaning of the integers: weighted values / scale, de-weighted here.
        sel = slice(None) if positions is None else positions
        sent[sel] = values / (inner.scale * w)
        # What travels is clipped to C (plus at most one rounding step per coordinate).
        step = 1 / (inner.scale * w)
        assert np.linalg.norm(sent[sel]) <= clip + step * np.sqrt(values.size)
        if positions is not None:
            unsent = np.setdiff1d(np.arange(d), positions)
            v = delta + residual
            np.testing.assert_allclose(new_residual[unsent], v[unsent], rtol=1e-12)
        total_delta += delta
        total_sent += sent
        residual = new_residual.astype(np.float32)  # stored as float32 in Context.state
        np.testing.assert_allclose(total_sent + residual, total_delta, atol=1e-5)
    assert np.abs(residual).max() > 0


def test_error_feedback_is_refused_by_the_distributed_dp_encoder() -> None:
    params = DistributedDPParams.for_bits(10, 1.0, 16, 4, 1.0)
    encoding = DistributedDPSum(params, rotation_seed=0)
    with pytest.raises(EncodingError, match="not noised"):
        encode_with_feedback(encoding, np.zeros(10), np.zeros(10), 1, np.random.default_rng(0))


# --- whole rounds through the real ClientApp ------------------------------------------------


class InProcessGrid(inprocess.InProcessGrid):
    """fedsqueeze's own ClientApp for ``config``, run in this process."""

    def __init__(self, config: dict[str, Any], num_nodes: int) -> None:
        super().__init__(build_client_app(config), num_nodes)


SMALL = {
    "dataset": "digits",
    "model": "logreg",
    "num-clients": 5,
    "clients-per-round": 5,
    "local-epochs": 1,
    "lr": 0.1,
    "secagg": True,
    "secagg-clip": 5.0,
}


@dataclass
class Round:
    """One round as the server loop sees it."""

    arrays: Arrays | None
    """The new global model, or None when the round kept the old one."""
    row: dict[str, Any]
    """The fields the chain's round hooks add to the round's ``metrics.jsonl`` row."""
    view: CountingGrid


@dataclass
class Run:
    rounds: list[Round]
    start: Arrays
    arrays: Arrays
    strategy: Strategy
    grid: InProcessGrid

    def wrapper(self, kind: type) -> Any:
        """The wrapper of type ``kind`` in the run's strategy chain."""
        return next(s for s in strategy_chain(self.strategy) if isinstance(s, kind))


def train_one(strategy: Strategy, grid: Grid, rnd: int, arrays: Arrays) -> Round:
    """What the server loop does for a round's training: hooks, train_round, metrics row."""
    hooks = hooks_in(strategy)
    assert all(hook.before_round(rnd) == "" for hook in hooks)
    view = CountingGrid(grid, list(grid.get_node_ids()))
    new, _ = train_round(strategy, view, rnd, arrays, 60.0)
    row: dict[str, Any] = {"round": rnd}
    for hook in hooks:
        hook.after_round(rnd, row)
    return Round(new, row, view)


def _run(overrides: dict[str, Any], rounds: int = 1, grid_type: type = InProcessGrid) -> Run:
    cfg = resolve_config(SMALL, overrides)
    grid = grid_type(cfg, int(cfg["num-clients"]))
    strategy = build_chain(cfg)
    start = state_to_numpy(new_model(cfg, seed=0))
    arrays = start
    done = []
    for rnd in range(1, rounds + 1):
        done.append(train_one(strategy, grid, rnd, arrays))
        if done[-1].arrays is not None:
            arrays = done[-1].arrays
    return Run(done, start, arrays, strategy, grid)


def _plain_fedavg_delta(overrides: dict[str, Any]) -> Arrays:
    """The round's weighted FedAvg delta computed in the clear, for comparison."""
    cfg = resolve_config(SMALL, overrides, {"secagg": False})
    grid = InProcessGrid(cfg, int(cfg["num-clients"]))
    arrays = state_to_numpy(new_model(cfg, seed=0))
    out = train_one(build_chain(cfg), grid, 1, arrays)
    assert out.arrays is not None and out.row["clients"] == 5
    return {k: out.arrays[k] - arrays[k] for k in arrays}


def _step(run: Run) -> np.ndarray:
    return np.concatenate([(run.arrays[k] - run.start[k]).ravel() for k in run.start])


def test_secure_round_matches_plain_weighted_fedavg() -> None:
    run = _run({"secagg-clip": 100.0, "secagg-bits": 24})
    (r,) = run.rounds
    assert r.row["clients"] == 5 and r.row["dropped_clients"] == 0
    assert r.row["rejected_updates"] == 0
    assert r.row["secagg_bits"] == 24
    # The plain path with its influence bounds off: SecAgg+ has no individual norms to bound.
    plain = _plain_fedavg_delta({"secagg-clip": 100.0, "update-norm-factor": 0.0})
    for k in run.start:
        np.testing.assert_allclose(run.arrays[k] - run.start[k], plain[k], atol=2e-4)
    # Every reply of every stage went through the counting view.
    assert r.view.replies_received == len(STAGES) * 5 and r.view.uplink_bytes > 0


def test_secure_round_with_random_k_updates_only_the_shared_positions() -> None:
    run = _run({"codec": "randk(0.1)"})
    (r,) = run.rounds
    changed = sum(int(np.count_nonzero(run.arrays[k] != run.start[k])) for k in run.start)
    total = sum(v.size for v in run.start.values())
    assert r.row["clients"] == 5
    assert 0 < changed <= round(0.1 * total)
    assert r.row["secagg_vector_len"] == round(0.1 * total) + 1  # + the weight


def test_secure_round_with_error_feedback_keeps_residuals_in_client_state() -> None:
    run = _run({"codec": "randk(0.1)+ef", "secagg-clip": 50.0}, rounds=2)
    assert all(r.row["clients"] == 5 for r in run.rounds)
    d = sum(v.size for v in run.start.values())
    round2 = random_k(_unweighted(5, 50.0, 0), d, 0.1, round_seed(0, 2, Stream.SECURE_RANDK))
    assert isinstance(round2, RandomK)
    positions = round2.positions
    unsent = np.setdiff1d(np.arange(d), positions)
    # The residual is tagged with the secure path's feedback, not the codec spec: it is
    # SecAggStrategy's random-k that decides what was sent.
    feedback = run.wrapper(SecAggStrategy).feedback
    assert feedback == "secagg:randk(0.1)+ef"
    for ctx in run.grid.contexts.values():
        assert ctx.state[CODEC_META_KEY]["codec"] == feedback
        r = from_record(ctx.state[CODEC_STATE_KEY])[EF_STATE_KEY]
        assert r.shape == (d,) and r.dtype == np.float32
        # Just sent: only rounding is left there. Unsent: everything not sent so far.
        assert np.abs(r[positions]).max() < np.abs(r[unsent]).max()
        assert np.count_nonzero(r[unsent]) > 0.5 * unsent.size  # logreg: blank pixels stay 0


class PersistingGrid(InProcessGrid):
    """Like :class:`InProcessGrid`, but each node's ``Context.state`` is serialized to
    Flower's protobuf and parsed back after every message, as a SuperNode persisting it
    between ClientApp processes would."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

        replies = list(super().send_and_receive(messages, timeout=timeout))
        for ctx in self.contexts.values():
            ctx.state = recorddict_from_proto(recorddict_to_proto(ctx.state))
        return replies


def test_secagg_client_state_survives_serialization_between_stages() -> None:
    run = _run({"secagg-clip": 100.0, "secagg-bits": 24}, grid_type=PersistingGrid)
    (r,) = run.rounds
    assert r.row["clients"] == 5 and r.row["dropped_clients"] == 0
    assert r.row["rejected_updates"] == 0
    assert r.arrays is not None
    # The plain path with its influence bounds off: SecAgg+ has no individual norms to bound.
    plain = _plain_fedavg_delta({"secagg-clip": 100.0, "update-norm-factor": 0.0})
    for k in run.start:
        np.testing.assert_allclose(r.arrays[k] - run.start[k], plain[k], atol=2e-4)
    # What each node kept is the core's to_state() plus the glue's values, and it loads.
    for node, ctx in run.grid.contexts.items():
        record = ctx.state[STATE_KEY]
        client, glue = _load(record, node)
        assert client.stage == "unmasked" and client.client_id == node
        assert int(glue["round"]) == 1 and "input" not in glue
        assert not any(k.startswith("_") for k in record)
        with pytest.raises(ModPreconditionError, match="belongs to node"):
            _load(record, node + 1)


def test_compact_replies_round_trip_and_reject_bad_lengths() -> None:
    rng = np.random.default_rng(0)
    req_share = {"peer_ids": [30, 10, 20]}
    out = {
        "recipients": [10, 20, 30],
        "deals": [rng.bytes(186) for _ in range(3)],
        "b_commit": rng.bytes(32),
    }
    blob = pack_reply(SHARE, out, req_share)
    assert len(blob) == 32 + 3 * 186  # no ids, no list framing
    assert unpack_reply(SHARE, blob, req_share) == out
    with pytest.raises(SecureWireError, match="deals"):
        unpack_reply(SHARE, blob[:-1], req_share)
    with pytest.raises(SecureWireError, match="recipients"):
        pack_reply(SHARE, out, {"peer_ids": [10, 20]})
    req_unmask = {"survivor_ids": [5, 1], "dropped_ids": [9]}
    out = {
        "b_ids": [1, 5],
        "own_b": rng.bytes(33),
        "b_keys": [rng.bytes(32)],
        "s_ids": [9],
        "s_keys": [rng.bytes(32)],
    }
    blob = pack_reply(UNMASK, out, req_unmask)
    assert len(blob) == 33 + 2 * 32 and unpack_reply(UNMASK, blob, req_unmask) == out
    with pytest.raises(SecureWireError, match="unmask keys"):
        unpack_reply(UNMASK, blob[:-1], req_unmask)
    receive = {"recv_pks": [rng.bytes(64) for _ in range(4)], "recv_sigs": [rng.bytes(64)] * 4}
    keys = {"c_pk": rng.bytes(32), "s_pk": rng.bytes(32), "id_pk": rng.bytes(32), **receive}
    assert len(pack_reply(SETUP, keys, {})) == 96 + 4 * 128
    assert unpack_reply(SETUP, pack_reply(SETUP, keys, {}), {}) == keys
    signed_keys = {**keys, "sig": rng.bytes(64)}
    assert unpack_reply(SETUP, pack_reply(SETUP, signed_keys, {}), {}) == signed_keys
    sig = {"sig": rng.bytes(64)}
    assert unpack_reply(CHECK, pack_reply(CHECK, sig, {}), {}) == sig
    with pytest.raises(SecureWireError, match="consistency signature"):
        unpack_reply(CHECK, sig["sig"][:-1], {})
    quiet = {"masked": b"xyz", "complaint_ids": [], "complaint_b": [], "complaint_s": []}
    assert pack_reply(MASK, quiet, {}) == bytes(2) + b"xyz"
    assert unpack_reply(MASK, pack_reply(MASK, quiet, {}), {}) == quiet
    loud = {
        "masked": b"xyz",
        "complaint_ids": [7, 2**64 - 1],
        "complaint_b": [rng.bytes(32), b""],
        "complaint_s": [b"", rng.bytes(32)],
    }
    blob = pack_reply(MASK, loud, {})
    assert len(blob) == 2 + 2 * (8 + 1 + 32) + 3 and unpack_reply(MASK, blob, {}) == loud
    with pytest.raises(SecureWireError, match="complaint"):
        unpack_reply(MASK, blob[:20], {})
    with pytest.raises(SecureWireError, match="public keys"):
        unpack_reply(SETUP, b"short", {})


def test_uplink_overhead_is_close_to_the_cryptographic_minimum() -> None:
    run = _run({"secagg-bits": 16})
    (r,) = run.rounds
    d = sum(v.size for v in run.start.values())
    per_client = r.view.uplink_bytes / 5
    masked = 16 * (d + 1) / 8
    # Full graph on 5 clients: 3 keys (96 B) and 4 signed receive-key pairs (128 B),
    # commitment (32 B) and 4 signed deals (186 B), the complaint count (2 B), the
    # consistency signature (64 B), its own share (33 B) and 4 receive keys (32 B) to unmask;
    # the rest is framing and the metrics record (~150 B measured over five replies).
    crypto_min = 96 + 4 * 128 + 32 + 4 * 186 + 2 + 64 + 33 + 4 * 32
    assert masked + crypto_min < per_client < masked + crypto_min + 190


def test_dropouts_at_every_stage_keep_the_round_alive() -> None:
    # 0.4 of 5 clients = 2 drop each round, at seeded stages; over 4 rounds all stages occur.
    run = _run({"simulate-dropout": 0.4}, rounds=4)
    for r in run.rounds:
        assert r.row["clients"] + r.row["dropped_clients"] == 5
        # A client failing during unmasking is still in the sum (its input arrived).
        assert r.row["dropped_clients"] + r.row["secagg_late_dropouts"] == 2
    stages = set()
    for rnd in range(1, 5):
        stages |= set(simulated_dropouts(0, rnd, [1000 + i for i in range(5)], 0.4).values())
    assert len(stages) >= 3
    assert any(not np.array_equal(run.arrays[k], run.start[k]) for k in run.start)


def test_too_many_dropouts_abort_and_keep_the_model(caplog: pytest.LogCaptureFixture) -> None:
    run = _run({"simulate-dropout": 0.8, "secagg-threshold": 4})
    (r,) = run.rounds
    assert r.arrays is None and r.row["clients"] == 0
    # Exact accounting: those that failed before the abort are dropped, the others answered
    # everything they were asked and are counted as discarded (not "every client dropped").
    row = r.row
    assert row["dropped_clients"] + row["secagg_discarded"] + row["rejected_updates"] == 5
    assert 1 <= row["dropped_clients"] <= 4 and row["secagg_discarded"] >= 1
    assert r.row["secagg_aborted"] == 1
    assert "secure aggregation aborted" in caplog.text


def test_central_dp_under_secagg_adds_noise_and_accounts() -> None:
    run = _run({"dp": "central", "dp-clip": 1.0, "dp-noise-multiplier": 0.5})
    (r,) = run.rounds
    assert r.arrays is not None and r.row["clients"] == 5
    privacy = run.wrapper(DPStrategy)
    assert privacy.epsilon > 0 and r.row["epsilon"] == privacy.epsilon
    # Clipped to 1 and averaged over 5, plus noise of std 0.5/5 per coordinate.
    assert 0.05 < float(np.std(_step(run))) < 0.2


def test_central_dp_under_secagg_non_finite_aggregate_is_still_accounted() -> None:
    # Noise of std 1e40 overflows float32: the model is kept, but the server saw the sum.
    with np.errstate(over="ignore"):
        run = _run({"dp": "central", "dp-clip": 1e40, "dp-noise-multiplier": 1.0})
    (r,) = run.rounds
    assert r.arrays is None and r.row["clients"] == 5
    assert r.row["dp_released"] is True
    privacy = run.wrapper(DPStrategy)
    assert privacy.accountant.total_steps == 1 and privacy.epsilon > 0
    assert all(np.array_equal(run.arrays[k], run.start[k]) for k in run.start)


def test_distributed_dp_under_secagg_reports_bits_and_effective_noise() -> None:
    run = _run({"dp": "distributed", "dp-clip": 1.0, "dp-noise-multiplier": 0.5, "dp-bits": 16})
    (r,) = run.rounds
    assert r.arrays is not None and r.row["clients"] == 5
    assert r.row["secagg_bits"] == 16
    z = r.row["effective_noise_multiplier"]
    assert 0 < z < 0.5  # rounding inflates the sensitivity, so slightly below nominal
    assert run.wrapper(DPStrategy).epsilon > 0
    assert 0.05 < float(np.std(_step(run))) < 0.2
