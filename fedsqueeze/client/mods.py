"""Client mods for compression: each one concern, none aware of another.

Any Flower ClientApp whose train handler replies with its full weights in one ArrayRecord
gains compression by adding them (outermost first)::

    app = ClientApp(mods=[downlink_mod, secagg_mod, compress_mod])

- :func:`downlink_mod` turns a compressed global model (``fedsqueeze.downlink`` record, in a
  train or evaluate message) back into the ArrayRecord the handler expects, keeps it as the
  client's view in ``Context.state`` and acknowledges the version it now holds;
- :func:`compress_mod` encodes a train reply as a compact delta when the server asks for it
  (``fedsqueeze.codec`` record); codec state (error-feedback residuals, DGC's velocity)
  lives in ``Context.state`` and so survives between rounds, in simulation and on a
  SuperNode; the record may also ask for DGC's client-side fixes
  (:mod:`fedsqueeze.compression.dgc`: momentum correction, masking, clipping) and change the
  density from round to round (warm-up) without losing the residual;
- ``secagg_mod`` (:mod:`fedsqueeze.client.secure`) runs the SecAgg+ stages.

Each mod reads only its own record, so each is a no-op unless the server's message asks for
it. A mod whose precondition fails replies with a Flower ``Error`` (code
``MOD_FAILED_PRECONDITION``), as Flower's own mods do, instead of raising.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from fedsqueeze import downlink
from fedsqueeze.compression import Codec, parse_codec
from fedsqueeze.compression.dgc import DGCOptions, encode_update
from fedsqueeze.compression.errors import CodecError
from fedsqueeze.contracts.records import (
    CODEC_KEY,
    CODEC_META_KEY,
    CODEC_STATE_KEY,
    DOWNLINK_ACK_KEY,
    DOWNLINK_KEY,
    UPDATE_KEY,
    VIEW_KEY,
    VIEW_META_KEY,
    as_bytes,
    as_int,
    from_record,
    to_record,
    without,
)
from fedsqueeze.contracts.streams import rounding_rng

log = logging.getLogger(__name__)


class ModPreconditionError(ValueError):
    """A message or reply lacks what a mod needs; turned into a Flower ``Error`` reply."""


def failed_precondition(msg: Message, mod: str, reason: str) -> Message:
    """An ``Error`` reply to ``msg`` naming the mod and why it could not run."""
    log.error("%s: %s", mod, reason)
    return Message(
        Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"{mod}: {reason}"), reply_to=msg
    )


def single_arrays(content: RecordDict, what: str) -> tuple[str, ArrayRecord]:
    """The only ArrayRecord of ``content`` (Flower's convention for model weights)."""
    records = content.array_records
    if len(records) != 1:
        raise ModPreconditionError(f"{what} must hold exactly one ArrayRecord, has {len(records)}")
    return next(iter(records.items()))


# ---- downlink ---------------------------------------------------------------------------


def _rebuild(record: ConfigRecord, context: Context) -> tuple[dict[str, np.ndarray], int]:
    """The global model of a downlink record, and its version; keeps it as the client's view."""
    codec = parse_codec(str(record["codec"]))
    base_version = as_int(record["base-version"], "base-version")
    base = None
    if base_version != downlink.FULL:
        meta = context.state.config_records.get(VIEW_META_KEY)
        held = as_int(meta["version"]) if meta is not None else None
        if held != base_version:
            raise ModPreconditionError(
                f"server sent a delta against model version {base_version}, "
                f"but this client holds {held}"
            )
        base = from_record(context.state.array_records[VIEW_KEY])
    payload, seed = as_bytes(record["payload"], "payload"), as_int(record["seed"], "seed")
    arrays = downlink.reconstruct(codec, payload, seed, base)
    version = as_int(record["version"], "version")
    context.state[VIEW_KEY] = to_record(arrays)
    context.state[VIEW_META_KEY] = ConfigRecord({"version": version})
    return arrays, version


def downlink_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Decode a compressed global model before the handler runs; acknowledge its version."""
    if DOWNLINK_KEY not in msg.content.config_records:
        return call_next(msg, context)
    record = msg.content.config_records[DOWNLINK_KEY]
    try:
        arrays, version = _rebuild(record, context)
    except (ModPreconditionError, CodecError, KeyError, ValueError, TypeError) as err:
        return failed_precondition(msg, "downlink_mod", str(err))
    content = without(msg.content, DOWNLINK_KEY)
    content[str(record.get("arrays", "arrays"))] = to_record(arrays)
    msg.content = content
    reply = call_next(msg, context)
    if not reply.has_error():
        reply.content[DOWNLINK_ACK_KEY] = ConfigRecord({"version": version})
    return reply


# ---- uplink ------------------------------------------------------------------------------


def _state_kind(codec: Codec) -> str:
    """What the client's codec state is tied to: the feedback stage, not the whole spec, so
    a residual survives the server changing the density from round to round (warm-up)."""
    return codec.feedback.spec if codec.feedback is not None else "none"


def _codec_state(context: Context, codec: Codec) -> dict[str, np.ndarray] | None:
    meta = context.state.config_records.get(CODEC_META_KEY)
    if meta is None or CODEC_STATE_KEY not in context.state:
        return None
    if meta.get("feedback") != _state_kind(codec):
        return None
    return from_record(context.state.array_records[CODEC_STATE_KEY])


def _encode_reply(
    instructions: ConfigRecord,
    reference: dict[str, np.ndarray],
    reply: Message,
    context: Context,
) -> RecordDict:
    """The reply's content with its weights replaced by the encoded delta."""
    codec = parse_codec(str(instructions["codec"]))
    name, received = single_arrays(reply.content, "the train reply")
    local = from_record(received)
    if list(local) != list(reference) or any(local[k].shape != reference[k].shape for k in local):
        raise ModPreconditionError("reply weights do not match the received model's names/shapes")
    delta = {k: local[k].astype(np.float32) - reference[k].astype(np.float32) for k in local}
    # The server sent the model, so it knows the layout: send its digest, not the table.
    # DGC's fixes (momentum correction, masking, clipping) act when the server asks for them.
    seed = as_int(instructions["codec-seed"], "codec-seed")
    # Rounding is reproducible (the round's seed and this client's partition, or its node id
    # in an app without partitions): nothing secret depends on it on this path.
    client = context.node_config.get("partition-id", context.node_id)
    encoded = encode_update(
        codec,
        delta,
        DGCOptions.from_record(instructions),
        seed=seed,
        state=_codec_state(context, codec),
        rng=rounding_rng(seed, as_int(client, "partition-id")),
        layout="hash",
    )
    if encoded.state:
        context.state[CODEC_STATE_KEY] = to_record(encoded.state)
        context.state[CODEC_META_KEY] = ConfigRecord(
            {"codec": codec.spec, "feedback": _state_kind(codec)}
        )
    content = without(reply.content, name)
    content[UPDATE_KEY] = ConfigRecord({"payload": encoded.payload})
    return content


def compress_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Encode the train reply as a compressed delta when the server asks (``fedsqueeze.codec``)."""
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or CODEC_KEY not in msg.content.config_records
    ):
        return call_next(msg, context)
    instructions = msg.content.config_records[CODEC_KEY]
    try:
        reference = from_record(single_arrays(msg.content, "the train message")[1])
    except ModPreconditionError as err:
        return failed_precondition(msg, "compress_mod", str(err))
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    try:
        reply.content = _encode_reply(instructions, reference, reply, context)
    except (ModPreconditionError, CodecError, KeyError, ValueError, TypeError) as err:
        return failed_precondition(msg, "compress_mod", str(err))
    return reply
