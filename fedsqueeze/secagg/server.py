"""Server side of SecAgg+ as an explicit state machine.

Stages, in order::

    setup()               -> {cid: setup msg}
    collect_keys(msgs)    -> {cid: neighbours' public keys}          (U1: advertised keys)
    collect_shares(msgs)  -> {cid: deals addressed to cid}            (U2: shared keys)
    collect_masked(msgs)  -> {cid: survivor set U3}                   (U3: sent masked input)
    collect_signatures(msgs) -> {cid: unmask request + signatures}    (U4: signed U3)
    finish(msgs)          -> SecAggResult                             (U5: answered unmasking)

A client missing from a ``collect_*``/``finish`` dict is treated as dropped at that stage;
a client whose message is malformed is dropped too and listed in :attr:`SecAggServer.rejected`
(named, with the reason): a low-order or duplicated public key, unsigned receive keys or
deals, an invalid consistency signature, a revealed key that is not its receive key.

Consistency check (Bonawitz et al. 2017, round 3): the server sends U3 to every client of
U3, verifies each returned signature over it, and forwards to each client of U4 the
signatures of its closed neighbourhood; a client with fewer than ``t`` of them is not asked
to unmask (it would refuse).

Each client's secrets are shared among its closed neighbourhood, so recovery needs, for every
included client ``u``, ``t`` live holders of ``b_u`` among ``u`` and its neighbours, and, for
every client ``v`` that dropped after sharing but is masked into a neighbour's input, ``t``
live neighbours holding ``s_v``. Before sharing, the server prunes clients whose
neighbourhood is already too small (they could never be recovered); after masked inputs
arrive nothing can be pruned any more, so a failed condition raises :class:`SecAggAbort`.

The server also aborts, before asking for any share, when the communication graph of the
included clients (those whose masked input is in the sum) is disconnected: pairwise masks
cancel inside each component, so unmasking would reveal the sum of every component, down
to ``t`` clients. The consistency-check request carries ``included_ids`` so clients check
the same.

Verifiable deals (:mod:`fedsqueeze.secagg.deals`): every share travels in its own signed
ciphertext under a receive key its holder advertised. A holder whose deal does not open
complains at the mask stage with that receive key; the server judges (:meth:`_judge`): the
owner is convicted if its signed ciphertext does not open under the holder's advertised key,
the holder otherwise. A convicted owner is left out of the sum (a dropped client whose
complaining holders did not mask with it); a false complainer likewise. At unmasking holders
reveal receive keys instead of shares and the server opens the deals: every share is what
its owner signed. Reconstruction is robust: a self-mask seed is verified against the owner's
commitment and a mask key against its public key; if the first ``t`` shares fail, each
``t``-subset of the first ``t + 1`` is tried; a share off the verified polynomial convicts
its owner (its input stays in the sum, it is named), and a secret that cannot be
reconstructed aborts the round naming its owner. An honest holder is never blamed for what
its owner dealt. Convictions carry evidence (:attr:`SecAggResult.evidence`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NoReturn

import numpy as np

from fedsqueeze.compression.bitpack import packed_size, unpack_bits
from fedsqueeze.secagg import crypto, deals, shamir
from fedsqueeze.secagg.client import share_position
from fedsqueeze.secagg.config import (
    PROTOCOL,
    SecAggConfig,
    check_client_ids,
    get_bytes,
    get_bytes_list,
    get_id_list,
    is_connected,
    neighbour_graph,
    session_id,
)
from fedsqueeze.secagg.deals import COMMIT_BYTES, Evidence, b_commitment
from fedsqueeze.secagg.errors import SecAggAbort, SecAggError, SecAggProtocolError

Message = dict[str, Any]


@dataclass
class SecAggResult:
    """Outcome of a round.

    Attributes
    ----------
    total:
        ``uint64`` array of length ``vector_len``: the sum mod ``2^bits`` of the inputs of
        ``included`` (decode signed sums with :func:`~fedsqueeze.secagg.field.from_field`).
    included:
        Sorted ids whose input is in ``total`` (they sent a masked input).
    dropped:
        Sorted ids of every other selected client.
    rejected:
        Clients dropped because a message was malformed, with the reason.
    evidence:
        For each client convicted of dealing a bad share: the deals that prove it
        (:func:`~fedsqueeze.secagg.deals.attest` checks each; for a share off the owner's
        polynomial, the deals of the ``t`` shares that define it come first).
    """

    total: np.ndarray
    included: list[int]
    dropped: list[int]
    rejected: dict[int, str] = field(default_factory=dict)
    evidence: dict[int, list[Evidence]] = field(default_factory=dict)


def _matches_commitment(session: bytes, client_id: int, commit: bytes, seed: bytes) -> bool:
    return b_commitment(session, client_id, seed) == commit


def _matches_public_key(public: bytes, raw: bytes) -> bool:
    return crypto.public_key_bytes(crypto.load_private_key(raw)) == public


def closed_alive(graph: Mapping[int, Sequence[int]], u: int, alive: set[int]) -> int:
    """How many of ``u`` and its neighbours are in ``alive`` (the live holders of u's shares)."""
    return (u in alive) + sum(v in alive for v in graph[u])


def prune_starved(graph: Mapping[int, Sequence[int]], alive: set[int], threshold: int) -> set[int]:
    """Drop clients whose closed neighbourhood within ``alive`` has fewer than t members.

    Their secrets could never be reconstructed, so letting them continue would only make
    the round abort later. Removing one can starve a neighbour, hence the fixed point.
    """
    alive = set(alive)
    while starved := {u for u in alive if closed_alive(graph, u, alive) < threshold}:
        alive -= starved
    return alive


Pairs = Collection[tuple[int, int]]
"""``(holder, owner)`` pairs whose deal did not open: the holder has no share of the owner and
did not mask with it (a complaint that convicted the owner)."""


def holder_shortfall(
    graph: Mapping[int, Sequence[int]],
    threshold: int,
    u2: set[int],
    u3: set[int],
    alive: set[int],
    unmasked: Pairs = (),
) -> str | None:
    """The first secret that fewer than ``t`` holders in ``alive`` can reveal, or ``None``.

    The self-mask seed of every included client (``u3``) is held by its closed
    neighbourhood; the mask key of a client of ``u2`` outside ``u3`` is needed when an
    included neighbour masked with it, and is held by those neighbours.
    """
    t, missing = threshold, set(unmasked)
    for u in sorted(u3):
        holders = closed_alive(graph, u, alive)
        if holders < t:
            return f"only {holders} holders of the self-mask seed of client {u} remain"
    for v in sorted(u2 - u3):
        masked_with = [w for w in graph[v] if w in u3 and (w, v) not in missing]
        holders = sum(w in alive for w in masked_with)
        if masked_with and holders < t:
            return f"only {holders} holders of the mask key of dropped client {v} remain"
    return None


def masked_stage_abort(
    graph: Mapping[int, Sequence[int]],
    threshold: int,
    u2: set[int],
    u3: set[int],
    unmasked: Pairs = (),
) -> str | None:
    """Why the round must abort once the masked inputs of ``u3`` are in, or ``None``.

    Every secret :func:`holder_shortfall` lists needs ``t`` holders in ``u3``, and the
    included clients' graph must be connected (otherwise unmasking reveals the sum of each
    component).
    """
    t = threshold
    if len(u3) < t:
        return f"only {len(u3)} clients left after masked input, threshold is {t}"
    short = holder_shortfall(graph, t, u2, u3, u3, unmasked)
    if short is not None:
        return f"{short} after masked input (threshold {t})"
    if not is_connected(graph, u3):
        return (
            f"the graph of the {len(u3)} included clients is disconnected; unmasking "
            "would reveal the sum of each component"
        )
    return None


def unmask_stage_abort(
    graph: Mapping[int, Sequence[int]],
    threshold: int,
    u2: set[int],
    u3: set[int],
    u5: set[int],
    unmasked: Pairs = (),
) -> str | None:
    """Why unmasking fails when only ``u5`` (of ``u3``) reveal their shares, or ``None``."""
    if not u5:
        return "no client answered during unmasking"
    short = holder_shortfall(graph, threshold, u2, u3, u5, unmasked)
    return None if short is None else f"{short} after unmasking, threshold is {threshold}"


class SecAggServer:
    """The aggregator of one SecAgg+ round; see the module docstring for the stages."""

    def __init__(self, config: SecAggConfig, client_ids: Sequence[int]) -> None:
        if not isinstance(config, SecAggConfig):
            raise SecAggProtocolError("config must be a SecAggConfig")
        self.config = config
        self.client_ids = check_client_ids(client_ids, config.num_clients)
        self.session = session_id(config, self.client_ids)
        self.graph = neighbour_graph(self.client_ids, config.neighbours, config.round_seed)
        self.stage = "init"
        self.rejected: dict[int, str] = {}
        self.silent: set[int] = set()  # asked at some stage and did not answer
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._signed: dict[int, tuple[bytes, bytes]] = {}  # identity key, signature
        self._id_pks: dict[int, bytes] = {}  # consistency-check signing keys
        self._checks: dict[int, bytes] = {}  # consistency signatures over U3
        self._u1: set[int] = set()
        self._u2: set[int] = set()
        self._u3: set[int] = set()
        self._commits: dict[int, bytes] = {}
        self._deals: dict[tuple[int, int], bytes] = {}  # (owner, holder) -> signed deal
        self._receive: dict[tuple[int, int], tuple[bytes, bytes]] = {}  # (holder, owner) -> R, sig
        self._unmasked: set[tuple[int, int]] = set()  # (holder, owner): upheld complaints
        self._keys_revealed: dict[tuple[int, int, str], bytes] = {}  # (owner, holder, kind)
        self.evidence: dict[int, list[Evidence]] = {}
        self._requests: dict[int, tuple[list[int], list[int]]] = {}
        self._acc: np.ndarray | None = None

    # -- stages --------------------------------------------------------------------------

    def setup(self) -> dict[int, Message]:
        """Stage 0: parameters and neighbour list for every selected client."""
        self._expect("init", "setup")
        c = self.config
        common: Message = {
            "protocol": PROTOCOL,
            "client_ids": list(self.client_ids),
            **c.to_fields(),
        }
        return {
            cid: {**common, "client_id": cid, "neighbour_ids": list(self.graph[cid])}
            for cid in self.client_ids
        }

    def collect_keys(self, msgs: Mapping[int, Mapping[str, Any]]) -> dict[int, Message]:
        """Stage 1: gather public keys; send each live client its live neighbours' keys."""
        self._expect("setup", "collect_keys")
        for cid, msg in self._valid(msgs, set(self.client_ids), "advertise_keys"):
            try:
                c_pk = get_bytes(msg, "c_pk", crypto.KEY_BYTES)
                s_pk = get_bytes(msg, "s_pk", crypto.KEY_BYTES)
                id_pk = get_bytes(msg, "id_pk", crypto.KEY_BYTES)
                if crypto.is_low_order(c_pk) or crypto.is_low_order(s_pk):
                    raise SecAggProtocolError("low-order X25519 public key (e.g. all zero)")
                if c_pk == s_pk:
                    raise SecAggProtocolError("the two public keys are equal")
                receive = self._receive_keys(cid, msg, id_pk)
                if "sig" in msg:
                    sig = get_bytes(msg, "sig", crypto.SIGNATURE_BYTES)
                    if not crypto.verify_advertisement(id_pk, sig, self.session, cid, c_pk, s_pk):
                        raise SecAggProtocolError("key advertisement signature does not verify")
                    self._signed[cid] = (id_pk, sig)
            except SecAggError as exc:
                self._reject(cid, "advertise_keys", exc)
                continue
            self._keys[cid] = (c_pk, s_pk)
            self._id_pks[cid] = id_pk
            self._receive.update(receive)
        # A key advertised by two clients: one copied it (peers would refuse the round).
        owners: dict[bytes, list[int]] = {}
        for cid, (c_pk, s_pk) in self._keys.items():
            for key in {c_pk, s_pk, self._id_pks[cid]}:
                owners.setdefault(key, []).append(cid)
        for shared in (ids for ids in owners.values() if len(ids) > 1):
            for cid in shared:
                self._keys.pop(cid, None)
                self.rejected[cid] = f"advertise_keys: public key also advertised by {shared}"
        self._u1 = self._prune(set(self._keys))
        self._require(self._u1, "after key advertisement", pruned=True)
        out: dict[int, Message] = {}
        for u in sorted(self._u1):
            peers = self._live_neighbours(u, self._u1)
            out[u] = {
                "peer_ids": peers,
                "peer_c_pks": [self._keys[v][0] for v in peers],
                "peer_s_pks": [self._keys[v][1] for v in peers],
                "peer_id_pks": [self._id_pks[v] for v in peers],
                "peer_recv_pks": [self._receive[(v, u)][0] for v in peers],
                "peer_recv_sigs": [self._receive[(v, u)][1] for v in peers],
            }
            if any(v in self._signed for v in peers):  # forwarded for clients with a roster
                out[u]["peer_sigs"] = [self._signed.get(v, (b"", b""))[1] for v in peers]
        return out

    def collect_shares(self, msgs: Mapping[int, Mapping[str, Any]]) -> dict[int, Message]:
        """Stage 2: check each owner's signed deals and route them to their holders."""
        self._expect("collect_keys", "collect_shares")
        responders: set[int] = set()
        for cid, msg in self._valid(msgs, self._u1, "share_keys"):
            try:
                recipients = get_id_list(msg, "recipients")
                blobs = get_bytes_list(msg, "deals", deals.DEAL_BYTES)
                commit = get_bytes(msg, "b_commit", COMMIT_BYTES)
                if len(recipients) != len(blobs):
                    raise SecAggProtocolError("recipients and deals differ in length")
                if set(recipients) != set(self._live_neighbours(cid, self._u1)):
                    raise SecAggProtocolError("shares must go to exactly the live neighbours")
                for v, blob in zip(recipients, blobs, strict=True):
                    if not deals.verify_deal(self._id_pks[cid], self.session, cid, v, blob, commit):
                        raise SecAggProtocolError(f"the deal for client {v} is not signed by it")
            except SecAggError as exc:
                self._reject(cid, "share_keys", exc)
                continue
            responders.add(cid)
            self._commits[cid] = commit
            for v, blob in zip(recipients, blobs, strict=True):
                self._deals[(cid, v)] = blob
        self._u2 = self._prune(responders)
        self._require(self._u2, "after key sharing", pruned=True)
        out: dict[int, Message] = {}
        for v in sorted(self._u2):
            senders = self._live_neighbours(v, self._u2)
            out[v] = {
                "sender_ids": senders,
                "deals": [self._deals[(u, v)] for u in senders],
                "b_commits": [self._commits[u] for u in senders],
            }
        return out

    def collect_masked(self, msgs: Mapping[int, Mapping[str, Any]]) -> dict[int, Message]:
        """Stage 3: judge complaints, sum the masked inputs, send U3 for the consistency check.

        A complaint convicts exactly one client (:mod:`~fedsqueeze.secagg.deals`): the owner
        whose signed deal does not open under the holder's revealed receive key, or else the
        complaining holder. Convicted clients' inputs are left out of the sum; they count as
        dropped after sharing, and a holder that complained did not mask with the owner.
        """
        self._expect("collect_shares", "collect_masked")
        c = self.config
        size = packed_size(c.vector_len, c.bits)
        payloads: dict[int, bytes] = {}
        complaints: dict[int, list[tuple[int, list[bytes]]]] = {}
        for cid, msg in self._valid(msgs, self._u2, "masked_input"):
            try:
                complaints[cid] = self._complaints(cid, msg)
                if complaints[cid] and get_bytes(msg, "masked") == b"":
                    continue  # complaints only: too few valid deals left to mask safely
                payloads[cid] = get_bytes(msg, "masked", size)
            except SecAggError as exc:
                complaints.pop(cid, None)
                self._reject(cid, "masked_input", exc)
        convicted = set()
        for holder, filed in complaints.items():
            for owner, revealed in filed:
                guilty = self._judge(holder, owner, revealed)
                convicted.add(guilty)
                if guilty == owner:
                    self._unmasked.add((holder, owner))
        acc = np.zeros(c.vector_len, dtype=crypto.word_dtype(c.bits))
        for cid, payload in sorted(payloads.items()):
            if cid not in convicted:
                acc += unpack_bits(payload, c.bits, c.vector_len).astype(acc.dtype)
                self._u3.add(cid)
        self._acc = acc
        reason = masked_stage_abort(self.graph, c.threshold, self._u2, self._u3, self._unmasked)
        if reason is not None:
            self._abort(reason)
        included = sorted(self._u3)
        for u in included:
            peers = [v for v in self._live_neighbours(u, self._u2) if (u, v) not in self._unmasked]
            survivors = sorted([u, *(v for v in peers if v in self._u3)])
            dropped = [v for v in peers if v not in self._u3]
            self._requests[u] = (survivors, dropped)
        return {u: {"included_ids": included} for u in included}

    def collect_signatures(self, msgs: Mapping[int, Mapping[str, Any]]) -> dict[int, Message]:
        """Stage 4: verify the signatures over U3; ask each signer for its unmask shares."""
        self._expect("collect_masked", "collect_signatures")
        included = sorted(self._u3)
        for cid, msg in self._valid(msgs, self._u3, "consistency_check"):
            try:
                sig = get_bytes(msg, "sig", crypto.SIGNATURE_BYTES)
                if not crypto.verify_survivors(self._id_pks[cid], sig, self.session, included):
                    raise SecAggProtocolError("signature over the survivor set does not verify")
            except SecAggError as exc:
                self._reject(cid, "consistency_check", exc)
                continue
            self._checks[cid] = sig
        out: dict[int, Message] = {}
        for u in sorted(self._checks):
            signers = [v for v in [u, *self.graph[u]] if v in self._checks]
            if len(signers) < self.config.threshold:
                continue  # the client would refuse to unmask with fewer than t signatures
            survivors, dropped = self._requests[u]
            out[u] = {
                "survivor_ids": survivors,
                "dropped_ids": dropped,
                "signer_ids": sorted(signers),
                "signatures": [self._checks[v] for v in sorted(signers)],
            }
        self._requests = {u: self._requests[u] for u in out}
        self._require(set(out), "after the consistency check")
        return out

    def counts(self, included: Sequence[int]) -> dict[str, int]:
        """Exact per-client accounting of the round, whatever its outcome.

        ``included``: whose input reached the model (``SecAggResult.included``, or none when
        the round was aborted or its sum refused). Every selected client is counted once:
        ``clients`` (included), ``rejected`` (named in :attr:`rejected`, not included),
        ``dropped`` (did not answer a stage), ``discarded`` (answered, but the round was
        thrown away or the server excluded it); ``flagged``: named but already in the sum
        (e.g. a wrong unmask share after its masked input arrived).
        """
        inc = set(included)
        named = set(self.rejected) & set(self.client_ids)
        rejected = named - inc
        dropped = self.silent - named - inc
        return {
            "clients": len(inc),
            "rejected": len(rejected),
            "dropped": len(dropped),
            "discarded": len(self.client_ids) - len(inc) - len(rejected) - len(dropped),
            "flagged": len(named & inc),
        }

    def finish(self, msgs: Mapping[int, Mapping[str, Any]]) -> SecAggResult:
        """Stage 5: open the revealed deals, reconstruct the secrets, strip the masks.

        Each holder reveals its own self-mask share and, for its peers' shares, the receive
        keys of their deals; the server opens the deals itself, so every share is exactly
        what its owner dealt. A key that is not the holder's advertised receive key rejects
        that holder's answer; a deal that does not open, or a share off the owner's verified
        polynomial, convicts the owner (named in ``rejected``, evidence in ``evidence``).
        """
        self._expect("collect_signatures", "finish")
        c = self.config
        points: dict[str, dict[int, list[tuple[int, int, int]]]] = {
            "b": {u: [] for u in self._u3},
            "s": {v: [] for v in self._u2 - self._u3},
        }
        answered: set[int] = set()
        for cid, msg in self._valid(msgs, set(self._requests), "unmask"):
            try:
                opened = self._open_answer(cid, msg)
            except SecAggError as exc:
                self._reject(cid, "unmask", exc)
                continue
            answered.add(cid)
            for owner, kind, share in opened:
                points[kind][owner].append((share_position(cid), share, cid))
        reason = unmask_stage_abort(
            self.graph, c.threshold, self._u2, self._u3, answered, self._unmasked
        )
        if reason is not None:
            self._abort(reason)
        assert self._acc is not None
        acc, d, bits = self._acc, c.vector_len, c.bits
        for u in sorted(self._u3):
            commit = self._commits[u]
            seed = self._reconstruct(
                u, "b", points["b"][u], partial(_matches_commitment, self.session, u, commit)
            )
            acc -= crypto.prg_words(crypto.self_mask_key(seed, self.session), d, bits)
        for v in sorted(points["s"]):
            masked_with = [
                u for u in self._live_neighbours(v, self._u3) if (u, v) not in self._unmasked
            ]
            if not masked_with:
                continue
            s_pk = self._keys[v][1]
            raw = self._reconstruct(v, "s", points["s"][v], partial(_matches_public_key, s_pk))
            s_key = crypto.load_private_key(raw)
            for u in masked_with:
                key = crypto.pairwise_key(s_key, self._keys[u][1], self.session, b"mask", v, u)
                # Client u added the pair mask if u < v, subtracted it otherwise: undo that.
                if u < v:
                    acc -= crypto.prg_words(key, d, bits)
                else:
                    acc += crypto.prg_words(key, d, bits)
        acc &= acc.dtype.type((1 << bits) - 1)
        self.stage = "done"
        self._acc = None
        self._deals.clear()
        included = sorted(self._u3)
        return SecAggResult(
            total=acc.astype(np.uint64),
            included=included,
            dropped=sorted(set(self.client_ids) - self._u3),
            rejected=dict(self.rejected),
            evidence={u: list(e) for u, e in self.evidence.items()},
        )

    # -- helpers -------------------------------------------------------------------------

    def _expect(self, stage: str, call: str) -> None:
        if self.stage != stage:
            raise SecAggProtocolError(
                f"{call}() not allowed in server stage {self.stage!r} (expected {stage!r})"
            )
        self.stage = call

    def _valid(
        self, msgs: Mapping[int, Mapping[str, Any]], allowed: set[int], stage: str
    ) -> list[tuple[int, Mapping[str, Any]]]:
        if not isinstance(msgs, Mapping):
            raise SecAggProtocolError("messages must be a mapping {client_id: message}")
        self.silent |= allowed - set(msgs)
        out = []
        for cid, msg in msgs.items():
            if cid not in allowed:
                self.rejected[cid] = f"{stage}: not expected at this stage"
                continue
            out.append((cid, msg))
        return sorted(out, key=lambda item: item[0])

    def _reject(self, cid: int, stage: str, exc: Exception) -> None:
        self.rejected[cid] = f"{stage}: {exc}"

    def _live_neighbours(self, u: int, alive: set[int]) -> list[int]:
        return [v for v in self.graph[u] if v in alive]

    def _prune(self, alive: set[int]) -> set[int]:
        return prune_starved(self.graph, alive, self.config.threshold)

    def _require(self, alive: set[int], when: str, pruned: bool = False) -> None:
        if len(alive) < self.config.threshold:
            note = (
                " (after excluding clients with fewer than t live share holders in their "
                "neighbourhood)"
                if pruned
                else ""
            )
            self._abort(
                f"only {len(alive)} clients left {when}{note}, threshold is {self.config.threshold}"
            )

    def _abort(self, reason: str) -> NoReturn:
        self.stage = "aborted"
        self._acc = None
        raise SecAggAbort(f"secure aggregation aborted: {reason}")

    def _receive_keys(
        self, cid: int, msg: Mapping[str, Any], id_pk: bytes
    ) -> dict[tuple[int, int], tuple[bytes, bytes]]:
        """A key advertisement's signed receive keys, one pair per neighbour in graph order."""
        pairs = get_bytes_list(msg, "recv_pks", deals.RECEIVE_BYTES)
        sigs = get_bytes_list(msg, "recv_sigs", crypto.SIGNATURE_BYTES)
        owners = self.graph[cid]
        if not len(pairs) == len(sigs) == len(owners):
            raise SecAggProtocolError("one pair of receive keys per neighbour is required")
        out = {}
        for owner, pair, sig in zip(owners, pairs, sigs, strict=True):
            if not deals.verify_receive_keys(id_pk, sig, self.session, cid, owner, pair):
                raise SecAggProtocolError(f"the receive keys for client {owner} are not signed")
            k = crypto.KEY_BYTES
            if crypto.is_low_order(pair[:k]) or crypto.is_low_order(pair[k:]):
                raise SecAggProtocolError("low-order X25519 receive key (e.g. all zero)")
            out[(cid, owner)] = (pair, sig)
        return out

    def _complaints(self, cid: int, msg: Mapping[str, Any]) -> list[tuple[int, list[bytes]]]:
        """``[(owner, [r_b or b"", r_s or b""])]`` from a masked-input reply (none if absent)."""
        if "complaint_ids" not in msg:
            return []
        owners = get_id_list(msg, "complaint_ids")
        keys = [get_bytes_list(msg, f"complaint_{kind}") for kind in deals.KINDS]
        if not all(len(k) == len(owners) for k in keys):
            raise SecAggProtocolError("complaint ids and keys differ in length")
        senders = set(self._live_neighbours(cid, self._u2))
        out = []
        for i, owner in enumerate(owners):
            revealed = [k[i] for k in keys]
            if owner not in senders:
                raise SecAggProtocolError(f"complaint about client {owner}, not a sender")
            if not any(revealed) or any(len(r) not in (0, crypto.KEY_BYTES) for r in revealed):
                raise SecAggProtocolError(f"complaint about client {owner} without a valid key")
            out.append((owner, revealed))
        return out

    def _judge(self, holder: int, owner: int, revealed: list[bytes]) -> int:
        """Who a complaint convicts: the owner if every revealed deal fails, else the holder."""
        found: list[Evidence] = []
        for kind, key in zip(deals.KINDS, revealed, strict=True):
            if not key:
                continue
            try:
                share = self._open(holder, owner, kind, key)
            except SecAggError:
                self.rejected[holder] = (
                    f"masked_input: complaint about client {owner} with a key that is not its "
                    "receive key"
                )
                return holder
            if share is not None:
                self.rejected[holder] = (
                    f"masked_input: false complaint, client {owner}'s {kind} share opens"
                )
                return holder
            found.append(self._evidence(owner, holder, kind, key))
        self._convict(owner, f"dealt client {holder} a share that does not open", found)
        return owner

    def _open(self, holder: int, owner: int, kind: str, key: bytes) -> int | None:
        """The share ``owner`` dealt ``holder`` (None: garbage); a wrong key raises."""
        pair = self._receive[(holder, owner)][0]
        deal = self._deals[(owner, holder)]
        c_pk = self._keys[owner][0]
        return deals.open_revealed(key, pair, c_pk, self.session, kind, owner, holder, deal)

    def _open_answer(self, cid: int, msg: Mapping[str, Any]) -> list[tuple[int, str, int]]:
        """``[(owner, kind, share)]`` from a holder's unmask reply; wrong keys raise."""
        survivors, dropped = self._requests[cid]
        b_ids = get_id_list(msg, "b_ids")
        s_ids = get_id_list(msg, "s_ids")
        if sorted(b_ids) != survivors or sorted(s_ids) != dropped:
            raise SecAggProtocolError("answer does not match the unmask request")
        own = shamir.decode_share(get_bytes(msg, "own_b", shamir.SHARE_BYTES))
        others = [u for u in survivors if u != cid]
        b_keys = get_bytes_list(msg, "b_keys", crypto.KEY_BYTES)
        s_keys = get_bytes_list(msg, "s_keys", crypto.KEY_BYTES)
        if len(b_keys) != len(others) or len(s_keys) != len(dropped):
            raise SecAggProtocolError("ids and keys differ in length")
        revealed = [(u, "b", k) for u, k in zip(others, b_keys, strict=True)]
        revealed += [(v, "s", k) for v, k in zip(dropped, s_keys, strict=True)]
        opened = [
            (owner, kind, key, self._open(cid, owner, kind, key)) for owner, kind, key in revealed
        ]
        out = [(cid, "b", own)]
        for owner, kind, key, share in opened:
            self._keys_revealed[(owner, cid, kind)] = key
            if share is None:
                self._convict(
                    owner,
                    f"dealt client {cid} a share that does not open",
                    [self._evidence(owner, cid, kind, key)],
                )
            else:
                out.append((owner, kind, share))
        return out

    def _evidence(self, owner: int, holder: int, kind: str, key: bytes) -> Evidence:
        pair, sig = self._receive[(holder, owner)]
        return Evidence(
            session=self.session,
            owner=owner,
            holder=holder,
            kind=kind,
            owner_c_pk=self._keys[owner][0],
            owner_sign_pk=self._id_pks[owner],
            holder_sign_pk=self._id_pks[holder],
            receive_pair=pair,
            receive_sig=sig,
            deal=self._deals[(owner, holder)],
            b_commit=self._commits[owner],
            revealed=key,
        )

    def _convict(self, owner: int, why: str, evidence: list[Evidence]) -> None:
        self.rejected[owner] = f"share_keys: {why}"
        self.evidence.setdefault(owner, []).extend(evidence)

    def _reconstruct(
        self,
        owner: int,
        kind: str,
        points: list[tuple[int, int, int]],
        verify: Callable[[bytes], bool],
    ) -> bytes:
        """The owner's secret behind ``points`` ``(x, share, holder)``, verified.

        Every point is what the owner dealt (opened by the server, or the owner's own
        share), so a share off the verified polynomial, or no verified polynomial at all,
        convicts the owner.
        """
        t = self.config.threshold
        what = f"{'the self-mask seed' if kind == 'b' else 'the mask key'} of client {owner}"
        if len(points) < t:
            self._abort(f"only {len(points)} shares of {what} arrived, threshold is {t}")
        # Use the t shares with the smallest positions: holder sets then repeat across
        # secrets and the Lagrange coefficients are cached. If they fail verification, try
        # leaving out each one of the first t + 1 (one wrong share is always survived).
        ordered = sorted(points)
        tries = [ordered[:t]]
        if len(ordered) > t:
            head = ordered[: t + 1]
            tries += [head[:j] + head[j + 1 :] for j in range(t - 1, -1, -1)]
        for chosen in tries:
            xs, ys = [p[0] for p in chosen], [p[1] for p in chosen]
            try:
                secret = shamir.reconstruct_secret(xs, ys)
                ok = verify(secret)
            except SecAggError:
                continue
            if ok:
                # Every revealed share is checked against the verified polynomial, not only
                # those needed: a wrong share is attributed even when the first t were right.
                wrong = [
                    p
                    for p in ordered
                    if p[0] not in xs and shamir.interpolate_at(xs, ys, p[0]) != p[1]
                ]
                if wrong:
                    self._convict(
                        owner,
                        f"dealt a share of {what} off its polynomial",
                        self._point_evidence(owner, kind, [*chosen, *wrong]),
                    )
                return secret
        self._convict(
            owner,
            f"its shares of {what} do not reconstruct a secret matching "
            f"{'its commitment' if kind == 'b' else 'its public key'}",
            self._point_evidence(owner, kind, ordered),
        )
        self._abort(f"the shares client {owner} dealt of {what} do not reconstruct it")

    def _point_evidence(
        self, owner: int, kind: str, points: list[tuple[int, int, int]]
    ) -> list[Evidence]:
        return [
            self._evidence(owner, holder, kind, self._keys_revealed[(owner, holder, kind)])
            for _, _, holder in points
            if holder != owner
        ]
