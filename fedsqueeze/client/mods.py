"""Client mods: compression glue between Flower messages and the codec core.

``compress_mod`` makes any Flower ClientApp whose train handler replies with full
weights in an ArrayRecord send a compact encoded delta instead::

    app = ClientApp(mods=[compress_mod])

The server says what to do in the train message's ``"config"`` record (``codec``,
``codec-seed``); a compressed downlink arrives in the ``fedsqueeze.downlink`` record and
is turned back into a plain ``"arrays"`` record before the handler runs, so the handler
never knows. Codec state (error-feedback residuals) lives in ``Context.state`` and so
survives between the rounds of the same client, in simulation and in deployment.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedsqueeze import downlink
from fedsqueeze.compression import parse_codec
from fedsqueeze.records import (
    CODEC_META_KEY,
    CODEC_STATE_KEY,
    DOWNLINK_KEY,
    UPDATE_KEY,
    VIEW_KEY,
    VIEW_META_KEY,
    from_record,
    to_record,
)


class ProtocolError(ValueError):
    """A train message or reply does not have the records compression needs."""


def _receive_downlink(msg: Message, context: Context) -> dict[str, np.ndarray]:
    """Rebuild the global model from the downlink record and keep it as this client's view."""
    rec = msg.content[DOWNLINK_KEY]
    codec = parse_codec(str(rec["codec"]))
    base_version = int(rec["base-version"])
    base = None
    if base_version != downlink.FULL:
        held = (
            int(context.state[VIEW_META_KEY]["version"]) if VIEW_META_KEY in context.state else None
        )
        if held != base_version:
            raise ProtocolError(
                f"server sent a delta against model version {base_version}, "
                f"but this client holds {held}"
            )
        base = from_record(context.state[VIEW_KEY])
    arrays = downlink.reconstruct(codec, bytes(rec["payload"]), int(rec["seed"]), base)
    context.state[VIEW_KEY] = to_record(arrays)
    context.state[VIEW_META_KEY] = ConfigRecord({"version": int(rec["version"])})
    return arrays


def _codec_state(context: Context, spec: str) -> dict[str, np.ndarray] | None:
    meta = context.state.config_records.get(CODEC_META_KEY)
    if meta is None or meta.get("codec") != spec or CODEC_STATE_KEY not in context.state:
        return None
    return from_record(context.state[CODEC_STATE_KEY])


def compress_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Decode a compressed downlink and encode the train reply as a compressed delta."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    config = msg.content.config_records.get("config", ConfigRecord())
    spec = str(config.get("codec", "none"))
    received_downlink = DOWNLINK_KEY in msg.content
    if received_downlink:
        reference = _receive_downlink(msg, context)
        content = RecordDict({k: v for k, v in msg.content.items() if k != DOWNLINK_KEY})
        content["arrays"] = to_record(reference)
        msg.content = content
    elif "arrays" in msg.content:
        reference = from_record(msg.content["arrays"])
    else:
        raise ProtocolError("train message has neither 'arrays' nor a compressed downlink")

    reply = call_next(msg, context)
    if reply.has_error() or (spec == "none" and not received_downlink):
        return reply
    if bool(config.get("secagg", False)):
        # Under secure aggregation the secagg mod (outside this one) encodes the update.
        return reply

    if "arrays" not in reply.content:
        raise ProtocolError("compress_mod needs the train reply to hold full weights in 'arrays'")
    local = from_record(reply.content["arrays"])
    if list(local) != list(reference) or any(local[k].shape != reference[k].shape for k in local):
        raise ProtocolError("train reply weights do not match the received model's names/shapes")
    delta = {k: (local[k].astype(np.float32) - reference[k].astype(np.float32)) for k in local}
    codec = parse_codec(spec)
    # The server sent the model, so it knows the layout: send its digest, not the table.
    encoded = codec.encode(
        delta,
        seed=int(config.get("codec-seed", 0)),
        state=_codec_state(context, codec.spec),
        layout="hash",
    )
    if encoded.state:
        context.state[CODEC_STATE_KEY] = to_record(encoded.state)
        context.state[CODEC_META_KEY] = ConfigRecord({"codec": codec.spec})

    content = RecordDict({k: v for k, v in reply.content.items() if k != "arrays"})
    content[UPDATE_KEY] = ConfigRecord({"payload": encoded.payload})
    if received_downlink:
        metrics = content.metric_records.get("metrics", MetricRecord())
        metrics["model-version"] = int(context.state[VIEW_META_KEY]["version"])
        content["metrics"] = metrics
    reply.content = content
    return reply
