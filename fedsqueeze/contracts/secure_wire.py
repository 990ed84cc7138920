"""The SecAgg+ wire contract: how the protocol's stages travel as Flower messages.

Under secure aggregation one training round is five ``TRAIN`` messages per client, each
carrying a :data:`SECAGG_KEY` ConfigRecord that names its stage:

``setup``   the ordinary train message (the app's arrays and config) plus the SecAgg+ setup
            and the round's summable encoding; the reply carries two X25519 public keys and
            the Ed25519 key the client signs the consistency check with (plus a signature
            over its keys when the device has an identity key);
``share``   the neighbours' public keys → encrypted Shamir shares;
``mask``    the shares addressed to this client → the masked input, bit-packed at b bits;
``check``   the survivor set U3 (``included_ids``: every client whose masked input is in the
            sum; each client checks that it is a connected graph of at least t clients) →
            an Ed25519 signature over the session and U3 (Bonawitz et al.'s consistency
            check);
``unmask``  who survived among the client's neighbours, with the neighbours' signatures over
            U3 (the client reveals nothing unless t of them verify over the U3 it signed) →
            the shares the server needs to strip the masks.

The client refuses a ``setup`` whose parameters are below its own floor (node config
``secagg-min-threshold``, ``secagg-min-neighbours``) or for a round at or below one it
already set up; see :mod:`fedsqueeze.client.secure`.

Replies carry the core's fields in a compact wire form (:func:`pack_reply`): one bytes field
per stage, fixed-size items concatenated, and no ids the server already sent in its request
(the server re-attaches them with :func:`unpack_reply`). Shared by ``secagg_mod`` (client)
and ``SecAggStrategy`` (server); imports neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord

from fedsqueeze.secagg.client import SHARE_CIPHERTEXT_BYTES
from fedsqueeze.secagg.crypto import KEY_BYTES, SIGNATURE_BYTES
from fedsqueeze.secagg.shamir import SHARE_BYTES

SECAGG_KEY = "fedsqueeze.secagg"
"""ConfigRecord in every SecAgg+ train message: ``stage``, ``round``, the core's request
fields (prefix :data:`PROTO_PREFIX`), and in ``setup`` the encoding (prefix
:data:`ENCODING_PREFIX`), ``weight-key``, ``feedback`` and ``drop-stage``."""
SETUP, SHARE, MASK, CHECK, UNMASK = "setup", "share", "mask", "check", "unmask"
STAGES = (SETUP, SHARE, MASK, CHECK, UNMASK)
"""Protocol stages in order; a simulated dropout names the one at which the client fails."""
PROTO_PREFIX = "sa."
"""Keys carrying the SecAgg+ core's message fields."""
ENCODING_PREFIX = "enc."
"""Keys carrying the round's summable encoding (``SummableEncoding.to_fields``)."""
REPLY_KEY = "sa"
"""ConfigRecord in a client's stage reply: the core's reply in wire form (:func:`pack_reply`).
Short on purpose: the record name travels in every one of the five replies."""
WIRE_FIELD = "b"
"""The one bytes field of a stage reply."""
COMMIT_BYTES = 32
"""Size of the self-mask seed commitment in a ``share`` reply (SHA-256)."""
SETUP_BYTES = 3 * KEY_BYTES
"""A ``setup`` reply: two X25519 keys and the consistency-check Ed25519 key."""
SIGNED_BYTES = SETUP_BYTES + SIGNATURE_BYTES
"""A signed ``setup`` reply (the device's identity key signed the X25519 keys)."""


def stage_record(
    stage: str, server_round: int, request: Mapping[str, Any], **extra: Any
) -> ConfigRecord:
    """The :data:`SECAGG_KEY` record of one stage message."""
    record = ConfigRecord({"stage": stage, "round": int(server_round)})
    record.update(to_fields(request))
    record.update(extra)
    return record


def to_fields(msg: Mapping[str, Any], prefix: str = PROTO_PREFIX) -> dict[str, Any]:
    return {prefix + k: v for k, v in msg.items()}


def from_fields(record: Mapping[str, Any], prefix: str = PROTO_PREFIX) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in record.items() if k.startswith(prefix)}


class SecureWireError(ValueError):
    """A stage reply does not have the size its stage and the server's request imply."""


def pack_reply(stage: str, out: Mapping[str, Any], request: Mapping[str, Any]) -> bytes:
    """The core's reply for ``stage`` as one byte string (the inverse of :func:`unpack_reply`).

    ``setup``  ``c_pk || s_pk || id_pk``, plus ``sig`` when the device signs its keys;
    ``share``  ``b_commit || ciphertext_1 || ...`` for the recipients in ascending id order,
               which are exactly the ``peer_ids`` of the server's request (the core shares
               among the live neighbours it was sent);
    ``mask``   the bit-packed masked vector;
    ``check``  the 64-byte signature over U3;
    ``unmask`` ``b shares || s shares``, in the ascending order of the request's
               ``survivor_ids`` and ``dropped_ids``.

    Nothing secret is dropped: only ids the server itself chose, and list framing. Each
    ciphertext stays bound to its sender and recipient by AES-GCM's associated data, so a
    server that re-attached the wrong ids would fail to get shares decrypted, not learn more.
    """
    if stage == SETUP:
        signed = bytes(out["sig"]) if "sig" in out else b""
        return bytes(out["c_pk"]) + bytes(out["s_pk"]) + bytes(out["id_pk"]) + signed
    if stage == SHARE:
        if list(out["recipients"]) != sorted(int(v) for v in request["peer_ids"]):
            raise SecureWireError("share recipients differ from the peers the server sent")
        return bytes(out["b_commit"]) + b"".join(bytes(c) for c in out["ciphertexts"])
    if stage == MASK:
        return bytes(out["masked"])
    if stage == CHECK:
        return bytes(out["sig"])
    if stage == UNMASK:
        if list(out["b_ids"]) != sorted(int(v) for v in request["survivor_ids"]) or list(
            out["s_ids"]
        ) != sorted(int(v) for v in request["dropped_ids"]):
            raise SecureWireError("unmask ids differ from the server's request")
        return b"".join(bytes(x) for x in [*out["b_shares"], *out["s_shares"]])
    raise SecureWireError(f"unknown secagg stage {stage!r}")


def _chunks(blob: bytes, size: int, count: int, what: str) -> list[bytes]:
    if len(blob) != size * count:
        raise SecureWireError(f"{what}: expected {count} x {size} bytes, got {len(blob)}")
    return [blob[i * size : (i + 1) * size] for i in range(count)]


def unpack_reply(stage: str, blob: bytes, request: Mapping[str, Any]) -> dict[str, Any]:
    """The core's reply fields from :func:`pack_reply`'s bytes and the request sent for it.

    Raises
    ------
    SecureWireError
        The length does not match what the stage and the request imply.
    """
    if stage == SETUP:
        if len(blob) == SIGNED_BYTES:
            c_pk, s_pk, id_pk = _chunks(blob[:SETUP_BYTES], KEY_BYTES, 3, "public keys")
            return {"c_pk": c_pk, "s_pk": s_pk, "id_pk": id_pk, "sig": blob[SETUP_BYTES:]}
        c_pk, s_pk, id_pk = _chunks(blob, KEY_BYTES, 3, "public keys")
        return {"c_pk": c_pk, "s_pk": s_pk, "id_pk": id_pk}
    if stage == SHARE:
        recipients = sorted(int(v) for v in request["peer_ids"])
        commit, rest = blob[:COMMIT_BYTES], blob[COMMIT_BYTES:]
        if len(commit) != COMMIT_BYTES:
            raise SecureWireError("share reply shorter than the seed commitment")
        cts = _chunks(rest, SHARE_CIPHERTEXT_BYTES, len(recipients), "encrypted shares")
        return {"recipients": recipients, "ciphertexts": cts, "b_commit": commit}
    if stage == MASK:
        return {"masked": bytes(blob)}
    if stage == CHECK:
        return {"sig": _chunks(blob, SIGNATURE_BYTES, 1, "consistency signature")[0]}
    if stage == UNMASK:
        b_ids = sorted(int(v) for v in request["survivor_ids"])
        s_ids = sorted(int(v) for v in request["dropped_ids"])
        shares = _chunks(blob, SHARE_BYTES, len(b_ids) + len(s_ids), "unmask shares")
        return {
            "b_ids": b_ids,
            "b_shares": shares[: len(b_ids)],
            "s_ids": s_ids,
            "s_shares": shares[len(b_ids) :],
        }
    raise SecureWireError(f"unknown secagg stage {stage!r}")
