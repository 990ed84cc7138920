"""Server side of SecAgg+ as an explicit state machine.

Stages, in order::

    setup()               -> {cid: setup msg}
    collect_keys(msgs)    -> {cid: neighbours' public keys}          (U1: advertised keys)
    collect_shares(msgs)  -> {cid: ciphertexts addressed to cid}      (U2: shared keys)
    collect_masked(msgs)  -> {cid: survivor set U3}                   (U3: sent masked input)
    collect_signatures(msgs) -> {cid: unmask request + signatures}    (U4: signed U3)
    finish(msgs)          -> SecAggResult                             (U5: answered unmasking)

A client missing from a ``collect_*``/``finish`` dict is treated as dropped at that stage;
a client whose message is malformed is dropped too and listed in :attr:`SecAggServer.rejected`
(named, with the reason): a low-order or duplicated public key, a share reply that repeats a
ciphertext (it cannot open for two recipients), an invalid consistency signature, a wrong
unmask share.

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

Unmasking is robust to a wrong share: a reconstructed self-mask seed is verified against the
owner's commitment and a mask key against the owner's public key; if the first ``t`` shares
fail, each ``t``-subset of the first ``t + 1`` is tried, and then every revealed share (not
only those used) that disagrees with the verified polynomial is named in
:attr:`SecAggServer.rejected` when the evidence is unambiguous (unique decoding: the
polynomial and the verified secret agree with ``t`` more points than it disagrees with);
the sender's own input stays in the sum. More than one wrong share among those tried
aborts. Limit: the shares are checked against the owner's dealt polynomial, not against
per-share commitments, so an owner that deals one holder a share off its polynomial can
get that holder named (it cannot make the round abort while t shares agree).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NoReturn

import numpy as np

from fedsqueeze.compression.bitpack import packed_size, unpack_bits
from fedsqueeze.secagg import crypto, shamir
from fedsqueeze.secagg.client import SHARE_CIPHERTEXT_BYTES, b_commitment, share_position
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
    """

    total: np.ndarray
    included: list[int]
    dropped: list[int]
    rejected: dict[int, str] = field(default_factory=dict)


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


def masked_stage_abort(
    graph: Mapping[int, Sequence[int]], threshold: int, u2: set[int], u3: set[int]
) -> str | None:
    """Why the round must abort once the masked inputs of ``u3`` are in, or ``None``.

    Every included client needs ``t`` live holders of its self-mask shares, every client of
    ``u2`` that dropped before masking but is masked into a neighbour's input needs ``t``
    live neighbours holding its mask key, and the included clients' graph must be
    connected (otherwise unmasking reveals the sum of each component).
    """
    t = threshold
    if len(u3) < t:
        return f"only {len(u3)} clients left after masked input, threshold is {t}"
    for u in sorted(u3):
        holders = closed_alive(graph, u, u3)
        if holders < t:
            return (
                f"client {u} sent its input but only {holders} holders of its "
                f"self-mask shares survive (threshold {t})"
            )
    for v in sorted(u2 - u3):
        holders = sum(w in u3 for w in graph[v])
        if holders and holders < t:
            return (
                f"client {v} dropped after sharing keys but only {holders} of its "
                f"neighbours survive to reveal its mask key (threshold {t})"
            )
    if not is_connected(graph, u3):
        return (
            f"the graph of the {len(u3)} included clients is disconnected; unmasking "
            "would reveal the sum of each component"
        )
    return None


def unmask_stage_abort(
    graph: Mapping[int, Sequence[int]], threshold: int, u2: set[int], u3: set[int], u5: set[int]
) -> str | None:
    """Why unmasking fails when only ``u5`` (of ``u3``) reveal their shares, or ``None``."""
    t = threshold
    if not u5:
        return "no client answered during unmasking"
    for u in sorted(u3):
        holders = closed_alive(graph, u, u5)
        if holders < t:
            return (
                f"only {holders} shares of the self-mask seed of client {u} arrived, "
                f"threshold is {t}"
            )
    for v in sorted(u2 - u3):
        if any(w in u3 for w in graph[v]):
            holders = sum(w in u5 for w in graph[v])
            if holders < t:
                return (
                    f"only {holders} shares of the mask key of dropped client {v} arrived, "
                    f"threshold is {t}"
                )
    return None


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
        self._ciphertexts: dict[tuple[int, int], bytes] = {}
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
            }
            if any(v in self._signed for v in peers):  # forwarded for clients with a roster
                out[u]["peer_sigs"] = [self._signed.get(v, (b"", b""))[1] for v in peers]
        return out

    def collect_shares(self, msgs: Mapping[int, Mapping[str, Any]]) -> dict[int, Message]:
        """Stage 2: route each encrypted share pair to its recipient."""
        self._expect("collect_keys", "collect_shares")
        responders: set[int] = set()
        for cid, msg in self._valid(msgs, self._u1, "share_keys"):
            try:
                recipients = get_id_list(msg, "recipients")
                blobs = get_bytes_list(msg, "ciphertexts", SHARE_CIPHERTEXT_BYTES)
                commit = get_bytes(msg, "b_commit", 32)
                if len(recipients) != len(blobs):
                    raise SecAggProtocolError("recipients and ciphertexts differ in length")
                if set(recipients) != set(self._live_neighbours(cid, self._u1)):
                    raise SecAggProtocolError("shares must go to exactly the live neighbours")
                if len(set(blobs)) != len(blobs):
                    raise SecAggProtocolError(
                        "the same ciphertext for two recipients (it can open for one at most)"
                    )
            except SecAggError as exc:
                self._reject(cid, "share_keys", exc)
                continue
            responders.add(cid)
            self._commits[cid] = commit
            for v, blob in zip(recipients, blobs, strict=True):
                self._ciphertexts[(cid, v)] = blob
        self._u2 = self._prune(responders)
        self._require(self._u2, "after key sharing", pruned=True)
        out: dict[int, Message] = {}
        for v in sorted(self._u2):
            senders = self._live_neighbours(v, self._u2)
            out[v] = {
                "sender_ids": senders,
                "ciphertexts": [self._ciphertexts[(u, v)] for u in senders],
            }
        self._ciphertexts.clear()
        return out

    def collect_masked(self, msgs: Mapping[int, Mapping[str, Any]]) -> dict[int, Message]:
        """Stage 3: sum the masked inputs; send U3 to its clients for the consistency check."""
        self._expect("collect_shares", "collect_masked")
        c = self.config
        size = packed_size(c.vector_len, c.bits)
        acc = np.zeros(c.vector_len, dtype=crypto.word_dtype(c.bits))
        for cid, msg in self._valid(msgs, self._u2, "masked_input"):
            try:
                payload = get_bytes(msg, "masked", size)
            except SecAggError as exc:
                self._reject(cid, "masked_input", exc)
                continue
            acc += unpack_bits(payload, c.bits, c.vector_len).astype(acc.dtype)
            self._u3.add(cid)
        self._acc = acc
        reason = masked_stage_abort(self.graph, c.threshold, self._u2, self._u3)
        if reason is not None:
            self._abort(reason)
        included = sorted(self._u3)
        for u in included:
            peers = self._live_neighbours(u, self._u2)
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
        """Stage 4: reconstruct the secrets, strip the masks, return the sum."""
        self._expect("collect_signatures", "finish")
        c = self.config
        b_shares: dict[int, list[tuple[int, int]]] = {u: [] for u in self._u3}
        s_shares: dict[int, list[tuple[int, int]]] = {v: [] for v in self._u2 - self._u3}
        answered: set[int] = set()
        for cid, msg in self._valid(msgs, set(self._requests), "unmask"):
            survivors, dropped = self._requests[cid]
            try:
                b_ids = get_id_list(msg, "b_ids")
                s_ids = get_id_list(msg, "s_ids")
                if sorted(b_ids) != survivors or sorted(s_ids) != dropped:
                    raise SecAggProtocolError("answer does not match the unmask request")
                b_vals = [shamir.decode_share(s) for s in get_bytes_list(msg, "b_shares")]
                s_vals = [shamir.decode_share(s) for s in get_bytes_list(msg, "s_shares")]
                if len(b_vals) != len(b_ids) or len(s_vals) != len(s_ids):
                    raise SecAggProtocolError("ids and shares differ in length")
            except SecAggError as exc:
                self._reject(cid, "unmask", exc)
                continue
            answered.add(cid)
            x = share_position(cid)
            for u, y in zip(b_ids, b_vals, strict=True):
                b_shares[u].append((x, y))
            for v, y in zip(s_ids, s_vals, strict=True):
                s_shares[v].append((x, y))
        reason = unmask_stage_abort(self.graph, c.threshold, self._u2, self._u3, answered)
        if reason is not None:
            self._abort(reason)
        assert self._acc is not None
        acc, d, bits = self._acc, c.vector_len, c.bits
        for u in sorted(self._u3):
            commit = self._commits[u]
            seed = self._reconstruct(
                b_shares[u],
                f"the self-mask seed of client {u}",
                partial(_matches_commitment, self.session, u, commit),
                "its commitment",
            )
            acc -= crypto.prg_words(crypto.self_mask_key(seed, self.session), d, bits)
        for v in sorted(s_shares):
            masked_with = self._live_neighbours(v, self._u3)
            if not masked_with:
                continue
            s_pk = self._keys[v][1]
            raw = self._reconstruct(
                s_shares[v],
                f"the mask key of dropped client {v}",
                partial(_matches_public_key, s_pk),
                "its public key",
            )
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
        included = sorted(self._u3)
        return SecAggResult(
            total=acc.astype(np.uint64),
            included=included,
            dropped=sorted(set(self.client_ids) - self._u3),
            rejected=dict(self.rejected),
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

    def _reconstruct(
        self,
        points: list[tuple[int, int]],
        what: str,
        verify: Callable[[bytes], bool],
        against: str,
    ) -> bytes:
        """The secret behind ``points``, verified; wrong shares are named in ``rejected``."""
        t = self.config.threshold
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
                # those needed: a wrong share is named even when the first t were right.
                wrong = [
                    x for x, y in ordered if x not in xs and shamir.interpolate_at(xs, ys, x) != y
                ]
                # Name senders only within the unique-decoding radius: the polynomial (with
                # the verified secret as one more point) must agree with t + |wrong| points,
                # so colluding senders of wrong shares cannot get an honest holder named.
                if wrong and len(ordered) - len(wrong) + 1 >= t + len(wrong):
                    for x in wrong:
                        holder = x - 1  # share_position(holder) = holder + 1
                        self.rejected[holder] = f"unmask: returned a wrong share of {what}"
                return secret
        self._abort(
            f"{what} does not match {against} (more than one holder returned a wrong share)"
        )
