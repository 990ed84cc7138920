"""Client side of secure aggregation: ``secagg_mod``.

Runs the client half of SecAgg+ around any ClientApp's train handler when the server's
message carries a ``fedsqueeze.secagg`` record (see :mod:`fedsqueeze.contracts.secure_wire`
for the four stages). In ``setup`` the mod lets the handler train, turns ``local - start``
into an integer vector with the round's summable encoding
(:mod:`fedsqueeze.contracts.summable`: clipping, weighting, random-k, distributed-DP noise —
whatever the server described), keeps it in ``Context.state`` and replies with its public
keys; the later stages need no handler at all.

With ``feedback`` set (a codec spec ending in ``+ef``) the client keeps what it did not
send in its own state (:func:`~fedsqueeze.contracts.summable.encode_with_feedback`); the
residual is committed only when the masked input leaves (stage ``mask``), so a client that
fails before that keeps all of ``delta + residual`` for its next round.

The protocol state (the SecAgg+ client state machine, its private keys, the encoded input)
lives in ``Context.state`` between stages, so it survives in simulation and on a SuperNode
alike; it never leaves the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedsqueeze.client.mods import ModPreconditionError, failed_precondition, single_arrays
from fedsqueeze.compression.stages import ErrorFeedback
from fedsqueeze.contracts.records import (
    CODEC_META_KEY,
    CODEC_STATE_KEY,
    flatten,
    from_record,
    single_metrics,
    to_record,
)
from fedsqueeze.contracts.secure_wire import (
    ENCODING_PREFIX,
    MASK,
    REPLY_KEY,
    SECAGG_KEY,
    SETUP,
    SHARE,
    UNMASK,
    WIRE_FIELD,
    from_fields,
    pack_reply,
    to_fields,
)
from fedsqueeze.contracts.summable import (
    EncodingError,
    SummableEncoding,
    encode_with_feedback,
    encoding_from_fields,
)
from fedsqueeze.secagg import SecAggClient, SecAggError
from fedsqueeze.secagg.field import to_field

STATE_KEY = "fedsqueeze.secagg-state"
"""Client ``Context.state`` ConfigRecord: the protocol state between stages."""
EF_STATE_KEY = ErrorFeedback.state_key
"""Key of the residual (flat float32) in the ``CODEC_STATE_KEY`` ArrayRecord."""
GLUE_PREFIX = "glue."
"""Keys of the mod's own per-round values in the :data:`STATE_KEY` record; every other key
is the core's :meth:`SecAggClient.to_state`."""


class SimulatedDropout(RuntimeError):
    """Raised by a client told (``drop-stage``) to fail at this protocol stage."""


def _save(client: SecAggClient, extra: Mapping[str, Any]) -> ConfigRecord:
    rec: dict[str, Any] = dict(client.to_state())
    rec.update(to_fields(extra, GLUE_PREFIX))
    return ConfigRecord(rec)


def _load(record: ConfigRecord, client_id: int) -> tuple[SecAggClient, dict[str, Any]]:
    state = {k: v for k, v in record.items() if not k.startswith(GLUE_PREFIX)}
    client = SecAggClient.from_state(state)
    if client.client_id != client_id:
        raise ModPreconditionError(
            f"saved secagg state belongs to node {client.client_id}, not this node {client_id}"
        )
    return client, from_fields(record, GLUE_PREFIX)


def load_residual(context: Context, spec: str, d: int) -> np.ndarray:
    """The stored residual of codec ``spec`` (zeros if none, another codec's, or resized)."""
    meta = context.state.config_records.get(CODEC_META_KEY)
    if meta is None or meta.get("codec") != spec or CODEC_STATE_KEY not in context.state:
        return np.zeros(d, dtype=np.float32)
    stored = from_record(context.state[CODEC_STATE_KEY]).get(EF_STATE_KEY)
    if stored is None or stored.shape != (d,):
        return np.zeros(d, dtype=np.float32)
    return stored.astype(np.float32)


def store_residual(context: Context, spec: str, residual: np.ndarray) -> None:
    context.state[CODEC_STATE_KEY] = to_record({EF_STATE_KEY: residual.astype(np.float32)})
    context.state[CODEC_META_KEY] = ConfigRecord({"codec": spec})


def _maybe_drop(glue: Mapping[str, Any], stage: str) -> None:
    if str(glue.get("drop-stage", "")) == stage:
        raise SimulatedDropout(f"simulate-dropout: this client fails at stage {stage!r}")


def _reply(
    msg: Message,
    stage: str,
    out: Mapping[str, Any],
    request: Mapping[str, Any],
    metrics: tuple[str, MetricRecord] | None = None,
) -> Message:
    content = RecordDict({REPLY_KEY: ConfigRecord({WIRE_FIELD: pack_reply(stage, out, request)})})
    if metrics is not None:
        content[metrics[0]] = metrics[1]
    return Message(content=content, reply_to=msg)


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the client side of SecAgg+ around the ClientApp's train handler (module doc)."""
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or SECAGG_KEY not in msg.content.config_records
    ):
        return call_next(msg, context)
    record = msg.content.config_records[SECAGG_KEY]
    stage = str(record.get("stage", ""))
    try:
        if stage == SETUP:
            return _setup_stage(msg, context, call_next, record)
        return _later_stage(msg, context, record, stage)
    except (ModPreconditionError, EncodingError, SecAggError, KeyError, TypeError) as err:
        return failed_precondition(msg, "secagg_mod", f"stage {stage!r}: {err}")


def _later_stage(msg: Message, context: Context, record: ConfigRecord, stage: str) -> Message:
    if STATE_KEY not in context.state:
        raise ModPreconditionError("arrived before this client's setup")
    client, glue = _load(context.state[STATE_KEY], int(context.node_id))
    if int(glue["round"]) != int(record.get("round", -1)):
        raise ModPreconditionError("for another round than this client's setup")
    _maybe_drop(glue, stage)
    request = from_fields(record)
    if stage == SHARE:
        out = client.share_keys(request)
    elif stage == MASK:
        x = np.frombuffer(bytes(glue["input"]), dtype="<u8").astype(np.uint64)
        out = client.masked_input(request, x)
        if "ef-spec" in glue:
            # The masked input is leaving: from now on it is in the sum (or the round aborts
            # for everyone), so the residual becomes what this input leaves unsent.
            pending = np.frombuffer(bytes(glue["ef-pending"]), dtype="<f4")
            store_residual(context, str(glue["ef-spec"]), pending)
        glue = {k: v for k, v in glue.items() if k not in ("input", "ef-pending")}
    elif stage == UNMASK:
        out = client.unmask(request)
    else:
        raise ModPreconditionError("unknown stage")
    context.state[STATE_KEY] = _save(client, glue)
    return _reply(msg, stage, out, request)


def _encode_input(
    encoding: SummableEncoding,
    delta: np.ndarray,
    weight: int,
    feedback: str,
    context: Context,
    glue: dict[str, Any],
) -> np.ndarray:
    """The field vector this client masks; with ``feedback`` also its pending residual."""
    rng = np.random.default_rng()  # private: rounding and noise must not be predictable
    if not feedback:
        ints = encoding.encode(delta, weight, rng)
    else:
        residual = load_residual(context, feedback, delta.size)
        ints, pending = encode_with_feedback(encoding, delta, residual, weight, rng)
        store_residual(context, feedback, delta + residual)
        glue["ef-spec"] = feedback
        glue["ef-pending"] = pending.astype("<f4").tobytes()
    return to_field(ints, encoding.bits, wrap=True)


def _setup_stage(
    msg: Message, context: Context, call_next: ClientAppCallable, record: ConfigRecord
) -> Message:
    client = SecAggClient(int(context.node_id), from_fields(record))  # validates first
    encoding = encoding_from_fields(from_fields(record, ENCODING_PREFIX))
    start = from_record(single_arrays(msg.content, "the train message")[1])
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    local = from_record(single_arrays(reply.content, "the train reply")[1])
    if list(start) != list(local) or any(start[k].shape != local[k].shape for k in start):
        raise ModPreconditionError("reply weights do not match the received model's names/shapes")
    metrics = single_metrics(reply.content)
    weight_key = str(record.get("weight-key", "num-examples"))
    weight = int(metrics[1].get(weight_key, 1)) if metrics is not None else 1
    glue: dict[str, Any] = {
        "round": int(record["round"]),
        "drop-stage": str(record.get("drop-stage", "")),
    }
    delta = flatten(local) - flatten(start)
    x = _encode_input(encoding, delta, weight, str(record.get("feedback", "")), context, glue)
    glue["input"] = x.astype("<u8").tobytes()
    _maybe_drop(glue, SETUP)
    out = client.advertise_keys()
    context.state[STATE_KEY] = _save(client, glue)
    public = None
    if metrics is not None:
        # The weight travels inside the masked vector (or not at all), never in the clear.
        name, values = metrics
        public = (name, MetricRecord({k: v for k, v in values.items() if k != weight_key}))
    return _reply(msg, SETUP, out, {}, public)
