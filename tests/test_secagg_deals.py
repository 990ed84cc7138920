"""Verifiable share deals: a cheating owner is convicted, an honest holder never blamed.

Adversaries: a malicious client (the *owner*) that deals one or more honest neighbours a
wrong share (a field element off its polynomial) or a ciphertext that does not open, to get
them blamed or the round failed; a malicious holder that complains falsely; a server that
forges a deal or a revealed key to frame an owner. On the code before verifiable deals an
off-polynomial share got its honest *holder* named (the server checked shares against the
owner's polynomial and blamed the one that disagreed) and an undecryptable ciphertext made
its honest recipient fail the mask stage (it dropped out; several such dropped the round).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_secagg import PERMISSIVE, _cfg
from test_secagg_consistency import signed

from fedsqueeze.secagg import (
    SecAggAbort,
    SecAggClient,
    SecAggProtocolError,
    SecAggServer,
    crypto,
    deals,
)
from fedsqueeze.secagg.deals import Evidence, attest


def _cheat(
    owner: SecAggClient, request: Mapping[str, Any], out: dict[str, Any], holder: int, mode: str
) -> dict[str, Any]:
    """``out`` with ``owner``'s deal to ``holder`` replaced and re-signed by the owner.

    ``wrong``: both shares are field elements off the owner's polynomials; ``garbage``: the
    ciphertexts are random bytes (they open under no key).
    """
    pair = request["peer_recv_pks"][request["peer_ids"].index(holder)]
    sign_key = owner._sign_key
    assert sign_key is not None
    if mode == "wrong":
        deal = deals.make_deal(
            owner._c_key,
            sign_key,
            owner.session,
            owner.client_id,
            holder,
            pair,
            (7, 11),
            out["b_commit"],
            bytes,
        )
    else:
        sealed = np.random.default_rng(holder).bytes(2 * deals.SEALED_BYTES)
        parts = deals.deal_parts(owner.client_id, holder, sealed, out["b_commit"])
        deal = sealed + crypto.sign(sign_key, b"deal", owner.session, *parts)
    dealt = list(out["deals"])
    dealt[out["recipients"].index(holder)] = deal
    return {**out, "deals": dealt}


def _round(
    n: int,
    k: int,
    t: int,
    cheats: Mapping[int, Mapping[int, str]],
    drop: Mapping[int, int] | None = None,
    seed: int = 11,
):
    """Run one round in-process; ``cheats[owner][holder]`` = "wrong" | "garbage";
    ``drop[c] = s`` makes c vanish at stage s (1 keys .. 4 unmask). Returns (result or
    the abort, server, inputs)."""
    drop = drop or {}
    ids = list(range(1, n + 1))
    server = SecAggServer(_cfg(n=n, k=k, t=t, seed=seed), ids)
    setup = server.setup()
    cl = {c: SecAggClient(c, setup[c], policy=PERMISSIVE) for c in ids}
    xs = {c: np.full(8, c, dtype=np.uint64) for c in ids}

    def alive(stage: int, targets) -> list[int]:
        return [c for c in targets if not 1 <= drop.get(c, 0) <= stage]

    try:
        out = server.collect_keys({c: cl[c].advertise_keys() for c in alive(1, ids)})
        shares = {}
        for c in alive(2, out):
            shares[c] = cl[c].share_keys(out[c])
            for holder, mode in cheats.get(c, {}).items():
                if holder in shares[c]["recipients"]:
                    shares[c] = _cheat(cl[c], out[c], shares[c], holder, mode)
        out = server.collect_shares(shares)
        out = server.collect_masked({c: cl[c].masked_input(out[c], xs[c]) for c in alive(3, out)})
        out = signed(server, cl, out)
        result = server.finish({c: cl[c].unmask(out[c]) for c in alive(4, out)})
    except SecAggAbort as abort:
        return abort, server, xs
    return result, server, xs


def test_wrong_share_convicts_the_owner_not_the_holder() -> None:
    # Owner 1 deals holder 2 a share off its polynomial; 2 reveals it at unmasking. Before,
    # the server named client 2 ("returned a wrong share"); now the share is what 1 signed.
    result, server, xs = _round(5, 4, 3, {1: {2: "wrong"}})
    assert not isinstance(result, Exception)
    assert list(result.rejected) == [1] and "off its polynomial" in result.rejected[1]
    assert result.included == [1, 2, 3, 4, 5]  # 1's input was in the sum: flagged
    assert result.total.tolist() == (sum(xs.values()) % 2**16).tolist()
    assert server.counts(result.included)["flagged"] == 1
    # The evidence is checkable by anyone: the wrong share is what client 1 signed for 2.
    wrong = [e for e in result.evidence[1] if e.holder == 2]
    assert wrong and attest(wrong[0]) == 7


def test_too_many_wrong_shares_abort_naming_the_owner() -> None:
    result, server, _ = _round(5, 4, 3, {1: {2: "wrong", 3: "wrong"}})
    assert isinstance(result, SecAggAbort) and "client 1" in str(result)
    assert list(server.rejected) == [1]


def test_garbage_deal_convicts_the_owner_and_the_round_completes() -> None:
    # Before, each holder of a garbage deal raised a decryption error at the mask stage and
    # dropped out of the round (t holders so served aborted it); now the owner is convicted
    # and left out, and its honest holders stay in.
    result, server, xs = _round(7, 6, 4, {1: {2: "garbage", 3: "garbage"}})
    assert not isinstance(result, Exception)
    assert list(result.rejected) == [1] and "does not open" in result.rejected[1]
    assert result.included == [2, 3, 4, 5, 6, 7]  # the convicted owner is left out of the sum
    assert result.total.tolist() == (sum(xs[c] for c in result.included) % 2**16).tolist()
    assert {e.holder for e in result.evidence[1]} == {2, 3}
    assert all(attest(e) is None for e in result.evidence[1])  # it did not open: proven
    assert server.counts(result.included)["rejected"] == 1


def test_garbage_to_too_many_holders_aborts_naming_the_owner() -> None:
    # Holders 2 and 3 did not mask with owner 1, so its mask key must come from 4 and 5:
    # fewer than t = 3. The round aborts, and only the owner is named.
    result, server, _ = _round(5, 4, 3, {1: {2: "garbage", 3: "garbage"}})
    assert isinstance(result, SecAggAbort) and "client 1" in str(result)
    assert list(server.rejected) == [1]


def test_server_cannot_forge_evidence_against_an_owner() -> None:
    result, _, _ = _round(5, 4, 3, {1: {2: "garbage"}})
    assert not isinstance(result, Exception)
    genuine = result.evidence[1][0]
    assert attest(genuine) is None
    server_key = crypto.generate_private_key(np.random.default_rng(0).bytes)
    # A revealed key of the server's own making is not the holder's advertised receive key.
    with pytest.raises(SecAggProtocolError, match="not the advertised receive key"):
        attest(Evidence(**{**genuine.__dict__, "revealed": crypto.private_key_bytes(server_key)}))
    # Nor can it substitute receive keys it chose (not signed by the holder) ...
    pair = crypto.public_key_bytes(server_key) * 2
    with pytest.raises(SecAggProtocolError, match="not signed by client 2"):
        attest(Evidence(**{**genuine.__dict__, "receive_pair": pair}))
    # ... or a deal it made up (not signed by the owner).
    forged = bytes(deals.DEAL_BYTES)
    with pytest.raises(SecAggProtocolError, match="not signed by its owner"):
        attest(Evidence(**{**genuine.__dict__, "deal": forged}))
    # ... or a self-mask commitment of its own (the owner signed its commitment in the deal),
    # with which a correct reconstruction of the seed would "not match" and convict the owner.
    other = deals.b_commitment(genuine.session, 1, bytes(32))
    with pytest.raises(SecAggProtocolError, match="not signed by its owner"):
        attest(Evidence(**{**genuine.__dict__, "b_commit": other}))


def _shared(ids: list[int]) -> tuple[SecAggServer, dict[int, SecAggClient], dict[int, Any]]:
    """A round after key sharing: the server, its clients and the mask-stage requests."""
    server = SecAggServer(_cfg(), ids)
    setup = server.setup()
    cl = {c: SecAggClient(c, setup[c], policy=PERMISSIVE) for c in ids}
    out = server.collect_keys({c: cl[c].advertise_keys() for c in ids})
    return server, cl, server.collect_shares({c: cl[c].share_keys(out[c]) for c in ids})


@pytest.mark.parametrize("field", ["deals", "b_commits"])
def test_server_altered_deal_or_commitment_is_refused_not_blamed_on_the_owner(
    field: str,
) -> None:
    # The server swaps owner 1's deal for garbage, or its self-mask commitment for one of its
    # own (with which a correct reconstruction would "not match" and convict the owner).
    server, cl, out = _shared([1, 2, 3, 4, 5])
    msg = dict(out[2])
    i = msg["sender_ids"].index(1)
    msg[field] = list(msg[field])
    msg[field][i] = (
        np.random.default_rng(1).bytes(deals.DEAL_BYTES)
        if field == "deals"
        else deals.b_commitment(server.session, 1, bytes(32))
    )
    with pytest.raises(SecAggProtocolError, match="from client 1 is not signed by it"):
        cl[2].masked_input(msg, np.zeros(8, dtype=np.uint64))


def test_false_complaint_convicts_the_complainer() -> None:
    ids = [1, 2, 3, 4, 5]
    server, cl, out = _shared(ids)
    masked = {c: cl[c].masked_input(out[c], np.full(8, c, dtype=np.uint64)) for c in ids}
    # Client 2 claims client 1's (valid) b share does not open and reveals its real key.
    masked[2] = {
        **masked[2],
        "complaint_ids": [1],
        "complaint_b": [cl[2]._receive_key(1, "b")],
        "complaint_s": [b""],
    }
    out = server.collect_masked(masked)
    assert list(server.rejected) == [2] and "false complaint" in server.rejected[2]
    assert 2 not in out and 1 in out


@st.composite
def _patterns(draw: st.DrawFn):
    n = draw(st.sampled_from([5, 6, 7]))
    k = n - 1 if n == 5 else draw(st.sampled_from([n - 1, 4]))
    t = draw(st.integers(k // 2 + 2, min(k + 1, k // 2 + 3)))
    ids = list(range(1, n + 1))
    cheaters = draw(st.lists(st.sampled_from(ids), max_size=2, unique=True))
    cheats = {
        c: draw(
            st.dictionaries(
                st.sampled_from([v for v in ids if v != c]),
                st.sampled_from(["wrong", "garbage"]),
                max_size=3,
            )
        )
        for c in cheaters
    }
    honest = [c for c in ids if c not in cheaters]
    drop = draw(st.dictionaries(st.sampled_from(honest), st.integers(1, 4), max_size=2))
    seed = draw(st.integers(0, 2**20))
    return n, k, t, cheats, drop, seed


@settings(max_examples=40, deadline=None)
@given(_patterns())
def test_honest_clients_are_never_blamed(pattern) -> None:
    n, k, t, cheats, drop, seed = pattern
    result, server, xs = _round(n, k, t, cheats, drop, seed)
    honest = set(range(1, n + 1)) - set(cheats)
    assert not honest & set(server.rejected), server.rejected
    # Every conviction is of a cheater that actually dealt a bad share, with evidence.
    for owner in server.rejected:
        assert cheats.get(owner) and server.evidence.get(owner)
    if not isinstance(result, Exception):
        plain = sum(xs[c] for c in result.included) % 2**16
        assert result.total.tolist() == plain.tolist()
