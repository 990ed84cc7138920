"""Bonawitz et al.'s consistency-check round (CCS 2017, round 3) in the SecAgg+ core.

Adversary: an active server that tells different clients different survivor sets U3, to
collect the self-mask shares of a client from some of its holders and its mask-key shares
from others. Each client signs U3 and reveals nothing until ``t`` valid signatures over the
same U3 from its closed neighbourhood arrive; the equivocation tests fail on the protocol
without the check (the server's per-client unmask requests were accepted as they came).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsqueeze.secagg import (
    ClientPolicy,
    SecAggClient,
    SecAggConfig,
    SecAggProtocolError,
    SecAggServer,
    crypto,
)


def signed(
    server: SecAggServer,
    clients: Mapping[int, SecAggClient],
    requests: Mapping[int, Mapping[str, Any]],
    skip: Iterable[int] = (),
    identities: Mapping[int, Ed25519PrivateKey] | None = None,
) -> dict[int, dict[str, Any]]:
    """Run the consistency check on the survivor-set requests; ``skip`` clients drop."""
    gone, ident = set(skip), identities or {}
    sigs = {
        c: clients[c].check_survivors(requests[c], ident.get(c)) for c in requests if c not in gone
    }
    return server.collect_signatures(sigs)


def _cfg(n: int = 5, k: int = 4, t: int = 3) -> SecAggConfig:
    return SecAggConfig(
        num_clients=n, neighbours=k, threshold=t, bits=16, vector_len=8, round_seed=5
    )


def _at_check(
    ids: list[int],
    drop: Iterable[int] = (),
    policy: ClientPolicy | None = None,
    identities: Mapping[int, Ed25519PrivateKey] | None = None,
):
    server = SecAggServer(_cfg(len(ids), len(ids) - 1, len(ids) // 2 + 1), ids)
    setup = server.setup()
    clients = {c: SecAggClient(c, setup[c], policy=policy) for c in ids}
    ident = identities or {}
    out = server.collect_keys({c: clients[c].advertise_keys(ident.get(c)) for c in ids})
    out = server.collect_shares({c: clients[c].share_keys(out[c], ident.get(c)) for c in out})
    x = {c: np.full(8, c, dtype=np.uint64) for c in ids}
    masked = {c: clients[c].masked_input(out[c], x[c]) for c in out if c not in set(drop)}
    return server, clients, server.collect_masked(masked), x


def test_honest_round_with_the_check_sums_exactly() -> None:
    ids = [1, 2, 3, 4, 5]
    server, clients, out, _x = _at_check(ids, drop=[5])
    assert all(out[c] == {"included_ids": [1, 2, 3, 4]} for c in out)
    requests = signed(server, clients, out)
    assert requests[1]["signer_ids"] == [1, 2, 3, 4]
    result = server.finish({c: clients[c].unmask(requests[c]) for c in requests})
    assert result.total.tolist() == [10] * 8 and result.dropped == [5]


def test_server_equivocating_on_u3_is_caught_before_any_share_leaves() -> None:
    """The server tells clients 1, 2 that 5 survived and clients 3, 4 that 5 dropped (all
    five sent masked inputs), to get b_5's shares from the first and s_5's from the second.
    The signatures over the two sets disagree, so every client refuses."""
    ids = [1, 2, 3, 4, 5]
    _server, clients, _out, _ = _at_check(ids)
    told = {c: [1, 2, 3, 4, 5] if c in (1, 2, 5) else [1, 2, 3, 4] for c in [1, 2, 3, 4]}
    sigs = {c: clients[c].check_survivors({"included_ids": told[c]}) for c in told}
    for u in (1, 3):
        # The server forwards every neighbour's signature: some are over the other set.
        request = {
            "survivor_ids": told[u] if u == 1 else [1, 2, 3, 4],
            "dropped_ids": [] if u == 1 else [5],
            "signer_ids": [1, 2, 3, 4],
            "signatures": [sigs[v]["sig"] for v in [1, 2, 3, 4]],
        }
        with pytest.raises(SecAggProtocolError, match="different survivor sets"):
            clients[u].unmask(request)
        # Forwarding only the signatures over u's own set leaves fewer than t = 3.
        same = [v for v in [1, 2, 3, 4] if told[v] == told[u]]
        with pytest.raises(SecAggProtocolError, match="fewer than t"):
            clients[u].unmask(
                {**request, "signer_ids": same, "signatures": [sigs[v]["sig"] for v in same]}
            )
        assert clients[u]._revealed == {}  # nothing left the client


def test_forged_or_foreign_signatures_are_refused() -> None:
    ids = [1, 2, 3, 4, 5]
    server, clients, out, _ = _at_check(ids)
    sigs = {c: clients[c].check_survivors(out[c])["sig"] for c in ids}
    requests = server.collect_signatures({c: {"sig": sigs[c]} for c in ids})
    forged = Ed25519PrivateKey.generate()  # the server's own key: not the advertised one
    bad = dict(requests[1])
    bad["signatures"] = [crypto.sign_survivors(forged, server.session, ids), *bad["signatures"][1:]]
    with pytest.raises(SecAggProtocolError, match="different survivor sets"):
        clients[1].unmask(bad)
    with pytest.raises(SecAggProtocolError, match="not a surviving neighbour"):
        clients[1].unmask({**requests[1], "signer_ids": [1, 2, 3, 4, 99]})
    # The honest request is answered.
    assert clients[1].unmask(requests[1])["b_ids"] == ids


def test_server_rejects_a_bad_signature_and_names_its_sender() -> None:
    ids = [1, 2, 3, 4, 5]
    server, clients, out, _x = _at_check(ids)
    sigs = {c: clients[c].check_survivors(out[c]) for c in ids}
    sigs[2] = {"sig": bytes(64)}
    requests = server.collect_signatures(sigs)
    assert 2 not in requests and "consistency_check" in server.rejected[2]
    result = server.finish({c: clients[c].unmask(requests[c]) for c in requests})
    assert result.total.tolist() == [15] * 8  # client 2's input stays in the sum


def test_check_refuses_sets_without_this_client_or_below_t() -> None:
    ids = [1, 2, 3, 4, 5]
    _, clients, _, _ = _at_check(ids)
    with pytest.raises(SecAggProtocolError, match="contain this client"):
        clients[1].check_survivors({"included_ids": [2, 3, 4]})
    with pytest.raises(SecAggProtocolError, match="fewer than t"):
        clients[1].check_survivors({"included_ids": [1, 2]})


def test_identity_key_signs_the_check_when_the_device_has_one() -> None:
    ids = [1, 2, 3]
    keys = {c: Ed25519PrivateKey.generate() for c in ids}
    roster = frozenset(crypto.identity_public_bytes(k) for k in keys.values())
    policy = ClientPolicy(roster=roster)
    server, clients, out, _ = _at_check(ids, policy=policy, identities=keys)
    with pytest.raises(SecAggProtocolError, match="not the one this client advertised"):
        clients[1].check_survivors(out[1], Ed25519PrivateKey.generate())
    sigs = {c: clients[c].check_survivors(out[c], keys[c]) for c in ids}
    requests = server.collect_signatures(sigs)
    assert crypto.verify_survivors(
        crypto.identity_public_bytes(keys[2]), sigs[2]["sig"], server.session, ids
    )
    result = server.finish({c: clients[c].unmask(requests[c]) for c in requests})
    assert result.total.tolist() == [6] * 8
