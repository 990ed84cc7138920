"""SecAgg+ against an ACTIVE server: each test plays a deviating server and shows the client
(or the honest server's own checks) refusing. Every test here fails on the protocol as it was
before these defences (issue 9, findings 3, 4 and 5 and the minor replay finding)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Message
from test_secagg_consistency import signed
from test_secure_glue import InProcessGrid, _run, train_one

from fedsqueeze.client.mods import ModPreconditionError
from fedsqueeze.client.secure import REPLAY_KEY, client_policy
from fedsqueeze.secagg import (
    ClientPolicy,
    SecAggAbort,
    SecAggClient,
    SecAggConfig,
    SecAggConfigError,
    SecAggProtocolError,
    SecAggServer,
    check_neighbours,
    crypto,
    is_connected,
    neighbour_graph,
    secure_neighbours,
    secure_threshold,
)
from fedsqueeze.server.secure import protocol_params

PERMISSIVE = ClientPolicy(min_neighbours=1, allow_low_threshold=True)


def _cfg(n: int = 5, k: int = 4, t: int = 3, seed: int = 11, **kw: Any) -> SecAggConfig:
    return SecAggConfig(
        num_clients=n, neighbours=k, threshold=t, bits=16, vector_len=8, round_seed=seed, **kw
    )


def _to_mask_stage(cfg: SecAggConfig, ids: list[int], policy: ClientPolicy | None = None):
    server = SecAggServer(cfg, ids)
    setup = server.setup()
    clients = {c: SecAggClient(c, setup[c], policy=policy) for c in ids}
    out = server.collect_keys({c: clients[c].advertise_keys() for c in ids})
    out = server.collect_shares({c: clients[c].share_keys(out[c]) for c in out})
    return server, clients, out


# --- 1. sender lists (finding 3: an empty sender list unmasks the target) -------------------


def test_empty_or_short_sender_list_at_mask_is_refused() -> None:
    ids = [1, 2, 3, 4, 5]
    _, clients, out = _to_mask_stage(_cfg(), ids)
    x = np.arange(8, dtype=np.uint64)
    # The attack: the target masks with PRG(b) only, and its neighbours would then hand over
    # b's shares on an ordinary unmask request.
    with pytest.raises(SecAggProtocolError, match="refusing to mask"):
        clients[1].masked_input({"sender_ids": [], "deals": [], "b_commits": []}, x)
    msg = out[1]
    short = {k: msg[k][:1] for k in ("sender_ids", "deals", "b_commits")}  # t-2
    with pytest.raises(SecAggProtocolError, match=r"t - 1 = 2"):
        clients[1].masked_input(short, x)
    # Exactly t - 1 senders is what an honest server may send after dropouts: accepted.
    ok = {k: msg[k][:2] for k in ("sender_ids", "deals", "b_commits")}
    assert "masked" in clients[1].masked_input(ok, x)


def test_share_stage_refuses_fewer_than_t_minus_1_peers() -> None:
    server = SecAggServer(_cfg(), [1, 2, 3, 4, 5])
    client = SecAggClient(1, server.setup()[1])
    client.advertise_keys()
    with pytest.raises(SecAggAbort, match="threshold is 3"):
        client.share_keys(
            {
                "peer_ids": [],
                "peer_c_pks": [],
                "peer_s_pks": [],
                "peer_id_pks": [],
                "peer_recv_pks": [],
                "peer_recv_sigs": [],
            }
        )


# --- 2. the security floor is the device's, not the server's (finding 5) ---------------------


def test_server_lowered_threshold_is_refused_by_the_client() -> None:
    ids = [1, 2, 3, 4, 5]
    low = SecAggServer(_cfg(t=2, allow_low_threshold=True), ids).setup()
    with pytest.raises(SecAggProtocolError, match="threshold 2 is below this client's floor 3"):
        SecAggClient(1, low[1])
    # Only the device can opt in.
    SecAggClient(1, low[1], policy=ClientPolicy(allow_low_threshold=True))
    # A device floor above the secure one is honoured too.
    ok = SecAggServer(_cfg(t=3), ids).setup()
    with pytest.raises(SecAggProtocolError, match="floor 4"):
        SecAggClient(1, ok[1], policy=ClientPolicy(min_threshold=4))


def test_server_lowered_neighbours_is_refused_by_the_client() -> None:
    ids = list(range(20))
    sparse = SecAggServer(_cfg(n=20, k=4, t=3), ids).setup()
    with pytest.raises(SecAggProtocolError, match="4 neighbours is below this client's floor 19"):
        SecAggClient(0, sparse[0])
    with pytest.raises(SecAggProtocolError, match="floor 6"):
        SecAggClient(0, sparse[0], policy=ClientPolicy(min_neighbours=6))
    SecAggClient(0, sparse[0], policy=ClientPolicy(min_neighbours=4))
    # The saved state is re-checked against the policy when it is loaded.
    state = SecAggClient(0, sparse[0], policy=PERMISSIVE).to_state()
    with pytest.raises(SecAggProtocolError, match="floor 19"):
        SecAggClient.from_state(state)


def test_policy_comes_from_the_node_config() -> None:
    assert client_policy({}) == ClientPolicy()
    policy = client_policy({"secagg-min-threshold": 5, "secagg-min-neighbours": "7"})
    assert policy.min_threshold == 5 and policy.min_neighbours == 7
    with pytest.raises(ModPreconditionError, match="secagg-min-threshold"):
        client_policy({"secagg-min-threshold": "many"})


class RecordingGrid(InProcessGrid):
    def __init__(self, config: dict[str, Any], num_nodes: int) -> None:
        super().__init__(config, num_nodes)
        self.errors: list[str] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.errors += [r.error.reason for r in replies if r.has_error()]
        return replies


def test_device_floor_in_node_config_refuses_the_servers_setup() -> None:
    class StrictGrid(RecordingGrid):
        def __init__(self, config: dict[str, Any], num_nodes: int) -> None:
            super().__init__(config, num_nodes)
            for ctx in self.contexts.values():
                ctx.node_config["secagg-min-threshold"] = 5  # the server uses t = 3

    run = _run({}, grid_type=StrictGrid)
    (r,) = run.rounds
    assert r.arrays is None and r.row["secagg_aborted"] == 1
    assert len(run.grid.errors) == 5
    assert all("below this client's floor 5" in e for e in run.grid.errors)


# --- 3. replayed setup (minor finding) --------------------------------------------------------


def test_replayed_setup_is_refused_before_training() -> None:
    run = _run({}, grid_type=RecordingGrid)
    assert run.rounds[0].arrays is not None
    for ctx in run.grid.contexts.values():
        assert int(ctx.state[REPLAY_KEY]["last-setup"]) == 1
    # The server repeats round 1 (and then an older round) to get fresh noise on the update.
    for replayed in (1, 0):
        again = train_one(run.strategy, run.grid, replayed, run.arrays)
        assert again.arrays is None and again.row["secagg_aborted"] == 1
    assert len(run.grid.errors) == 10
    assert all("already set up round 1" in e for e in run.grid.errors)
    # The protocol moves on with the next round.
    assert train_one(run.strategy, run.grid, 2, run.arrays).arrays is not None


# --- 4. the graph and its degree (finding 4) -------------------------------------------------


def _triangles(graph: dict[int, tuple[int, ...]]) -> int:
    return sum(len(set(graph[u]) & set(graph[v])) for u in graph for v in graph[u]) // 6


def test_graph_is_random_not_a_ring() -> None:
    ids = list(range(100))
    graph = neighbour_graph(ids, 4, 123)
    assert all(len(graph[u]) == 4 for u in ids)
    # A ring with offsets +-1, +-2 has 100 triangles; a random 4-regular graph about 4.5.
    assert _triangles(graph) < 20
    # The issue's leak: at n = 100, k = 4 and 20% dropout the ring's survivors split into
    # arcs in almost every round. The random graph's survivors stay connected far more often.
    rng = np.random.default_rng(0)
    split = 0
    for seed in range(40):
        graph = neighbour_graph(ids, 4, seed)
        alive = [u for u in ids if rng.random() >= 0.2]
        split += not is_connected(graph, alive)
    assert split < 20


def test_degree_bound_and_refusal() -> None:
    # Small n: the complete graph. Larger n: k = Theta(log n), growing with the dropout rate.
    assert secure_neighbours(20, 0.1, 0.0) == 19
    k100 = secure_neighbours(100, 0.1, 0.0)
    assert 20 < k100 < 99 and (100 * k100) % 2 == 0
    assert secure_neighbours(1000, 0.1, 0.0) < 60 < secure_neighbours(1000, 0.2, 0.0)
    assert secure_neighbours(1000, 0.1, 0.05) > secure_neighbours(1000, 0.1, 0.0)
    assert secure_neighbours(100, 0.6, 0.0) == 99
    assert secure_threshold(100, 10, 0.0) == SecAggConfig.min_secure_threshold(10)
    assert secure_threshold(1000, 50, 0.1) > SecAggConfig.min_secure_threshold(50)
    # The issue: secagg-neighbours = 1 was accepted and leaked every pair sum.
    with pytest.raises(SecAggConfigError, match="below the secure degree 9 for 10 clients"):
        protocol_params(1, 0, 10)
    with pytest.raises(SecAggConfigError, match="secure degree"):
        check_neighbours(100, 4, 0.2, 0.0)
    assert protocol_params(0, 0, 10) == (9, 6)
    assert protocol_params(0, 0, 100)[0] == k100


# --- 5. connectivity of the survivors' graph --------------------------------------------------


def _ring_round() -> tuple[SecAggConfig, list[int], list[int]]:
    """n = 8, k = 2 (t = 2 is the secure threshold): a seed whose graph is one 8-cycle, and
    two dropouts at distance 4 on it, so survivors form two paths of three."""
    ids = [10 * i + 1 for i in range(8)]
    for seed in range(200):
        graph = neighbour_graph(ids, 2, seed)
        if is_connected(graph, ids):
            break
    order = [ids[0]]
    while len(order) < 8:
        order.append(next(v for v in graph[order[-1]] if v not in order))
    return _cfg(n=8, k=2, t=2, seed=seed), ids, [order[0], order[4]]


def test_server_aborts_when_survivors_graph_is_disconnected() -> None:
    cfg, ids, dropped = _ring_round()
    server, clients, out = _to_mask_stage(cfg, ids, PERMISSIVE)
    x = {c: np.full(8, c, dtype=np.uint64) for c in ids}
    masked = {c: clients[c].masked_input(out[c], x[c]) for c in ids if c not in dropped}
    # Every threshold condition holds (each survivor has a live neighbour, each dropped
    # client two live holders), so the old server unmasked and learned each path's sum.
    with pytest.raises(SecAggAbort, match="disconnected"):
        server.collect_masked(masked)


def test_client_refuses_to_unmask_a_disconnected_sum() -> None:
    cfg, ids, dropped = _ring_round()
    server, clients, out = _to_mask_stage(cfg, ids, PERMISSIVE)
    x = np.zeros(8, dtype=np.uint64)
    requests = server.collect_masked({c: clients[c].masked_input(out[c], x) for c in ids})
    graph = neighbour_graph(ids, 2, cfg.round_seed)
    included = [c for c in ids if c not in dropped]
    u = next(c for c in included if not set(graph[c]) & set(dropped))
    # A lying server: "the two dropped clients left after masking" — a disconnected sum.
    with pytest.raises(SecAggProtocolError, match="disconnected"):
        clients[u].check_survivors({"included_ids": included})
    # Fewer than t included: refused too; omitting the set does not bypass the check.
    with pytest.raises(SecAggProtocolError, match="contain this client"):
        clients[u].check_survivors({"included_ids": [v for v in ids if v != u]})
    with pytest.raises(SecAggProtocolError, match="included_ids"):
        clients[u].check_survivors({})
    # The honest request (all eight included: one cycle) is signed and then answered.
    requests = signed(server, clients, requests)
    assert clients[u].unmask(requests[u])["b_ids"] == sorted([u, *graph[u]])


def test_every_completed_round_has_connected_survivors_at_n100_k4() -> None:
    """The issue's graph (n = 100, k = 4, t = 3) on the real core with dropouts after
    sharing: rounds either abort or sum over a connected set; no partial-sum leak."""
    ids = list(range(1, 101))
    rng = np.random.default_rng(5)
    completed = 0
    for seed in range(4):
        cfg = SecAggConfig(
            num_clients=100, neighbours=4, threshold=3, bits=8, vector_len=1, round_seed=seed
        )
        server, clients, out = _to_mask_stage(cfg, ids, PERMISSIVE)
        alive = [c for c in out if rng.random() >= 0.05]
        x = np.ones(1, dtype=np.uint64)
        try:
            requests = server.collect_masked({c: clients[c].masked_input(out[c], x) for c in alive})
            requests = signed(server, clients, requests)
        except SecAggAbort:
            continue
        result = server.finish({c: clients[c].unmask(requests[c]) for c in requests})
        assert is_connected(server.graph, result.included)
        assert int(result.total[0]) == len(result.included) % 256
        completed += 1
    assert completed >= 2


def test_issue_partial_sum_attack_at_n100_k4_is_impossible() -> None:
    """The issue's leak (n = 100, k = 4, t = 3): the server, which knows the graph, "drops"
    the outside neighbours of a connected group A of 20 clients after sharing, so A is cut
    off from the rest. On the old ring that is two cuts of two clients, every threshold
    holds and the server learned A's sum; now the round aborts."""
    ids = list(range(1, 101))
    for seed in range(3):
        cfg = SecAggConfig(
            num_clients=100, neighbours=4, threshold=3, bits=8, vector_len=1, round_seed=seed
        )
        server, clients, out = _to_mask_stage(cfg, ids, PERMISSIVE)
        graph = server.graph
        group, todo = [ids[0]], [ids[0]]
        while len(group) < 20:
            u = todo.pop(0)
            for v in graph[u]:
                if v not in group and len(group) < 20:
                    group.append(v)
                    todo.append(v)
        cut = {v for u in group for v in graph[u] if v not in group}
        alive = [c for c in ids if c not in cut]
        assert is_connected(graph, group) and not is_connected(graph, alive)
        x = np.ones(1, dtype=np.uint64)
        with pytest.raises(SecAggAbort):
            requests = server.collect_masked({c: clients[c].masked_input(out[c], x) for c in alive})
            requests = signed(server, clients, requests)
            server.finish({c: clients[c].unmask(requests[c]) for c in requests})


# --- 7. authenticated key advertisements (finding 5: key substitution) ------------------------


def _identities(ids: list[int]) -> dict[int, Ed25519PrivateKey]:
    return {c: Ed25519PrivateKey.from_private_bytes(bytes([c]) * 32) for c in ids}


def test_substituted_keys_are_refused_with_a_roster() -> None:
    ids = [1, 2, 3, 4, 5]
    ident = _identities(ids)
    roster = frozenset(crypto.identity_public_bytes(k) for k in ident.values())
    policy = ClientPolicy(roster=roster)
    server = SecAggServer(_cfg(), ids)
    setup = server.setup()
    clients = {c: SecAggClient(c, setup[c], policy=policy) for c in ids}
    out = server.collect_keys({c: clients[c].advertise_keys(ident[c]) for c in ids})
    # The honest server forwards the signed advertisements: the round runs, sum exact.
    out = server.collect_shares({c: clients[c].share_keys(out[c], ident[c]) for c in ids})
    x = {c: np.full(8, c, dtype=np.uint64) for c in ids}
    out = signed(
        server,
        clients,
        server.collect_masked({c: clients[c].masked_input(out[c], x[c]) for c in ids}),
        identities=ident,
    )
    result = server.finish({c: clients[c].unmask(out[c]) for c in out})
    assert result.total.tolist() == [15] * 8

    server = SecAggServer(_cfg(seed=12), ids)
    setup = server.setup()
    clients = {c: SecAggClient(c, setup[c], policy=policy) for c in ids}
    out = server.collect_keys({c: clients[c].advertise_keys(ident[c]) for c in ids})
    msg = out[1]
    i = msg["peer_ids"].index(2)
    mine = crypto.generate_private_key(os.urandom)  # the server's own key for "client 2"
    forged = {**msg, "peer_c_pks": list(msg["peer_c_pks"]), "peer_s_pks": list(msg["peer_s_pks"])}
    forged["peer_c_pks"][i] = forged["peer_s_pks"][i] = crypto.public_key_bytes(mine)
    with pytest.raises(SecAggProtocolError, match="client 2 is not signed"):
        clients[1].share_keys(forged, ident[1])
    # Stripping the signatures, or signing with a key outside the roster, does not help.
    unsigned = {k: v for k, v in forged.items() if k not in ("peer_id_pks", "peer_sigs")}
    with pytest.raises(SecAggProtocolError, match="unauthenticated"):
        clients[1].share_keys(unsigned, ident[1])
    sybil = Ed25519PrivateKey.generate()
    resigned = {
        **forged,
        "peer_id_pks": list(msg["peer_id_pks"]),
        "peer_sigs": list(msg["peer_sigs"]),
    }
    resigned["peer_id_pks"][i] = crypto.identity_public_bytes(sybil)
    resigned["peer_sigs"][i] = crypto.sign_advertisement(
        sybil, clients[1].session, 2, forged["peer_c_pks"][i], forged["peer_s_pks"][i]
    )
    with pytest.raises(SecAggProtocolError, match="not in the roster"):
        clients[1].share_keys(resigned, ident[1])
    # The untouched message is accepted.
    assert clients[1].share_keys(msg, ident[1])["recipients"] == [2, 3, 4, 5]


def test_roster_and_identity_from_the_node_config(tmp_path) -> None:
    ident = _identities(list(range(5)))
    roster = tmp_path / "roster.txt"
    roster.write_text(
        "# trusted devices\n"
        + "".join(crypto.identity_public_bytes(k).hex() + "\n" for k in ident.values())
    )

    class SignedGrid(RecordingGrid):
        def __init__(self, config: dict[str, Any], num_nodes: int) -> None:
            super().__init__(config, num_nodes)
            for i, ctx in enumerate(self.contexts.values()):
                key = tmp_path / f"id{i}.key"
                key.write_bytes(bytes([i]) * 32)
                ctx.node_config["secagg-identity-key"] = str(key)
                ctx.node_config["secagg-roster"] = str(roster)

    run = _run({}, grid_type=SignedGrid)
    assert run.rounds[0].arrays is not None and run.rounds[0].row["clients"] == 5
    assert run.grid.errors == []

    class UnknownDeviceGrid(SignedGrid):
        def __init__(self, config: dict[str, Any], num_nodes: int) -> None:
            super().__init__(config, num_nodes)
            stranger = tmp_path / "stranger.key"
            stranger.write_bytes(b"\x77" * 32)
            next(iter(self.contexts.values())).node_config["secagg-identity-key"] = str(stranger)

    run = _run({}, grid_type=UnknownDeviceGrid)
    (r,) = run.rounds
    assert r.arrays is None and r.row["secagg_aborted"] == 1
    assert any("not in the roster" in e for e in run.grid.errors)
