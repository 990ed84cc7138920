"""The SecAgg+ wire contract: how the protocol's stages travel as Flower messages.

Under secure aggregation one training round is five ``TRAIN`` messages per client, each
carrying a :data:`SECAGG_KEY` ConfigRecord that names its stage:

``setup``   the ordinary train message (the app's arrays and config) plus the SecAgg+ setup
            and the round's summable encoding; the reply carries two X25519 public keys,
            the Ed25519 key the client signs with (plus a signature over its keys when the
            device has an identity key) and, per neighbour, two signed receive keys;
``share``   the neighbours' public and receive keys → signed deals of Shamir shares;
``mask``    the deals addressed to this client → the masked input, bit-packed at b bits,
            and complaints about deals that do not open;
``check``   the survivor set U3 (``included_ids``: every client whose masked input is in the
            sum; each client checks that it is a connected graph of at least t clients) →
            an Ed25519 signature over the session and U3 (Bonawitz et al.'s consistency
            check);
``unmask``  who survived among the client's neighbours, with the neighbours' signatures over
            U3 (the client reveals nothing unless t of them verify over the U3 it signed) →
            the client's own share and the receive keys that open the shares the server
            needs to strip the masks.

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

from fedsqueeze.secagg.crypto import KEY_BYTES, SIGNATURE_BYTES, id_bytes
from fedsqueeze.secagg.deals import COMMIT_BYTES, DEAL_BYTES, KINDS, RECEIVE_BYTES
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
SETUP_BYTES = 3 * KEY_BYTES
"""A ``setup`` reply: two X25519 keys and the consistency-check Ed25519 key."""
SIGNED_BYTES = SETUP_BYTES + SIGNATURE_BYTES
"""A signed ``setup`` reply (the device's identity key signed the X25519 keys)."""
RECEIVE_ITEM_BYTES = RECEIVE_BYTES + SIGNATURE_BYTES
"""Per neighbour in a ``setup`` reply: two receive keys and the signature over them."""


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

    ``setup``  ``c_pk || s_pk || id_pk``, plus ``sig`` when the device signs its keys,
               then ``R_b || R_s || sig`` per neighbour in the order of the setup's
               ``neighbour_ids`` (the lengths 96 + 128 k and 160 + 128 k never coincide);
    ``share``  ``b_commit || deal_1 || ...`` for the recipients in ascending id order,
               which are exactly the ``peer_ids`` of the server's request (the core shares
               among the live neighbours it was sent);
    ``mask``   ``count (2 bytes) || complaints || masked vector`` where a complaint is the
               owner's id (8 bytes), a byte of flags (bit i: kind i revealed) and the
               revealed 32-byte receive keys; no complaints costs the 2-byte count;
    ``check``  the 64-byte signature over U3;
    ``unmask`` ``own b share || b keys || s keys``: the client's own 33-byte share, then the
               32-byte receive keys in the ascending order of the request's other
               ``survivor_ids`` and of its ``dropped_ids``.

    Nothing secret is dropped: only ids the server itself chose, and list framing. Each
    ciphertext stays bound to its sender and recipient by AES-GCM's associated data and the
    owner's signature, so a server that re-attached the wrong ids would fail to get shares
    opened, not learn more.
    """
    if stage == SETUP:
        signed = bytes(out["sig"]) if "sig" in out else b""
        items = b"".join(
            bytes(pair) + bytes(sig)
            for pair, sig in zip(out["recv_pks"], out["recv_sigs"], strict=True)
        )
        return bytes(out["c_pk"]) + bytes(out["s_pk"]) + bytes(out["id_pk"]) + signed + items
    if stage == SHARE:
        if list(out["recipients"]) != sorted(int(v) for v in request["peer_ids"]):
            raise SecureWireError("share recipients differ from the peers the server sent")
        return bytes(out["b_commit"]) + b"".join(bytes(c) for c in out["deals"])
    if stage == MASK:
        ids = list(out.get("complaint_ids", []))
        if len(ids) >= 1 << 16:
            raise SecureWireError("too many complaints")
        head = len(ids).to_bytes(2, "big")
        for i, owner in enumerate(ids):
            keys = [bytes(out[f"complaint_{kind}"][i]) for kind in KINDS]
            flags = sum(1 << j for j, key in enumerate(keys) if key)
            head += id_bytes(int(owner)) + bytes([flags]) + b"".join(keys)
        return head + bytes(out["masked"])
    if stage == CHECK:
        return bytes(out["sig"])
    if stage == UNMASK:
        if list(out["b_ids"]) != sorted(int(v) for v in request["survivor_ids"]) or list(
            out["s_ids"]
        ) != sorted(int(v) for v in request["dropped_ids"]):
            raise SecureWireError("unmask ids differ from the server's request")
        keys = [*out["b_keys"], *out["s_keys"]]
        return bytes(out["own_b"]) + b"".join(bytes(x) for x in keys)
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
        signed = (len(blob) - SIGNED_BYTES) % RECEIVE_ITEM_BYTES == 0 and len(blob) >= SIGNED_BYTES
        head = SIGNED_BYTES if signed else SETUP_BYTES
        c_pk, s_pk, id_pk = _chunks(blob[:SETUP_BYTES], KEY_BYTES, 3, "public keys")
        rest = blob[head:]
        items = _chunks(rest, RECEIVE_ITEM_BYTES, len(rest) // RECEIVE_ITEM_BYTES, "receive keys")
        out = {
            "c_pk": c_pk,
            "s_pk": s_pk,
            "id_pk": id_pk,
            "recv_pks": [x[:RECEIVE_BYTES] for x in items],
            "recv_sigs": [x[RECEIVE_BYTES:] for x in items],
        }
        if signed:
            out["sig"] = blob[SETUP_BYTES:SIGNED_BYTES]
        return out
    if stage == SHARE:
        recipients = sorted(int(v) for v in request["peer_ids"])
        commit, rest = blob[:COMMIT_BYTES], blob[COMMIT_BYTES:]
        if len(commit) != COMMIT_BYTES:
            raise SecureWireError("share reply shorter than the seed commitment")
        dealt = _chunks(rest, DEAL_BYTES, len(recipients), "deals")
        return {"recipients": recipients, "deals": dealt, "b_commit": commit}
    if stage == MASK:
        return _unpack_masked(blob)
    if stage == CHECK:
        return {"sig": _chunks(blob, SIGNATURE_BYTES, 1, "consistency signature")[0]}
    if stage == UNMASK:
        b_ids = sorted(int(v) for v in request["survivor_ids"])
        s_ids = sorted(int(v) for v in request["dropped_ids"])
        own, rest = blob[:SHARE_BYTES], blob[SHARE_BYTES:]
        if len(own) != SHARE_BYTES or not b_ids:
            raise SecureWireError("unmask reply shorter than the client's own share")
        keys = _chunks(rest, KEY_BYTES, len(b_ids) - 1 + len(s_ids), "unmask keys")
        return {
            "b_ids": b_ids,
            "own_b": own,
            "b_keys": keys[: len(b_ids) - 1],
            "s_ids": s_ids,
            "s_keys": keys[len(b_ids) - 1 :],
        }
    raise SecureWireError(f"unknown secagg stage {stage!r}")


def _unpack_masked(blob: bytes) -> dict[str, Any]:
    if len(blob) < 2:
        raise SecureWireError("masked reply shorter than its complaint count")
    count, pos = int.from_bytes(blob[:2], "big"), 2
    out: dict[str, Any] = {"complaint_ids": []} | {f"complaint_{kind}": [] for kind in KINDS}
    for _ in range(count):
        if len(blob) < pos + 9:
            raise SecureWireError("complaint truncated")
        out["complaint_ids"].append(int.from_bytes(blob[pos : pos + 8], "big"))
        flags, pos = blob[pos + 8], pos + 9
        if flags >> len(KINDS):
            raise SecureWireError("unknown complaint flags")
        for j, kind in enumerate(KINDS):
            key = b""
            if flags >> j & 1:
                key, pos = blob[pos : pos + KEY_BYTES], pos + KEY_BYTES
                if len(key) != KEY_BYTES:
                    raise SecureWireError("complaint truncated")
            out[f"complaint_{kind}"].append(key)
    out["masked"] = bytes(blob[pos:])
    return out
