"""Cryptographic building blocks, all from the ``cryptography`` package.

- X25519 key agreement + HKDF-SHA256 for pairwise keys (share encryption, pairwise masks);
- AES-256-GCM for the encrypted share pairs, with associated data binding the session,
  sender and recipient so a ciphertext only opens in the exact slot it was made for;
- AES-256-CTR keystream as the mask generator (PRG), read as little-endian words with
  numpy so masking costs no Python loop per coordinate;
- Ed25519 device identity keys signing a client's key advertisement (session, id, both
  public keys), checked by its peers against a roster of trusted identity keys, and the
  survivor set of the consistency check (Bonawitz et al. 2017, round 3).

Every derived key is salted with the session id (a hash of the round's public
parameters, see :func:`fedsqueeze.secagg.config.session_id`), so keys and masks never
repeat across rounds even if a client's key pair did.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedsqueeze.secagg.errors import SecAggDecryptionError, SecAggProtocolError

KEY_BYTES = 32
NONCE_BYTES = 12
SIGNATURE_BYTES = 64
_TAG = b"fedsqueeze/secagg/v1/"
_ZERO_IV = bytes(16)


def id_bytes(client_id: int) -> bytes:
    """Canonical 8-byte encoding of a client id (Flower node ids are uint64)."""
    return client_id.to_bytes(8, "big")


def generate_private_key(entropy: Callable[[int], bytes]) -> X25519PrivateKey:
    """X25519 private key from 32 bytes of ``entropy`` (the library clamps the scalar)."""
    return X25519PrivateKey.from_private_bytes(entropy(KEY_BYTES))


def load_private_key(data: bytes) -> X25519PrivateKey:
    """Parse a raw 32-byte X25519 private key."""
    if len(data) != KEY_BYTES:
        raise SecAggProtocolError(f"an X25519 private key is {KEY_BYTES} raw bytes")
    return X25519PrivateKey.from_private_bytes(data)


def private_key_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def public_key_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key(data: bytes) -> X25519PublicKey:
    """Parse a raw X25519 public key, raising :class:`SecAggProtocolError` if malformed."""
    if not isinstance(data, bytes) or len(data) != KEY_BYTES:
        raise SecAggProtocolError(f"an X25519 public key is {KEY_BYTES} raw bytes")
    return X25519PublicKey.from_public_bytes(data)


def _agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 shared secret; a malformed or low-order peer key is a protocol error."""
    try:
        return private.exchange(load_public_key(peer_public))
    except ValueError as exc:  # e.g. a low-order point giving an all-zero secret
        if isinstance(exc, SecAggProtocolError):
            raise
        raise SecAggProtocolError(f"X25519 key agreement failed: {exc}") from exc


def pairwise_key(
    private: X25519PrivateKey,
    peer_public: bytes,
    session: bytes,
    purpose: bytes,
    id_a: int,
    id_b: int,
) -> bytes:
    """32-byte key shared by clients ``id_a`` and ``id_b`` for ``purpose`` in ``session``.

    Symmetric in the two ids, so both ends derive the same key.
    """
    lo, hi = sorted((id_a, id_b))
    return directed_key(private, peer_public, session, purpose, lo, hi)


def directed_key(
    private: X25519PrivateKey,
    peer_public: bytes,
    session: bytes,
    purpose: bytes,
    sender: int,
    recipient: int,
) -> bytes:
    """32-byte key for one direction, ``sender -> recipient``, and one ``purpose``.

    Unlike :func:`pairwise_key` the ids are not sorted: the key of ``u -> v`` differs from
    that of ``v -> u``, so revealing one opens nothing sent the other way.
    """
    shared = _agree(private, peer_public)
    info = _TAG + purpose + id_bytes(sender) + id_bytes(recipient)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session, info=info).derive(shared)


def share_associated_data(session: bytes, sender: int, recipient: int) -> bytes:
    return _TAG + b"share" + session + id_bytes(sender) + id_bytes(recipient)


def encrypt_share(
    key: bytes,
    plaintext: bytes,
    session: bytes,
    sender: int,
    recipient: int,
    entropy: Callable[[int], bytes],
) -> bytes:
    """AES-GCM encryption; returns ``nonce || ciphertext || tag``."""
    nonce = entropy(NONCE_BYTES)
    ad = share_associated_data(session, sender, recipient)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def decrypt_share(key: bytes, blob: bytes, session: bytes, sender: int, recipient: int) -> bytes:
    """Inverse of :func:`encrypt_share`; raises :class:`SecAggDecryptionError` on any mismatch."""
    if not isinstance(blob, bytes) or len(blob) < NONCE_BYTES + 16:
        raise SecAggDecryptionError(f"ciphertext from client {sender} is truncated")
    ad = share_associated_data(session, sender, recipient)
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], ad)
    except InvalidTag as exc:
        raise SecAggDecryptionError(
            f"share ciphertext from client {sender} to client {recipient} failed "
            "authentication (tampered, replayed from another round, or misaddressed)"
        ) from exc


def self_mask_key(seed: bytes, session: bytes) -> bytes:
    """AES key of the self mask PRG(b_u), bound to the session."""
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session, info=_TAG + b"self-mask"
    ).derive(seed)


def word_dtype(bits: int) -> np.dtype:
    """Accumulator dtype: 32-bit words suffice for b <= 32 and halve keystream and memory."""
    return np.dtype(np.uint32) if bits <= 32 else np.dtype(np.uint64)


def prg_words(key: bytes, count: int, bits: int) -> np.ndarray:
    """``count`` uniform words (``word_dtype(bits)``) from an AES-256-CTR keystream.

    The low ``bits`` bits of each word are uniform over Z_{2^b}; callers add words in the
    word ring (mod 2^32 or 2^64) and reduce mod 2^b once at the end, which is exact because
    2^b divides the word modulus.
    """
    if len(key) != KEY_BYTES:
        raise SecAggProtocolError(f"PRG key must be {KEY_BYTES} bytes")
    dtype = word_dtype(bits)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor()
    stream = encryptor.update(bytes(count * dtype.itemsize))
    return np.frombuffer(stream, dtype=dtype.newbyteorder("<"))


# --- device identity (Ed25519) ------------------------------------------------------------


def load_identity_key(data: bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from 32 raw bytes or an unencrypted PEM (PKCS#8) file's bytes."""
    try:
        if len(data) == KEY_BYTES:
            return Ed25519PrivateKey.from_private_bytes(data)
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise SecAggProtocolError(f"not an Ed25519 private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SecAggProtocolError("the identity key must be an Ed25519 key")
    return key


def identity_public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _signed(label: bytes, session: bytes, *parts: bytes) -> bytes:
    """The byte string an Ed25519 signature covers: domain tag, purpose, session, parts.

    Every part has a fixed length (ids, keys) or is a length-prefixed blob, so two
    different messages never encode to the same string.
    """
    return _TAG + label + session + b"".join(parts)


def sign(key: Ed25519PrivateKey, label: bytes, session: bytes, *parts: bytes) -> bytes:
    """Ed25519 signature over ``(label, session, parts)`` (see :func:`_signed`)."""
    return key.sign(_signed(label, session, *parts))


def verify(public: bytes, signature: bytes, label: bytes, session: bytes, *parts: bytes) -> bool:
    """Whether ``signature`` is ``public``'s over ``(label, session, parts)``."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(
            signature, _signed(label, session, *parts)
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def sign_advertisement(
    identity: Ed25519PrivateKey, session: bytes, client_id: int, c_pk: bytes, s_pk: bytes
) -> bytes:
    """Ed25519 signature binding both public keys to the client id and the session."""
    return sign(identity, b"advertise", session, id_bytes(client_id), c_pk, s_pk)


def verify_advertisement(
    identity_pk: bytes, signature: bytes, session: bytes, client_id: int, c_pk: bytes, s_pk: bytes
) -> bool:
    return verify(identity_pk, signature, b"advertise", session, id_bytes(client_id), c_pk, s_pk)


def generate_signing_key(entropy: Callable[[int], bytes]) -> Ed25519PrivateKey:
    """A per-round Ed25519 key from ``entropy`` (used when the device has no identity key)."""
    return Ed25519PrivateKey.from_private_bytes(entropy(KEY_BYTES))


def signing_key_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _survivor_ids(included: list[int]) -> bytes:
    return b"".join(id_bytes(v) for v in sorted(included))


def sign_survivors(key: Ed25519PrivateKey, session: bytes, included: list[int]) -> bytes:
    """Signature over the survivor set U3 of the session (the consistency-check message)."""
    return sign(key, b"consistency", session, _survivor_ids(included))


def verify_survivors(
    signer_pk: bytes, signature: bytes, session: bytes, included: list[int]
) -> bool:
    return verify(signer_pk, signature, b"consistency", session, _survivor_ids(included))


def is_low_order(public: bytes) -> bool:
    """Whether an X25519 public key is a low-order point (every key agreement gives zero).

    Checked by one key agreement with a throw-away key: ``cryptography`` refuses an all-zero
    shared secret, which a clamped scalar produces exactly for the low-order points.
    """
    try:
        X25519PrivateKey.generate().exchange(load_public_key(public))
    except ValueError:
        return True
    return False
