"""Client side of SecAgg+ as an explicit state machine.

Stages, in order (each method may be called only in its stage)::

    SecAggClient(cid, setup_msg)   verifies the parameters and recomputes its neighbours
    advertise_keys()               -> {"c_pk", "s_pk", "id_pk", "recv_pks", "recv_sigs"}
    share_keys(msg)                -> {"recipients", "deals", "b_commit"}
    masked_input(msg, vector)      -> {"masked", "complaint_ids", "complaint_b", "complaint_s"}
    check_survivors(msg)           -> {"sig"}        (consistency check: signs U3)
    unmask(msg)                    -> {"b_ids", "own_b", "b_keys", "s_ids", "s_keys"}

Between stages the whole state machine can be saved with :meth:`SecAggClient.to_state`
(a flat dict of ints, bools, strs, bytes and lists of them, so it fits a Flower
``ConfigRecord``) and restored with :meth:`SecAggClient.from_state`; a restored client
continues the protocol exactly where the saved one stood. The state holds this round's
private keys and shares: keep it on the client.

Any violation raises a :class:`~fedsqueeze.secagg.errors.SecAggError` subclass; the glue
should then drop this client from the round.

Threat model: the server may deviate from the protocol; the client defends itself. It
refuses (``SecAggProtocolError``, or ``SecAggAbort`` where the round cannot succeed anyway)

- parameters below its own :class:`~fedsqueeze.secagg.config.ClientPolicy` (threshold and
  graph degree floors set on the device; the server's ``allow_low_threshold`` is ignored);
- a neighbour list that differs from the graph the round seed defines;
- at ``share``, fewer than ``t - 1`` live neighbours; at ``mask``, a sender list shorter
  than ``t - 1`` (an empty one would leave only the self mask on the input, whose shares
  the honest neighbours then hand over: exact recovery of the input);
- at ``check``, a survivor set (``included_ids``, the clients whose masked input is in the
  sum) with fewer than ``t`` members, without this client, or whose communication graph is
  disconnected (the server would learn the sum of each component);
- at ``unmask``, fewer than ``t`` valid signatures over the survivor set it signed from its
  closed neighbourhood (its own included), any invalid one (the server told a neighbour a
  different set), a request inconsistent with that set, and revealing both the self-mask
  and the mask-key share of any peer.

Consistency check (Bonawitz et al., CCS 2017, round 3 "ConsistencyCheck"): after the
masked inputs are in, the server sends U3 to every client of U3; each signs
``(session, U3)`` with Ed25519 and the server forwards to each client the signatures of its
neighbours (SecAgg+: the check runs among neighbours, as Bell et al. 2020 run every step
of the protocol on the neighbourhood; on the complete graph this is exactly Bonawitz et
al.). A client reveals shares only after seeing ``t`` valid signatures over the same U3,
so a server that tells two neighbours different survivor sets is caught before any share
leaves.

Verifiable deals (:mod:`fedsqueeze.secagg.deals`): each share travels in its own ciphertext
under a receive key the holder made for that owner and kind, and the owner signs the deal.
At ``mask`` the client refuses a deal its owner did not sign (the server forged or altered
it) and complains, revealing the receive key, about a signed one that does not open; it then
does not mask with that owner. At ``unmask`` it reveals receive keys instead of shares, so
the server opens exactly what the owner dealt: a bad share convicts its owner, not this
client.

Key authentication: with a roster in its policy the client accepts only peer keys signed by
a distinct roster identity key (Ed25519), and the consistency signatures are made with the
same identity keys, so they authenticate the device. Without an identity key the client
signs with a fresh per-round Ed25519 key advertised next to its X25519 keys; that key is
then as authentic as the others, i.e. the server is trusted not to substitute keys, and the
check only catches a server that equivocates on U3 without substituting keys.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsqueeze.compression.bitpack import pack_bits
from fedsqueeze.secagg import crypto, deals, shamir
from fedsqueeze.secagg.config import (
    CONFIG_FIELDS,
    PROTOCOL,
    ClientPolicy,
    SecAggConfig,
    check_client_ids,
    get_bytes,
    get_bytes_list,
    get_id_list,
    get_int,
    get_str,
    is_connected,
    neighbour_graph,
    session_id,
)
from fedsqueeze.secagg.errors import (
    SecAggAbort,
    SecAggConfigError,
    SecAggDecryptionError,
    SecAggInputError,
    SecAggProtocolError,
)

STAGES = ("setup", "keys", "shared", "masked", "checked", "unmasked")
"""The client's stages, in order (:attr:`SecAggClient.stage`)."""
STATE_VERSION = 3
"""Format version of :meth:`SecAggClient.to_state`."""

StateValue: TypeAlias = int | bool | str | bytes | list[int] | list[bytes]
"""A value of :meth:`SecAggClient.to_state` (all of them fit a Flower ``ConfigRecord``)."""

_STATE_KEYS = frozenset(
    {
        "version",
        "client_id",
        "stage",
        *CONFIG_FIELDS,
        "client_ids",
        "c_key",
        "s_key",
        "b_seed",
        "peer_ids",
        "peer_c_pks",
        "peer_s_pks",
        "recv_keys",
        "own_b",
        "own_s",
        "complained",
        "revealed_b",
        "revealed_s",
        "mask_peers",
        "id_pk",
        "sign_key",
        "peer_id_pks",
        "checked_ids",
    }
)


def share_position(client_id: int) -> int:
    """Public Shamir evaluation point of a client (non-zero, distinct per client)."""
    return client_id + 1


def config_from_setup(msg: Mapping[str, Any]) -> tuple[SecAggConfig, list[int]]:
    """Parse the public parameters and the participant list out of a setup message."""
    if get_str(msg, "protocol") != PROTOCOL:
        raise SecAggProtocolError(f"unsupported protocol {msg['protocol']!r}, expected {PROTOCOL}")
    try:
        config = SecAggConfig.from_fields(msg)
        ids = check_client_ids(get_id_list(msg, "client_ids"), config.num_clients)
    except SecAggConfigError as exc:
        raise SecAggProtocolError(f"setup message carries invalid parameters: {exc}") from exc
    return config, ids


class SecAggClient:
    """One client's view of one SecAgg+ round.

    Parameters
    ----------
    client_id:
        This client's id (its Flower node id); must match the setup message.
    setup_msg:
        The message :meth:`SecAggServer.setup` produced for this client.
    policy:
        This device's security floor (:class:`~fedsqueeze.secagg.config.ClientPolicy`);
        the default refuses thresholds below ``floor((k+1)/2) + 1`` and degrees below the
        Bell et al. bound for the round's ``n``.
    entropy:
        Source of randomness, ``entropy(n) -> n bytes``. Defaults to :func:`os.urandom`;
        inject a seeded source only in tests.
    """

    def __init__(
        self,
        client_id: int,
        setup_msg: Mapping[str, Any],
        *,
        policy: ClientPolicy | None = None,
        entropy: Callable[[int], bytes] | None = None,
    ) -> None:
        self.config, self.client_ids = config_from_setup(setup_msg)
        if get_int(setup_msg, "client_id") != client_id or client_id not in self.client_ids:
            raise SecAggProtocolError(f"setup message is not addressed to client {client_id}")
        self.policy = policy or ClientPolicy()
        self.policy.check(self.config)
        self.client_id = client_id
        graph = neighbour_graph(self.client_ids, self.config.neighbours, self.config.round_seed)
        self._graph = graph
        self.neighbours: tuple[int, ...] = graph[client_id]
        if sorted(get_id_list(setup_msg, "neighbour_ids")) != list(self.neighbours):
            raise SecAggProtocolError(
                "neighbour list in the setup message differs from the graph derived from "
                "the round seed"
            )
        self.session = session_id(self.config, self.client_ids)
        self._entropy = entropy or os.urandom
        self.stage = "setup"
        self._peers: dict[int, tuple[bytes, bytes]] = {}
        self._recv: dict[int, bytes] = {}  # neighbour -> r_b || r_s (private receive keys)
        self._own: tuple[int, int] | None = None  # this client's own b and s shares
        self._complained: list[int] = []  # owners whose deal did not open (stage 3)
        self._revealed: dict[int, str] = {}  # peer -> "b" or "s"
        self._mask_peers: list[int] = []  # set at stage 3: the peers this client masked with
        self._id_pk = b""  # the Ed25519 key this client signs with (identity or per-round)
        self._sign_key: Ed25519PrivateKey | None = None  # per-round key (no identity key)
        self._peer_id_pks: dict[int, bytes] = {}
        self._checked: list[int] = []  # the survivor set U3 this client signed

    # -- saving and restoring between stages ---------------------------------------------

    def to_state(self) -> dict[str, StateValue]:
        """The whole protocol state as a flat, ``ConfigRecord``-friendly dict.

        Holds the public round parameters, the stage, and what the client has made or
        received so far: its private keys (from stage 1 on), its self-mask seed (stage 2),
        the peers' public keys, the shares it holds and the shares it has revealed. The
        entropy source is not saved; :meth:`from_state` takes one again.
        """
        c = self.config
        state: dict[str, StateValue] = {
            "version": STATE_VERSION,
            "client_id": self.client_id,
            "stage": self.stage,
            **c.to_fields(),
            "client_ids": list(self.client_ids),
        }
        if self.stage != "setup":
            state["c_key"] = crypto.private_key_bytes(self._c_key)
            state["s_key"] = crypto.private_key_bytes(self._s_key)
            state["id_pk"] = self._id_pk
            if self._sign_key is not None:
                state["sign_key"] = crypto.signing_key_bytes(self._sign_key)
        if STAGES.index(self.stage) >= STAGES.index("shared"):
            state["b_seed"] = self._b_seed
        peers = sorted(self._peers)
        state["peer_ids"] = peers
        state["peer_c_pks"] = [self._peers[p][0] for p in peers]
        state["peer_s_pks"] = [self._peers[p][1] for p in peers]
        state["peer_id_pks"] = [self._peer_id_pks[p] for p in peers]
        if self.stage != "setup":
            state["recv_keys"] = [self._recv[v] for v in self.neighbours]
        if self._own is not None:
            state["own_b"], state["own_s"] = (shamir.encode_share(y) for y in self._own)
        state["complained"] = list(self._complained)
        state["revealed_b"] = sorted(v for v, kind in self._revealed.items() if kind == "b")
        state["revealed_s"] = sorted(v for v, kind in self._revealed.items() if kind == "s")
        state["mask_peers"] = list(self._mask_peers)
        state["checked_ids"] = list(self._checked)
        return state

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any],
        *,
        policy: ClientPolicy | None = None,
        entropy: Callable[[int], bytes] | None = None,
    ) -> SecAggClient:
        """Rebuild a client saved with :meth:`to_state`, in the stage it was saved in.

        The round parameters are re-verified as for a setup message (against ``policy``),
        and the saved keys, shares and peer lists are checked for size and consistency with
        the neighbour graph.

        Raises
        ------
        SecAggProtocolError
            ``state`` is not a state this module wrote (wrong version, unknown or missing
            field, wrong type or size, or fields inconsistent with its stage).
        """
        try:
            return cls._from_state(state, policy, entropy)
        except SecAggProtocolError as exc:
            raise SecAggProtocolError(f"invalid saved client state: {exc}") from exc

    @classmethod
    def _from_state(
        cls,
        state: Mapping[str, Any],
        policy: ClientPolicy | None,
        entropy: Callable[[int], bytes] | None,
    ) -> SecAggClient:
        if not isinstance(state, Mapping):
            raise SecAggProtocolError(f"expected a mapping, got {type(state).__name__}")
        unknown = sorted(set(state) - _STATE_KEYS)
        if unknown:
            raise SecAggProtocolError(f"unknown fields {unknown}")
        if get_int(state, "version") != STATE_VERSION:
            raise SecAggProtocolError(
                f"version {state['version']!r} is not the supported {STATE_VERSION}"
            )
        stage = get_str(state, "stage")
        if stage not in STAGES:
            raise SecAggProtocolError(f"unknown stage {stage!r}")
        client_id = get_int(state, "client_id")
        client_ids = get_id_list(state, "client_ids")
        setup: dict[str, Any] = {
            "protocol": PROTOCOL,
            "client_id": client_id,
            "client_ids": client_ids,
            **{k: state[k] for k in CONFIG_FIELDS if k in state},
        }
        config, ids = config_from_setup(setup)
        if client_id in ids:
            graph = neighbour_graph(ids, config.neighbours, config.round_seed)
            setup["neighbour_ids"] = list(graph[client_id])
        else:
            setup["neighbour_ids"] = []  # the constructor rejects it with a clear message
        client = cls(client_id, setup, policy=policy, entropy=entropy)

        order = STAGES.index(stage)
        for key, from_stage in (
            ("c_key", "keys"),
            ("s_key", "keys"),
            ("id_pk", "keys"),
            ("recv_keys", "keys"),
            ("b_seed", "shared"),
            ("own_b", "shared"),
            ("own_s", "shared"),
        ):
            if (key in state) != (order >= STAGES.index(from_stage)):
                raise SecAggProtocolError(f"field {key!r} does not match stage {stage!r}")
        if order >= STAGES.index("keys"):
            client._c_key = crypto.load_private_key(get_bytes(state, "c_key"))
            client._s_key = crypto.load_private_key(get_bytes(state, "s_key"))
            client._id_pk = get_bytes(state, "id_pk", crypto.KEY_BYTES)
            recv = get_bytes_list(state, "recv_keys", deals.RECEIVE_BYTES)
            if len(recv) != len(client.neighbours):
                raise SecAggProtocolError("recv_keys must hold one pair per neighbour")
            client._recv = dict(zip(client.neighbours, recv, strict=True))
            if "sign_key" in state:
                sign_key = crypto.load_identity_key(get_bytes(state, "sign_key", crypto.KEY_BYTES))
                if crypto.identity_public_bytes(sign_key) != client._id_pk:
                    raise SecAggProtocolError("sign_key does not match id_pk")
                client._sign_key = sign_key
        elif "sign_key" in state:
            raise SecAggProtocolError(f"field 'sign_key' does not match stage {stage!r}")
        if order >= STAGES.index("shared"):
            client._b_seed = get_bytes(state, "b_seed", shamir.SECRET_BYTES)
            client._own = (
                shamir.decode_share(get_bytes(state, "own_b", shamir.SHARE_BYTES)),
                shamir.decode_share(get_bytes(state, "own_s", shamir.SHARE_BYTES)),
            )

        peer_ids = get_id_list(state, "peer_ids")
        c_pks = get_bytes_list(state, "peer_c_pks", crypto.KEY_BYTES)
        s_pks = get_bytes_list(state, "peer_s_pks", crypto.KEY_BYTES)
        id_pks = get_bytes_list(state, "peer_id_pks", crypto.KEY_BYTES)
        if not len(peer_ids) == len(c_pks) == len(s_pks) == len(id_pks):
            raise SecAggProtocolError("peer_ids and the peers' keys differ in length")
        if not set(peer_ids) <= set(client.neighbours):
            raise SecAggProtocolError("peer_ids holds clients that are not neighbours")
        complained = get_id_list(state, "complained")
        if not set(complained) <= set(peer_ids):
            raise SecAggProtocolError("complained holds clients that are not live peers")
        revealed_b = get_id_list(state, "revealed_b")
        revealed_s = get_id_list(state, "revealed_s")
        if set(revealed_b) & set(revealed_s):
            raise SecAggProtocolError("a peer is marked as revealed both ways")
        mask_peers = get_id_list(state, "mask_peers")
        if not set(mask_peers) <= set(peer_ids) - set(complained):
            raise SecAggProtocolError("mask_peers holds clients that are not live peers")
        if order < STAGES.index("shared") and peer_ids:
            raise SecAggProtocolError(f"peers saved before stage 'shared' ({stage!r})")
        if order < STAGES.index("masked") and (mask_peers or complained):
            raise SecAggProtocolError(f"mask_peers saved before stage 'masked' ({stage!r})")
        checked = get_id_list(state, "checked_ids")
        if (order >= STAGES.index("checked")) != bool(checked):
            raise SecAggProtocolError(f"checked_ids does not match stage {stage!r}")
        if order < STAGES.index("unmasked") and (revealed_b or revealed_s):
            raise SecAggProtocolError(f"revealed shares saved before stage 'unmasked' ({stage!r})")

        client._peers = dict(zip(peer_ids, zip(c_pks, s_pks, strict=True), strict=True))
        client._peer_id_pks = dict(zip(peer_ids, id_pks, strict=True))
        client._checked = sorted(checked)
        client._complained = sorted(complained)
        client._revealed = {v: "b" for v in revealed_b} | {v: "s" for v in revealed_s}
        client._mask_peers = sorted(mask_peers)
        client.stage = stage
        return client

    # -- stage 1 -------------------------------------------------------------------------

    def advertise_keys(self, identity: Ed25519PrivateKey | None = None) -> dict[str, Any]:
        """Generate this round's two X25519 key pairs and return the public keys.

        Also returns ``id_pk``, the Ed25519 key this client signs with (consistency check,
        deals, receive keys). With ``identity`` (this device's Ed25519 key) that is the
        identity key and the advertisement carries ``sig``, a signature over the session,
        this client's id and both X25519 keys, which peers holding a roster check
        (:class:`~fedsqueeze.secagg.config.ClientPolicy`); without it a fresh per-round key.
        ``recv_pks`` / ``recv_sigs``: per neighbour (in the order of :attr:`neighbours`) the
        signed receive keys ``R_b || R_s`` that neighbour encrypts its shares to
        (:mod:`~fedsqueeze.secagg.deals`).
        """
        self._expect("setup")
        self._c_key = crypto.generate_private_key(self._entropy)  # encrypts shares
        self._s_key = crypto.generate_private_key(self._entropy)  # pairwise masks
        out: dict[str, Any] = {
            "c_pk": crypto.public_key_bytes(self._c_key),
            "s_pk": crypto.public_key_bytes(self._s_key),
        }
        if identity is not None:
            out["sig"] = crypto.sign_advertisement(
                identity, self.session, self.client_id, out["c_pk"], out["s_pk"]
            )
        else:
            self._sign_key = identity = crypto.generate_signing_key(self._entropy)
        self._id_pk = out["id_pk"] = crypto.identity_public_bytes(identity)
        out["recv_pks"], out["recv_sigs"] = [], []
        for v in self.neighbours:
            private, pair, sig = deals.receive_keys(
                identity, self.session, self.client_id, v, self._entropy
            )
            self._recv[v] = b"".join(private)
            out["recv_pks"].append(pair)
            out["recv_sigs"].append(sig)
        self.stage = "keys"
        return out

    # -- stage 2 -------------------------------------------------------------------------

    def share_keys(
        self, msg: Mapping[str, Any], identity: Ed25519PrivateKey | None = None
    ) -> dict[str, Any]:
        """Shamir-share ``b_u`` and ``s_u`` among the live neighbours and deal the shares.

        ``msg`` holds ``peer_ids``, ``peer_c_pks``, ``peer_s_pks``, ``peer_id_pks`` (the
        neighbours that advertised keys; the last are their signing keys) and
        ``peer_recv_pks`` / ``peer_recv_sigs`` (the receive keys each made for this client,
        signed). Each deal is signed with ``identity`` if this client advertised it, else
        with its per-round key.
        """
        self._expect("keys")
        sign_key = self._signing_key(identity)
        peer_ids = get_id_list(msg, "peer_ids")
        c_pks = get_bytes_list(msg, "peer_c_pks", crypto.KEY_BYTES)
        s_pks = get_bytes_list(msg, "peer_s_pks", crypto.KEY_BYTES)
        if not len(peer_ids) == len(c_pks) == len(s_pks):
            raise SecAggProtocolError("peer_ids and the peers' keys differ in length")
        if not set(peer_ids) <= set(self.neighbours):
            raise SecAggProtocolError("the server sent keys of clients that are not neighbours")
        if self.policy.roster is not None:
            self._check_signatures(msg, peer_ids, c_pks, s_pks)
        id_pks = get_bytes_list(msg, "peer_id_pks", crypto.KEY_BYTES)
        pairs = get_bytes_list(msg, "peer_recv_pks", deals.RECEIVE_BYTES)
        pair_sigs = get_bytes_list(msg, "peer_recv_sigs", crypto.SIGNATURE_BYTES)
        if not len(peer_ids) == len(id_pks) == len(pairs) == len(pair_sigs):
            raise SecAggProtocolError("peer_ids, peer_id_pks and receive keys differ in length")
        for peer, id_pk, pair, sig in zip(peer_ids, id_pks, pairs, pair_sigs, strict=True):
            if not deals.verify_receive_keys(id_pk, sig, self.session, peer, self.client_id, pair):
                raise SecAggProtocolError(
                    f"the receive keys of client {peer} are not signed by it (substituted?)"
                )
        own_c = crypto.public_key_bytes(self._c_key)
        own_s = crypto.public_key_bytes(self._s_key)
        all_keys = [own_c, own_s, *c_pks, *s_pks]
        if len(set(all_keys)) != len(all_keys):
            raise SecAggProtocolError("public keys are not all distinct (replayed or cloned key)")
        holders = sorted([*peer_ids, self.client_id])
        if len(holders) < self.config.threshold:
            raise SecAggAbort(
                f"client {self.client_id}: only {len(holders)} share holders are alive, "
                f"threshold is {self.config.threshold}"
            )
        self._peers = dict(zip(peer_ids, zip(c_pks, s_pks, strict=True), strict=True))
        self._peer_id_pks = dict(zip(peer_ids, id_pks, strict=True))
        receive = dict(zip(peer_ids, pairs, strict=True))
        self._b_seed = self._entropy(shamir.SECRET_BYTES)
        xs = [share_position(h) for h in holders]
        t = self.config.threshold
        b_shares = shamir.split_secret(self._b_seed, t, xs, self._entropy)
        s_shares = shamir.split_secret(crypto.private_key_bytes(self._s_key), t, xs, self._entropy)
        commit = deals.b_commitment(self.session, self.client_id, self._b_seed)
        recipients, dealt = [], []
        for holder, b_share, s_share in zip(holders, b_shares, s_shares, strict=True):
            if holder == self.client_id:
                self._own = (b_share, s_share)
                continue
            recipients.append(holder)
            dealt.append(
                deals.make_deal(
                    self._c_key,
                    sign_key,
                    self.session,
                    self.client_id,
                    holder,
                    receive[holder],
                    (b_share, s_share),
                    commit,
                    self._entropy,
                )
            )
        self.stage = "shared"
        return {"recipients": recipients, "deals": dealt, "b_commit": commit}

    # -- stage 3 -------------------------------------------------------------------------

    def masked_input(self, msg: Mapping[str, Any], vector: np.ndarray) -> dict[str, Any]:
        """Check the deals addressed to this client and return the masked input.

        ``msg`` holds ``sender_ids``, ``deals`` and the senders' signed ``b_commits``;
        ``vector`` is a 1-D integer array of length ``vector_len`` with values in
        ``[0, 2^bits)`` (see
        :func:`fedsqueeze.secagg.field.to_field`). A deal not signed by its sender is
        refused (the server forged or altered it). A signed deal whose ciphertext of either
        kind does not open is a complaint: the sender goes to ``complaint_ids`` with the
        receive key of each failed kind (``complaint_b`` / ``complaint_s``, empty bytes for a
        kind that opened) and this client does not mask with it. The result's ``masked``
        field is ``y = x + PRG(b_u) + sum_v ±PRG(s_uv) mod 2^b`` bit-packed at ``bits``
        bits, over the senders it does not complain about; empty (no input) when fewer than
        ``t - 1`` of them are left, so that the complaints still reach the server.
        """
        self._expect("shared")
        x = self._check_vector(vector)
        senders = get_id_list(msg, "sender_ids")
        blobs = get_bytes_list(msg, "deals")
        commits = get_bytes_list(msg, "b_commits", deals.COMMIT_BYTES)
        if not len(senders) == len(blobs) == len(commits):
            raise SecAggProtocolError("sender_ids, deals and b_commits differ in length")
        if not set(senders) <= set(self._peers):
            raise SecAggProtocolError("received shares from clients that were not live peers")
        complaints: dict[int, list[bytes]] = {}
        for sender, deal, commit in zip(senders, blobs, commits, strict=True):
            if not deals.verify_deal(
                self._peer_id_pks[sender], self.session, sender, self.client_id, deal, commit
            ):
                raise SecAggProtocolError(
                    f"the deal from client {sender} is not signed by it (forged or altered on "
                    "the way): refusing to mask"
                )
            revealed = []
            for i, kind in enumerate(deals.KINDS):
                raw = self._recv[sender][i * crypto.KEY_BYTES : (i + 1) * crypto.KEY_BYTES]
                try:
                    deals.open_share(
                        crypto.load_private_key(raw),
                        self._peers[sender][0],
                        self.session,
                        kind,
                        sender,
                        self.client_id,
                        deal,
                    )
                    revealed.append(b"")
                except SecAggDecryptionError:
                    revealed.append(raw)
            if any(revealed):
                complaints[sender] = revealed
        if len(senders) < self.config.threshold - 1:
            # With fewer pairwise masks than t - 1 the server could strip this input: with
            # none at all only PRG(b_u) covers it, and the neighbours reveal b_u at unmask.
            raise SecAggProtocolError(
                f"refusing to mask: only {len(senders)} neighbours' shares arrived, fewer than "
                f"t - 1 = {self.config.threshold - 1}"
            )
        self._complained = sorted(complaints)
        filed = {
            "complaint_ids": self._complained,
            "complaint_b": [complaints[v][0] for v in self._complained],
            "complaint_s": [complaints[v][1] for v in self._complained],
        }
        mask_peers = sorted(set(senders) - set(complaints))
        if len(mask_peers) < self.config.threshold - 1:
            # Too few valid deals to mask safely: send the complaints (so the cheating owners
            # are convicted) but no input; the server counts this client as dropped.
            self.stage = "masked"
            return {"masked": b"", **filed}
        self._mask_peers = mask_peers
        bits, d = self.config.bits, self.config.vector_len
        acc = x.astype(crypto.word_dtype(bits))
        acc += crypto.prg_words(crypto.self_mask_key(self._b_seed, self.session), d, bits)
        for peer in self._mask_peers:
            key = crypto.pairwise_key(
                self._s_key, self._peers[peer][1], self.session, b"mask", self.client_id, peer
            )
            # The lower id adds, the higher id subtracts: the pair cancels in the sum.
            if self.client_id < peer:
                acc += crypto.prg_words(key, d, bits)
            else:
                acc -= crypto.prg_words(key, d, bits)
        acc &= acc.dtype.type((1 << bits) - 1)
        self.stage = "masked"
        return {"masked": pack_bits(acc, bits), **filed}

    # -- stage 4: consistency check ------------------------------------------------------

    def check_survivors(
        self, msg: Mapping[str, Any], identity: Ed25519PrivateKey | None = None
    ) -> dict[str, Any]:
        """Sign the survivor set U3 (``included_ids``) after checking it is safe to unmask.

        U3 is every client whose masked input the server summed. It must contain this
        client, have at least ``t`` members (``t`` of them in this client's closed
        neighbourhood) and a connected graph (recomputed from the public seed), otherwise
        the server would learn the sum of each component. Signs with ``identity`` when this
        client advertised it, else with its per-round key. Signing again is refused.
        """
        self._expect("masked")
        included = sorted(get_id_list(msg, "included_ids"))
        if self.client_id not in included or not set(included) <= set(self.client_ids):
            raise SecAggProtocolError(
                "included_ids must contain this client and only clients of the round"
            )
        if len(included) < self.config.threshold:
            raise SecAggProtocolError(
                f"refusing to unmask a sum of {len(included)} clients, fewer than t = "
                f"{self.config.threshold}"
            )
        near = set(included) & {self.client_id, *self._mask_peers}
        if len(near) < self.config.threshold:
            raise SecAggAbort(
                f"client {self.client_id}: only {len(near)} survivors in its neighbourhood, "
                f"threshold is {self.config.threshold}"
            )
        if not is_connected(self._graph, included):
            raise SecAggProtocolError(
                "refusing to unmask: the included clients' graph is disconnected, the server "
                "would learn the sum of each component"
            )
        key = self._signing_key(identity)
        self._checked = included
        self.stage = "checked"
        return {"sig": crypto.sign_survivors(key, self.session, included)}

    # -- stage 5 -------------------------------------------------------------------------

    def unmask(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        """Reveal what the server needs: ``b_v`` of survivors, ``s_v`` of dropped peers.

        This client's own ``b`` share in the clear (``own_b``); for the peers' shares, the
        receive keys of their ciphertexts (``b_keys`` for the survivors other than itself,
        ``s_keys`` for the dropped, in ascending id order), so the server opens the owners'
        signed deals itself (:mod:`~fedsqueeze.secagg.deals`).

        ``msg`` holds ``signer_ids`` and ``signatures``: the consistency-check signatures of
        clients of this client's closed neighbourhood. Every one must verify over the
        survivor set U3 this client signed, and at least ``t`` must be there; an invalid one
        means the server told that neighbour a different set (refused). ``msg`` also holds
        ``survivor_ids`` (must include this client) and ``dropped_ids``: together they must
        classify exactly the peers this client masked with, as U3 does. The client refuses
        (``SecAggProtocolError``) to reveal both kinds of share for one peer in this round,
        whether within one request or across repeated requests.
        """
        if self.stage not in ("checked", "unmasked"):
            raise SecAggProtocolError(f"unmask called in stage {self.stage!r}")
        self._check_consistency(msg)
        survivors = get_id_list(msg, "survivor_ids")
        dropped = get_id_list(msg, "dropped_ids")
        both = set(survivors) & set(dropped)
        if both:
            raise SecAggProtocolError(
                f"refusing to reveal both the self-mask and the mask-key share of {sorted(both)}"
            )
        if self.client_id not in survivors:
            raise SecAggProtocolError("the survivor list must contain this client")
        mine = {self.client_id, *self._mask_peers}
        if set(survivors) | set(dropped) != mine:
            raise SecAggProtocolError(
                "survivors and dropped must classify exactly the peers this client masked with"
            )
        if set(self._checked) & mine != set(survivors):
            raise SecAggProtocolError(
                "the survivors differ from the survivor set U3 this client signed"
            )
        wanted = {v: "b" for v in survivors} | {v: "s" for v in dropped}
        conflict = sorted(v for v, kind in wanted.items() if self._revealed.get(v, kind) != kind)
        if conflict:
            raise SecAggProtocolError(
                f"refusing to reveal both the self-mask and the mask-key share of {conflict} "
                "in one round"
            )
        self._revealed.update(wanted)
        self.stage = "unmasked"
        survivors.sort()
        dropped.sort()
        assert self._own is not None
        return {
            "b_ids": survivors,
            "own_b": shamir.encode_share(self._own[0]),
            "b_keys": [self._receive_key(v, "b") for v in survivors if v != self.client_id],
            "s_ids": dropped,
            "s_keys": [self._receive_key(v, "s") for v in dropped],
        }

    def _receive_key(self, owner: int, kind: str) -> bytes:
        i = deals.KINDS.index(kind)
        return self._recv[owner][i * crypto.KEY_BYTES : (i + 1) * crypto.KEY_BYTES]

    # -- helpers -------------------------------------------------------------------------

    def _signing_key(self, identity: Ed25519PrivateKey | None) -> Ed25519PrivateKey:
        """``identity`` if given, else the per-round key; it must be the advertised one."""
        key = identity if identity is not None else self._sign_key
        if key is None or crypto.identity_public_bytes(key) != self._id_pk:
            raise SecAggProtocolError("the signing key is not the one this client advertised")
        return key

    def _check_signatures(
        self, msg: Mapping[str, Any], peer_ids: list[int], c_pks: list[bytes], s_pks: list[bytes]
    ) -> None:
        """Every peer's keys must be signed by a distinct identity key of the roster."""
        assert self.policy.roster is not None
        try:
            id_pks = get_bytes_list(msg, "peer_id_pks", crypto.KEY_BYTES)
            sigs = get_bytes_list(msg, "peer_sigs", crypto.SIGNATURE_BYTES)
        except SecAggProtocolError as exc:
            raise SecAggProtocolError(
                f"refusing unauthenticated peer keys (this client holds a roster): {exc}"
            ) from exc
        if not len(id_pks) == len(sigs) == len(peer_ids):
            raise SecAggProtocolError("peer identity keys and signatures differ in length")
        if len(set(id_pks)) != len(id_pks):
            raise SecAggProtocolError("two peers advertise the same identity key")
        for peer, id_pk, sig, c_pk, s_pk in zip(peer_ids, id_pks, sigs, c_pks, s_pks, strict=True):
            if id_pk not in self.policy.roster:
                raise SecAggProtocolError(f"client {peer}'s identity key is not in the roster")
            if not crypto.verify_advertisement(id_pk, sig, self.session, peer, c_pk, s_pk):
                raise SecAggProtocolError(
                    f"the key advertisement of client {peer} is not signed by its identity key "
                    "(substituted keys?)"
                )

    def _check_consistency(self, msg: Mapping[str, Any]) -> None:
        """``t`` valid signatures over the signed U3 from this closed neighbourhood, none bad."""
        signers = get_id_list(msg, "signer_ids")
        sigs = get_bytes_list(msg, "signatures", crypto.SIGNATURE_BYTES)
        if len(signers) != len(sigs):
            raise SecAggProtocolError("signer_ids and signatures differ in length")
        keys = {self.client_id: self._id_pk} | self._peer_id_pks
        for signer, sig in zip(signers, sigs, strict=True):
            if signer not in keys or signer not in self._checked:
                raise SecAggProtocolError(
                    f"consistency signature of client {signer}, not a surviving neighbour"
                )
            if not crypto.verify_survivors(keys[signer], sig, self.session, self._checked):
                raise SecAggProtocolError(
                    f"client {signer}'s consistency signature is not over the survivor set this "
                    "client signed: the server sent different survivor sets (refusing to unmask)"
                )
        if len(signers) < self.config.threshold:
            raise SecAggProtocolError(
                f"refusing to unmask: {len(signers)} consistency signatures over the survivor "
                f"set, fewer than t = {self.config.threshold}"
            )

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            raise SecAggProtocolError(
                f"client {self.client_id}: call not allowed in stage {self.stage!r} "
                f"(expected {stage!r})"
            )

    def _check_vector(self, vector: np.ndarray) -> np.ndarray:
        x = np.asarray(vector)
        d, bits = self.config.vector_len, self.config.bits
        if x.dtype.kind not in "iu":
            raise SecAggInputError(f"input must be an integer array, got dtype {x.dtype}")
        if x.shape != (d,):
            raise SecAggInputError(f"input must have shape ({d},), got {x.shape}")
        if int(x.min()) < 0 or int(x.max()) >= 1 << bits:
            raise SecAggInputError(
                f"input values must lie in [0, 2^{bits}); map signed values with to_field()"
            )
        return x
