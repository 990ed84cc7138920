"""End-to-end SecAgg+ protocol tests: correctness under dropouts, aborts, masking
uniformity, authenticated shares, the never-reveal-both rule, and message fuzzing."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare
from test_secagg_consistency import signed

from fedsqueeze.compression.bitpack import unpack_bits
from fedsqueeze.secagg import (
    ClientPolicy,
    SecAggAbort,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggInputError,
    SecAggProtocolError,
    SecAggServer,
    is_connected,
    neighbour_graph,
)

# These tests exercise the protocol's mechanics on small sparse graphs and low thresholds,
# which a device's default policy refuses (tests/test_secagg_active.py); the device opts in.
PERMISSIVE = ClientPolicy(min_neighbours=1, allow_low_threshold=True)


def seeded_entropy(seed: int) -> Callable[[int], bytes]:
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


class Round:
    """Drives one round in-process; ``drop[c] = s`` makes client c vanish at stage s (1..4)."""

    def __init__(
        self,
        cfg: SecAggConfig,
        ids: list[int],
        entropy_seed: int | None = None,
    ) -> None:
        self.cfg, self.ids = cfg, ids
        self.server = SecAggServer(cfg, ids)
        setup = self.server.setup()
        self.clients = {
            c: SecAggClient(
                c,
                setup[c],
                policy=PERMISSIVE,
                entropy=None if entropy_seed is None else seeded_entropy(entropy_seed + i),
            )
            for i, c in enumerate(ids)
        }

    def run(self, inputs: Mapping[int, np.ndarray], drop: Mapping[int, int] | None = None):
        drop = drop or {}

        def alive(stage: int, targets) -> list[int]:
            return [c for c in targets if not 1 <= drop.get(c, 0) <= stage]

        cl = self.clients
        out = self.server.collect_keys({c: cl[c].advertise_keys() for c in alive(1, self.ids)})
        out = self.server.collect_shares({c: cl[c].share_keys(out[c]) for c in alive(2, out)})
        out = self.server.collect_masked(
            {c: cl[c].masked_input(out[c], inputs[c]) for c in alive(3, out)}
        )
        out = signed(self.server, cl, out)
        return self.server.finish({c: cl[c].unmask(out[c]) for c in alive(4, out)})


def oracle(ids: list[int], graph: dict[int, tuple[int, ...]], t: int, drop: dict[int, int]):
    """Independent statement of when recovery is possible; returns the included set or None.

    Secrets are shared among closed neighbourhoods, so each included client needs t live
    holders (itself + neighbours) and each dropped-after-sharing client that is masked into
    someone's input needs t live neighbours.
    """

    def reached(stage: int) -> set[int]:
        return {c for c in ids if not 1 <= drop.get(c, 0) <= stage}

    def closed(u: int, alive: set[int]) -> int:
        return (u in alive) + sum(v in alive for v in graph[u])

    def prune(alive: set[int]) -> set[int]:
        while bad := {u for u in alive if closed(u, alive) < t}:
            alive = alive - bad
        return alive

    u1 = prune(reached(1))
    u2 = prune(reached(2) & u1) if len(u1) >= t else set()
    u3 = reached(3) & u2
    u4 = reached(4) & u3
    for alive in (u1, u2, u3, u4):
        if len(alive) < t:
            return None
    if not is_connected(graph, u3):  # unmasking would reveal each component's sum
        return None
    for holders_alive in (u3, u4):
        if any(closed(u, holders_alive) < t for u in u3):
            return None
        for v in u2 - u3:
            if any(w in u3 for w in graph[v]) and sum(w in holders_alive for w in graph[v]) < t:
                return None
    return u3


@st.composite
def scenarios(draw: st.DrawFn):
    n = draw(st.integers(3, 8))
    k = draw(st.sampled_from([k for k in range(1, n) if n * k % 2 == 0]))
    low = draw(st.booleans())
    t = draw(st.integers(2 if low else SecAggConfig.min_secure_threshold(k), k + 1))
    bits = draw(st.integers(1, 62))
    d = draw(st.integers(1, 12))
    ids = draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n, unique=True))
    cfg = SecAggConfig(
        num_clients=n,
        neighbours=k,
        threshold=t,
        bits=bits,
        vector_len=d,
        round_seed=draw(st.integers(0, 2**64 - 1)),
        allow_low_threshold=low,
    )
    # Stage 0 or 5..9 = stays; 1..4 = drops at that stage (so most clients stay).
    drop = {c: draw(st.integers(0, 9)) for c in ids}
    xs = {
        c: np.array(
            draw(st.lists(st.integers(0, 2**bits - 1), min_size=d, max_size=d)), dtype=np.uint64
        )
        for c in ids
    }
    return cfg, ids, drop, xs


@settings(max_examples=60, deadline=None)
@given(scenarios())
def test_sum_recovered_under_dropouts_or_abort(scenario) -> None:
    cfg, ids, drop, xs = scenario
    rnd = Round(cfg, ids)
    expected = oracle(
        ids, neighbour_graph(ids, cfg.neighbours, cfg.round_seed), cfg.threshold, drop
    )
    stage_counts = [sum(not 1 <= drop[c] <= s for c in ids) for s in (1, 2, 3, 4)]
    if min(stage_counts) < cfg.threshold or expected is None:
        with pytest.raises(SecAggAbort):
            rnd.run(xs, drop)
        return
    result = rnd.run(xs, drop)
    assert set(result.included) == expected
    assert sorted(result.included + result.dropped) == sorted(ids)
    plain = [
        sum(int(xs[c][i]) for c in result.included) % 2**cfg.bits for i in range(cfg.vector_len)
    ]
    assert result.total.dtype == np.uint64 and result.total.tolist() == plain
    if cfg.neighbours == cfg.num_clients - 1:  # full graph: t survivors at every stage suffice
        assert set(result.included) == {c for c in ids if not 1 <= drop[c] <= 3}


def _cfg(n=5, k=4, t=3, bits=16, d=8, seed=11, **kw) -> SecAggConfig:
    return SecAggConfig(
        num_clients=n, neighbours=k, threshold=t, bits=bits, vector_len=d, round_seed=seed, **kw
    )


def test_full_graph_every_stage_dropout_exact_sum() -> None:
    ids = [3, 9, 27, 81, 243, 729, 2187]
    cfg = _cfg(n=7, k=6, t=4, bits=20, d=50)
    rng = np.random.default_rng(1)
    xs = {c: rng.integers(0, 2**20, 50, dtype=np.uint64) for c in ids}
    result = Round(cfg, ids).run(xs, {3: 1, 9: 3, 27: 4})  # keys / masked / unmask dropouts
    assert result.included == [27, 81, 243, 729, 2187]
    assert result.dropped == [3, 9]
    expected = sum(xs[c] for c in result.included) % np.uint64(2**20)
    assert np.array_equal(result.total, expected)


def test_too_few_survivors_abort_with_clear_message() -> None:
    ids = list(range(5))
    xs = {c: np.zeros(8, dtype=np.uint64) for c in ids}
    with pytest.raises(SecAggAbort, match="only 2 clients left after masked input"):
        Round(_cfg(), ids).run(xs, {0: 3, 1: 3, 2: 3})
    with pytest.raises(SecAggAbort, match="threshold is 3"):
        Round(_cfg(), ids).run(xs, {0: 4, 1: 4, 2: 4})
    with pytest.raises(SecAggAbort):
        Round(_cfg(), ids).run(xs, {0: 1, 1: 2, 2: 2})


@pytest.mark.parametrize("bits", [8, 3, 40])
def test_masked_vector_is_uniform(bits: int) -> None:
    d = 4096
    ids = [10, 20, 30, 40, 50]
    rnd = Round(_cfg(bits=bits, d=d), ids, entropy_seed=1234)
    cl, srv = rnd.clients, rnd.server
    out = srv.collect_keys({c: cl[c].advertise_keys() for c in ids})
    out = srv.collect_shares({c: cl[c].share_keys(out[c]) for c in ids})
    x = np.zeros(d, dtype=np.uint64)  # maximally structured input
    payload = cl[10].masked_input(out[10], x)["masked"]
    assert len(payload) == (d * bits + 7) // 8  # travels at b bits, not 64
    y = unpack_bits(payload, bits, d)
    top = y >> np.uint64(max(bits - 8, 0))  # the 8 (or fewer) most significant bits
    bins = 2 ** min(bits, 8)
    observed = np.bincount(top.astype(np.int64), minlength=bins)
    assert chisquare(observed).pvalue > 1e-3
    low = np.bincount((y & np.uint64(bins - 1)).astype(np.int64), minlength=bins)
    assert chisquare(low).pvalue > 1e-3
    # Control: the same test does reject the unmasked input.
    assert chisquare(np.bincount(x.astype(np.int64), minlength=bins)).pvalue < 1e-3


def _shared_round(cfg: SecAggConfig, ids: list[int], entropy_seed: int):
    rnd = Round(cfg, ids, entropy_seed=entropy_seed)
    cl, srv = rnd.clients, rnd.server
    keys = {c: cl[c].advertise_keys() for c in ids}
    out = srv.collect_keys(keys)
    out = srv.collect_shares({c: cl[c].share_keys(out[c]) for c in ids})
    return rnd, keys, out


def test_tampered_share_ciphertext_rejected() -> None:
    # A deal altered on the way (by the server) no longer carries its owner's signature: the
    # holder refuses it instead of complaining about the owner.
    ids = [1, 2, 3, 4, 5]
    rnd, _, out = _shared_round(_cfg(), ids, 7)
    msg = dict(out[1])
    blob = bytearray(msg["deals"][0])
    blob[20] ^= 0x01
    msg["deals"] = [bytes(blob), *msg["deals"][1:]]
    with pytest.raises(SecAggProtocolError, match="not signed by it"):
        rnd.clients[1].masked_input(msg, np.zeros(8, dtype=np.uint64))
    # The untouched message still works, so the failure came from the flipped bit.
    rnd.clients[2].masked_input(out[2], np.zeros(8, dtype=np.uint64))


def test_misaddressed_share_ciphertext_rejected() -> None:
    ids = [1, 2, 3, 4, 5]
    rnd, _, out = _shared_round(_cfg(), ids, 7)
    # Client 1 receives the ciphertext that sender 3 addressed to client 2.
    from_3_to_2 = out[2]["deals"][out[2]["sender_ids"].index(3)]
    msg = dict(out[1])
    i = msg["sender_ids"].index(3)
    msg["deals"] = [*msg["deals"][:i], from_3_to_2, *msg["deals"][i + 1 :]]
    with pytest.raises(SecAggProtocolError, match="not signed"):
        rnd.clients[1].masked_input(msg, np.zeros(8, dtype=np.uint64))
    # Relabelling the sender does not help either.
    msg = dict(out[1])
    msg["deals"] = list(reversed(msg["deals"]))
    with pytest.raises(SecAggProtocolError, match="not signed"):
        rnd.clients[1].masked_input(msg, np.zeros(8, dtype=np.uint64))


def test_replayed_share_from_another_round_rejected() -> None:
    ids = [1, 2, 3, 4, 5]
    _old, old_keys, old_out = _shared_round(_cfg(seed=100), ids, 7)
    new, new_keys, _new_out = _shared_round(_cfg(seed=101), ids, 7)
    # Same entropy => identical key pairs in both rounds: only the session binding differs.
    assert old_keys.keys() == new_keys.keys()
    assert all(old_keys[c]["c_pk"] == new_keys[c]["c_pk"] for c in ids)
    with pytest.raises(SecAggProtocolError, match="not signed"):
        new.clients[1].masked_input(old_out[1], np.zeros(8, dtype=np.uint64))
    # Control: a third run of the old round accepts the old ciphertexts.
    again, _, _ = _shared_round(_cfg(seed=100), ids, 7)
    again.clients[1].masked_input(old_out[1], np.zeros(8, dtype=np.uint64))


def _at_unmask(ids=(1, 2, 3, 4, 5)):
    ids = list(ids)
    rnd, _, out = _shared_round(_cfg(), ids, 3)
    out = rnd.server.collect_masked(
        {c: rnd.clients[c].masked_input(out[c], np.zeros(8, dtype=np.uint64)) for c in ids}
    )
    return rnd, signed(rnd.server, rnd.clients, out)


def test_client_never_reveals_both_shares_of_a_peer() -> None:
    rnd, out = _at_unmask()
    client = rnd.clients[1]
    with pytest.raises(SecAggProtocolError, match="both"):
        client.unmask({**out[1], "survivor_ids": [1, 2, 3, 4, 5], "dropped_ids": [5]})
    first = client.unmask(out[1])
    assert first["s_ids"] == [] and first["b_ids"] == [1, 2, 3, 4, 5]
    assert client.unmask(out[1]) == first  # an identical retry is harmless
    # Now claim that 4 and 5 dropped: their b shares were already revealed, and the claim
    # contradicts the survivor set every neighbour signed.
    lie = {**out[1], "survivor_ids": [1, 2, 3], "dropped_ids": [4, 5]}
    with pytest.raises(SecAggProtocolError, match="survivor set U3"):
        client.unmask(lie)
    # A client that revealed nothing yet refuses it too (the consistency check).
    with pytest.raises(SecAggProtocolError, match="survivor set U3"):
        rnd.clients[2].unmask({**out[2], "survivor_ids": [1, 2, 3], "dropped_ids": [4, 5]})
    assert rnd.clients[2]._revealed == {}


def test_unmask_request_validation() -> None:
    rnd, out = _at_unmask()
    c = rnd.clients[1]
    bad = [
        {"survivor_ids": [2, 3, 4, 5], "dropped_ids": []},  # self missing
        {"survivor_ids": [1, 2, 3], "dropped_ids": [4]},  # 5 unclassified
        {"survivor_ids": [1, 2, 3, 4, 5, 6], "dropped_ids": []},  # unknown peer
        {"survivor_ids": [1, 2, 3, 3], "dropped_ids": [4, 5]},  # duplicate
        {"survivor_ids": "1,2,3", "dropped_ids": []},
        {"survivor_ids": [1, 2, 3, 4, 5]},
        {"survivor_ids": [1, 2], "dropped_ids": [3, 4, 5]},  # not the signed U3
    ]
    for msg in bad:
        with pytest.raises(SecAggProtocolError):
            c.unmask({**out[1], **msg} if "dropped_ids" in msg else msg)


def _flip(data: bytes, bit: int = 1) -> bytes:
    return data[:-1] + bytes([data[-1] ^ bit])


def test_holder_cannot_alter_the_share_it_reveals() -> None:
    # Holders reveal receive keys, and the server opens the owner's signed deal: a key that
    # is not the advertised receive key rejects that holder's answer, never the owner; two
    # such holders of five (t = 3) still leave every secret reconstructible.
    rnd, out = _at_unmask()
    answers = {c: rnd.clients[c].unmask(out[c]) for c in out}
    for holder in (1, 2):
        keys = list(answers[holder]["b_keys"])
        keys[1] = _flip(keys[1])
        answers[holder] = {**answers[holder], "b_keys": keys}
    result = rnd.server.finish(answers)
    assert result.total.tolist() == [0] * 8 and result.included == [1, 2, 3, 4, 5]
    assert sorted(result.rejected) == [1, 2] and not result.evidence
    assert all("not the advertised receive key" in why for why in result.rejected.values())


def test_malformed_client_messages_are_dropped_not_fatal() -> None:
    ids = [1, 2, 3, 4, 5, 6]
    cfg = _cfg(n=6, k=5, t=4, bits=13, d=30)
    rnd = Round(cfg, ids)
    cl, srv = rnd.clients, rnd.server
    xs = {c: np.full(30, c, dtype=np.uint64) for c in ids}
    keys = {c: cl[c].advertise_keys() for c in ids}
    keys[99] = keys[1]  # not a participant
    out = srv.collect_keys(keys)
    out = srv.collect_shares({c: cl[c].share_keys(out[c]) for c in ids})
    masked = {c: cl[c].masked_input(out[c], xs[c]) for c in ids}
    masked[6] = {"masked": masked[6]["masked"][:-1]}  # truncated payload
    out = signed(srv, cl, srv.collect_masked(masked))
    result = srv.finish({c: cl[c].unmask(out[c]) for c in out})
    assert result.included == [1, 2, 3, 4, 5] and 6 in result.rejected and 99 in result.rejected
    assert result.total.tolist() == [15] * 30


def test_stage_order_enforced() -> None:
    ids = [1, 2, 3, 4, 5]
    rnd = Round(_cfg(), ids)
    with pytest.raises(SecAggProtocolError):
        rnd.clients[1].share_keys({})
    with pytest.raises(SecAggProtocolError):
        rnd.server.finish({})
    rnd.clients[1].advertise_keys()
    with pytest.raises(SecAggProtocolError):
        rnd.clients[1].advertise_keys()


def test_setup_message_is_verified() -> None:
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    setup = SecAggServer(_cfg(n=8, k=4, t=3), ids).setup()
    msg = setup[1]
    SecAggClient(1, msg, policy=PERMISSIVE)
    with pytest.raises(SecAggProtocolError, match="neighbour"):
        others = [c for c in ids if c not in msg["neighbour_ids"] and c != 1]
        SecAggClient(
            1,
            {**msg, "neighbour_ids": [*msg["neighbour_ids"][:-1], others[0]]},
            policy=PERMISSIVE,
        )
    with pytest.raises(SecAggProtocolError):
        SecAggClient(2, msg, policy=PERMISSIVE)
    with pytest.raises(SecAggProtocolError, match="invalid parameters"):
        SecAggClient(1, {**msg, "threshold": 2}, policy=PERMISSIVE)  # below the secure threshold
    with pytest.raises(SecAggProtocolError):
        SecAggClient(1, {**msg, "protocol": "flower-secagg+"}, policy=PERMISSIVE)


def test_input_vector_validated() -> None:
    rnd, _, out = _shared_round(_cfg(bits=8, d=8), [1, 2, 3, 4, 5], 5)
    c = rnd.clients[1]
    for bad in (np.zeros(7, dtype=np.uint64), np.full(8, 256), np.full(8, -1), np.zeros(8)):
        with pytest.raises(SecAggInputError):
            c.masked_input(out[1], bad)


def test_server_rejects_bad_client_ids() -> None:
    with pytest.raises(SecAggError):
        SecAggServer(_cfg(), [1, 2, 3, 4])
    with pytest.raises(SecAggError):
        SecAggServer(_cfg(), [1, 2, 3, 4, 4])
    with pytest.raises(SecAggError):
        SecAggServer(_cfg(), [1, 2, 3, 4, -5])


_VALUES = st.one_of(
    st.integers(-5, 2**64),
    st.binary(max_size=100),
    st.text(max_size=5),
    st.booleans(),
    st.lists(st.integers(0, 10), max_size=6),
    st.lists(st.binary(max_size=100), max_size=6),
)


def _fuzz_msg(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys), _VALUES, max_size=len(keys))


@settings(max_examples=40, deadline=None)
@given(
    keys_msg=_fuzz_msg(["peer_ids", "peer_c_pks", "peer_s_pks", "peer_recv_pks"]),
    shares_msg=_fuzz_msg(["sender_ids", "deals", "b_commits"]),
    server_msg=_fuzz_msg(["c_pk", "s_pk", "recv_pks", "deals", "b_commit", "complaint_ids"]),
)
def test_decoders_fuzz_raise_only_typed_errors(keys_msg, shares_msg, server_msg) -> None:
    ids = [0, 1, 2, 3, 4]
    rnd = Round(_cfg(), ids)
    c0 = rnd.clients[0]
    c0.advertise_keys()
    with contextlib.suppress(SecAggError):
        c0.share_keys(keys_msg)
    rnd2, _, _ = _shared_round(_cfg(), ids, 9)
    with contextlib.suppress(SecAggError):
        rnd2.clients[0].masked_input(shares_msg, np.zeros(8, dtype=np.uint64))
    # A garbage message from one client never crashes the server; it is rejected.
    srv = SecAggServer(_cfg(), ids)
    setup = srv.setup()
    clients = {c: SecAggClient(c, setup[c]) for c in ids}
    msgs = {c: clients[c].advertise_keys() for c in ids}
    msgs[0] = server_msg
    try:
        srv.collect_keys(msgs)
    except SecAggAbort:
        pytest.fail("one bad message out of five must not abort a t=3 round")
    assert 0 in srv.rejected or server_msg.keys() >= {"c_pk", "s_pk"}


def test_wrong_mask_key_receive_key_rejects_the_holder() -> None:
    ids = [1, 2, 3, 4, 5]
    rnd, _, out = _shared_round(_cfg(), ids, 4)
    cl, srv = rnd.clients, rnd.server
    masked = {c: cl[c].masked_input(out[c], np.zeros(8, dtype=np.uint64)) for c in ids[:-1]}
    requests = signed(srv, cl, srv.collect_masked(masked))  # 5 dropped after sharing
    answers = {c: cl[c].unmask(requests[c]) for c in requests}
    assert answers[1]["s_ids"] == [5] and len(answers[1]["s_keys"]) == 1
    answers[1] = {**answers[1], "s_keys": [_flip(answers[1]["s_keys"][0])]}
    # One holder of four (t = 3) reveals a wrong key: its answer is dropped, the sum exact.
    result = srv.finish(answers)
    assert result.included == [1, 2, 3, 4] and result.total.tolist() == [0] * 8
    assert "not the advertised receive key" in result.rejected[1] and 5 not in result.rejected


# --- saving and restoring the client state machine (to_state / from_state) -----------------


def _restored(client: SecAggClient) -> SecAggClient:
    """Save, copy the saved values (as a record store would) and restore."""
    state = client.to_state()
    copied = {k: list(v) if isinstance(v, list) else v for k, v in state.items()}
    return SecAggClient.from_state(copied, policy=PERMISSIVE)


def test_state_round_trip_at_every_stage_recovers_exact_sum() -> None:
    """Every client is rebuilt from its saved state before every stage; one drops at stage
    3 so the unmask stage needs both kinds of share. The sum is exact."""
    ids = [5, 17, 2**64 - 1, 40, 123456789, 8]
    cfg = _cfg(n=6, k=4, t=3, bits=24, d=33, seed=2**63 + 7)
    rng = np.random.default_rng(3)
    xs = {c: rng.integers(0, 2**24, 33, dtype=np.uint64) for c in ids}
    rnd = Round(cfg, ids)
    srv = rnd.server
    cl = {c: _restored(rnd.clients[c]) for c in ids}
    assert all(c.stage == "setup" for c in cl.values())
    out = srv.collect_keys({c: cl[c].advertise_keys() for c in ids})
    cl = {c: _restored(cl[c]) for c in ids}
    out = srv.collect_shares({c: cl[c].share_keys(out[c]) for c in out})
    cl = {c: _restored(cl[c]) for c in ids}
    out = srv.collect_masked({c: cl[c].masked_input(out[c], xs[c]) for c in out if c != 40})
    cl = {c: _restored(cl[c]) for c in ids}
    assert cl[5].stage == "masked"
    out = signed(srv, {c: cl[c] for c in out}, out)
    cl = {c: _restored(cl[c]) for c in ids}
    assert cl[5].stage == "checked"
    result = srv.finish({c: cl[c].unmask(out[c]) for c in out})
    assert 40 in result.dropped and len(result.included) == 5
    expected = sum(xs[c] for c in result.included) % np.uint64(2**24)
    assert np.array_equal(result.total, expected)


def test_state_round_trip_keeps_reveals_and_is_stable() -> None:
    rnd, out = _at_unmask()
    client = rnd.clients[1]
    first = client.unmask(out[1])
    restored = _restored(client)
    assert restored.to_state() == client.to_state()
    assert restored.stage == "unmasked"
    assert restored.unmask(out[1]) == first  # identical retry still answered
    # The restored client remembers the survivor set it signed.
    with pytest.raises(SecAggProtocolError, match="survivor set U3"):
        restored.unmask({**out[1], "survivor_ids": [1, 2, 3], "dropped_ids": [4, 5]})


def test_state_values_are_flat_record_types() -> None:
    rnd, _ = _at_unmask()
    state = rnd.clients[2].to_state()
    for key, value in state.items():
        assert isinstance(value, int | str | bytes | list), key
        if isinstance(value, list):
            assert all(isinstance(v, int | bytes) for v in value), key
    assert len(state["s_key"]) == 32 and len(state["recv_keys"]) == 4


def test_restored_client_rejects_stage_out_of_order() -> None:
    rnd, _ = _at_unmask()
    restored = _restored(rnd.clients[3])
    with pytest.raises(SecAggProtocolError, match="stage"):
        restored.advertise_keys()


def _tampered(state: dict[str, Any], **changes: Any) -> dict[str, Any]:
    new = dict(state)
    for key, value in changes.items():
        if value is None:
            new.pop(key)
        else:
            new[key] = value
    return new


def test_from_state_rejects_malformed_state_with_typed_error() -> None:
    rnd, _ = _at_unmask()
    state = rnd.clients[1].to_state()
    SecAggClient.from_state(state)  # the untouched state loads
    bad = [
        _tampered(state, version=1),  # the format before the check round
        _tampered(state, stage="done"),
        _tampered(state, extra=1),
        _tampered(state, s_key=None),
        _tampered(state, b_seed=b"short"),
        _tampered(state, c_key=b"\x00" * 31),
        _tampered(state, client_id=999),  # not a participant
        _tampered(state, neighbours=2),  # another graph: peers are not neighbours
        _tampered(state, recv_keys=state["recv_keys"][:-1]),
        _tampered(state, own_s=b"\xff" * 33),  # outside the field
        _tampered(state, complained=[99]),
        _tampered(state, revealed_s=[2]),
        _tampered(state, threshold=1),  # insecure parameters
        _tampered(state, peer_ids="1,2"),
        _tampered(_tampered(state, stage="keys"), b_seed=None),  # shares before sharing
    ]
    for broken in bad:
        with pytest.raises(SecAggProtocolError, match="invalid saved client state"):
            SecAggClient.from_state(broken)
    with pytest.raises(SecAggProtocolError, match="invalid saved client state"):
        SecAggClient.from_state([("stage", "setup")])  # type: ignore[arg-type]


def _graph_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "secagg_graph.py"
    spec = importlib.util.spec_from_file_location("secagg_graph_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@settings(max_examples=40, deadline=None)
@given(scenarios())
def test_graph_benchmark_decides_as_the_server(scenario) -> None:
    # benchmarks/secagg_graph.py replays only the server's decisions; it calls the core's
    # abort rules, so it completes exactly the rounds the oracle (and the real server,
    # test_sum_recovered_under_dropouts_or_abort) completes.
    cfg, ids, drop, _ = scenario
    graph = neighbour_graph(ids, cfg.neighbours, cfg.round_seed)
    done = _graph_benchmark().outcome(ids, graph, cfg.threshold, drop) == "ok"
    assert done == (oracle(ids, graph, cfg.threshold, drop) is not None)
