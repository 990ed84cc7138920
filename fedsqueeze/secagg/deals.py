"""Verifiable share deals: a bad share convicts the client that dealt it, never its holder.

Each client ``u`` (the *owner*) Shamir-shares two secrets among its neighbours ``v`` (the
*holders*): its self-mask seed ``b_u`` and its mask key ``s_u``. The *deal* ``u`` sends
``v`` through the server is::

    C_b = AES-GCM(K_b, b-share)    C_s = AES-GCM(K_s, s-share)
    sig_u(session, u, v, C_b, C_s, H_b)
    K_kind = HKDF(X25519(c_u, R_kind), session, "deal-<kind>", u -> v)

where ``R_b``, ``R_s`` are two fresh X25519 *receive keys* that ``v`` made for ``u`` alone
and signed, ``sig_v(session, v, u, R_b, R_s)``, in its key advertisement; ``c_u`` is the
owner's encryption key, and ``H_b`` its commitment to ``b_u`` (the server checks the
reconstructed seed against it, so it is signed in every deal: a server cannot convict an
honest owner with a commitment of its own making). Signatures use each client's
consistency-check key (its device identity key under a roster). Everything is
``cryptography``: X25519, HKDF-SHA256, AES-256-GCM, Ed25519.

How a deal is judged:

- When the deal arrives (mask stage) ``v`` checks ``sig_u``: a deal the server forged or
  altered is refused (the holder stops; it does not complain about ``u``).
- If a ciphertext does not open, or holds no field element, ``v`` *complains* by revealing
  the private receive key ``r`` of that kind only. Anyone with the signed ``R`` and the
  signed deal checks that ``r`` is ``R``'s private key, recomputes ``K`` from ``r`` and
  ``u``'s public ``c_u`` and tries the ciphertext: it does not open, so ``u`` dealt garbage;
  it opens, so the complaint is false and ``v`` is the cheater. A complaint convicts exactly
  one party (:func:`attest`).
- At unmasking ``v`` reveals, instead of a share, the receive key of the ciphertext that
  carries it and the server opens the deal itself (:func:`open_revealed`). The share is then
  exactly what ``u`` signed: one off ``u``'s polynomial convicts ``u``, and a holder cannot
  change the share it reveals (a key that is not its advertised ``R`` gets its reply
  rejected).

What a curious or active server learns (threat model). A receive key is fresh randomness
used in one key agreement, with one owner, for one kind of share, and the owner encrypts
exactly one ciphertext under it; ``K`` is bound to the session and the direction. So
revealing ``r`` reveals the one share it protects and nothing else — the share the holder
would otherwise have revealed in the clear (a ``b`` share of a survivor, an ``s`` share of
a client that dropped). Keys are per direction and per kind, so the holder's rule "never
reveal both shares of one peer" holds for keys exactly as for shares; and a key for
``u -> v`` opens nothing ``v`` sent ``u``. A complaint reveals the key of a ciphertext that
did not open under it, i.e. no share; the other kind's key stays secret. An honest owner's
ciphertexts always open, and the server cannot sign a deal in its name, so the server cannot
make an honest holder complain about an honest owner, nor present evidence against one: with
a roster the signing keys are device identity keys and :func:`attest` is evidence a third
party can check. Without a roster the server could substitute signing and receive keys as
it could substitute the X25519 keys (the server is then trusted not to substitute keys, as
before). Blame of a *holder* (a revealed key that is not its ``R``) is the server's word, as
for any malformed message: a holder's unmask reply is not signed.

Cost per client and direction: ``k x 128`` bytes of receive keys and signatures in the key
advertisement, and a deal of 186 bytes per neighbour (two 61-byte ciphertexts and a
signature) against 94 bytes for one ciphertext of both shares before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedsqueeze.secagg import crypto, shamir
from fedsqueeze.secagg.errors import SecAggDecryptionError, SecAggProtocolError

KINDS = ("b", "s")
"""The two shared secrets: ``b`` the self-mask seed, ``s`` the mask key."""
RECEIVE_BYTES = 2 * crypto.KEY_BYTES
"""A holder's receive keys for one owner: ``R_b || R_s``."""
SEALED_BYTES = crypto.NONCE_BYTES + shamir.SHARE_BYTES + 16
"""One encrypted share: nonce, 33-byte share, GCM tag."""
DEAL_BYTES = 2 * SEALED_BYTES + crypto.SIGNATURE_BYTES
"""A deal: ``C_b || C_s || sig_owner``."""
COMMIT_BYTES = 32
"""Size of the self-mask seed commitment ``H_b`` (SHA-256)."""


def b_commitment(session: bytes, client_id: int, b_seed: bytes) -> bytes:
    """Hash commitment to the self-mask seed, so the server can verify its reconstruction."""
    return hashlib.sha256(
        b"fedsqueeze/secagg/v1/b-commit" + session + crypto.id_bytes(client_id) + b_seed
    ).digest()


def _kind_index(kind: str) -> int:
    if kind not in KINDS:
        raise SecAggProtocolError(f"unknown share kind {kind!r}")
    return KINDS.index(kind)


def receive_keys(
    sign_key: Ed25519PrivateKey,
    session: bytes,
    holder: int,
    owner: int,
    entropy: Callable[[int], bytes],
) -> tuple[list[bytes], bytes, bytes]:
    """``([r_b, r_s], R_b || R_s, sig)``: the holder's fresh receive keys for one owner."""
    private = [crypto.generate_private_key(entropy) for _ in KINDS]
    pair = b"".join(crypto.public_key_bytes(r) for r in private)
    sig = crypto.sign(
        sign_key, b"receive", session, crypto.id_bytes(holder), crypto.id_bytes(owner), pair
    )
    return [crypto.private_key_bytes(r) for r in private], pair, sig


def verify_receive_keys(
    holder_pk: bytes, sig: bytes, session: bytes, holder: int, owner: int, pair: bytes
) -> bool:
    """Whether ``pair`` (``R_b || R_s``) is signed by the holder for this owner and session."""
    return len(pair) == RECEIVE_BYTES and crypto.verify(
        holder_pk, sig, b"receive", session, crypto.id_bytes(holder), crypto.id_bytes(owner), pair
    )


def _key(
    private: X25519PrivateKey, public: bytes, session: bytes, kind: str, owner: int, holder: int
) -> bytes:
    return crypto.directed_key(private, public, session, b"deal-" + kind.encode(), owner, holder)


def make_deal(
    c_key: X25519PrivateKey,
    sign_key: Ed25519PrivateKey,
    session: bytes,
    owner: int,
    holder: int,
    pair: bytes,
    shares: tuple[int, int],
    b_commit: bytes,
    entropy: Callable[[int], bytes],
) -> bytes:
    """The owner's deal for one holder: both shares sealed separately, then signed with the
    owner's commitment to its self-mask seed."""
    sealed = b""
    for i, kind in enumerate(KINDS):
        public = pair[i * crypto.KEY_BYTES : (i + 1) * crypto.KEY_BYTES]
        key = _key(c_key, public, session, kind, owner, holder)
        plain = shamir.encode_share(shares[i])
        sealed += crypto.encrypt_share(key, plain, session, owner, holder, entropy)
    parts = deal_parts(owner, holder, sealed, b_commit)
    return sealed + crypto.sign(sign_key, b"deal", session, *parts)


def deal_parts(
    owner: int, holder: int, sealed: bytes, b_commit: bytes
) -> tuple[bytes, bytes, bytes, bytes]:
    """What the owner signs in a deal, after the domain tag and the session."""
    return crypto.id_bytes(owner), crypto.id_bytes(holder), sealed, b_commit


def verify_deal(
    owner_pk: bytes, session: bytes, owner: int, holder: int, deal: bytes, b_commit: bytes
) -> bool:
    """Whether ``deal`` is well-sized and signed by the owner for this holder, session and
    self-mask commitment."""
    if not isinstance(deal, bytes) or len(deal) != DEAL_BYTES:
        return False
    if not isinstance(b_commit, bytes):
        return False
    sealed, sig = deal[: 2 * SEALED_BYTES], deal[2 * SEALED_BYTES :]
    parts = deal_parts(owner, holder, sealed, b_commit)
    return crypto.verify(owner_pk, sig, b"deal", session, *parts)


def open_share(
    private: X25519PrivateKey,
    public: bytes,
    session: bytes,
    kind: str,
    owner: int,
    holder: int,
    deal: bytes,
) -> int:
    """The share of ``kind`` in ``deal``, opened with one side of the key agreement.

    The holder passes its receive key and the owner's ``c_pk``; the server passes a
    revealed receive key and the same ``c_pk``. Raises :class:`SecAggDecryptionError` if
    the ciphertext does not open or holds no field element (the owner dealt garbage, if the
    deal's signature and the key were checked).
    """
    i = _kind_index(kind)
    sealed = deal[i * SEALED_BYTES : (i + 1) * SEALED_BYTES]
    key = _key(private, public, session, kind, owner, holder)
    plain = crypto.decrypt_share(key, sealed, session, owner, holder)
    try:
        return shamir.decode_share(plain)
    except SecAggProtocolError as exc:
        raise SecAggDecryptionError(
            f"the {kind} share client {owner} dealt client {holder} is not a field element"
        ) from exc


def check_revealed(revealed: bytes, pair: bytes, kind: str) -> X25519PrivateKey:
    """The revealed receive key of ``kind`` if it is the private key of the advertised one."""
    i = _kind_index(kind)
    key = crypto.load_private_key(revealed)
    if crypto.public_key_bytes(key) != pair[i * crypto.KEY_BYTES : (i + 1) * crypto.KEY_BYTES]:
        raise SecAggProtocolError(f"revealed {kind} key is not the advertised receive key")
    return key


def open_revealed(
    revealed: bytes,
    pair: bytes,
    owner_c_pk: bytes,
    session: bytes,
    kind: str,
    owner: int,
    holder: int,
    deal: bytes,
) -> int | None:
    """The share the owner dealt, from the holder's revealed key; ``None`` if it is garbage.

    Raises :class:`SecAggProtocolError` when ``revealed`` is not the private key of the
    holder's advertised receive key (the holder's fault). Signatures are not checked here:
    the server checked them when the keys and the deal arrived (:func:`attest` checks all).
    """
    key = check_revealed(revealed, pair, kind)
    try:
        return open_share(key, owner_c_pk, session, kind, owner, holder, deal)
    except SecAggDecryptionError:
        return None


@dataclass(frozen=True)
class Evidence:
    """Everything a third party needs to check what ``owner`` dealt ``holder`` (:func:`attest`)."""

    session: bytes
    owner: int
    holder: int
    kind: str
    owner_c_pk: bytes
    owner_sign_pk: bytes
    holder_sign_pk: bytes
    receive_pair: bytes
    receive_sig: bytes
    deal: bytes
    b_commit: bytes
    revealed: bytes


def attest(e: Evidence) -> int | None:
    """The share ``e.owner`` dealt ``e.holder``; ``None``: it dealt one that does not open.

    Raises :class:`SecAggProtocolError` when the evidence is not genuine: the deal is not
    signed by the owner (forged or altered), the receive keys are not signed by the holder,
    or the revealed key is not the private key of the holder's advertised one.
    """
    if not verify_deal(e.owner_sign_pk, e.session, e.owner, e.holder, e.deal, e.b_commit):
        raise SecAggProtocolError(f"the deal is not signed by its owner, client {e.owner}")
    if not verify_receive_keys(
        e.holder_sign_pk, e.receive_sig, e.session, e.holder, e.owner, e.receive_pair
    ):
        raise SecAggProtocolError(f"the receive keys are not signed by client {e.holder}")
    return open_revealed(
        e.revealed, e.receive_pair, e.owner_c_pk, e.session, e.kind, e.owner, e.holder, e.deal
    )
