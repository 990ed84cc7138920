"""``student_mod``: a client keeps the distilled student the server sends, for on-device
inference.

With ``distill = "student"`` the server attaches the current student (``fedsqueeze.student``
record: the full model encoded with the run's downlink codec) to a train or evaluate message
whenever the client does not hold that version yet. This mod, outermost, decodes it, keeps it
in ``Context.state`` (the SuperNode's state for the run) and hands the handler the message
without it, so no other mod or handler ever sees the record. A record that does not decode
is a failed precondition (an ``Error`` reply): the server then counts the client as not
holding the student and sends it again.

:func:`held_student` and :func:`student_model` read it back: the device's inference model
between rounds (or ``fedsqueeze export``'s ONNX artifact of the same weights).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedsqueeze import downlink
from fedsqueeze.client.mods import ModPreconditionError, failed_precondition
from fedsqueeze.compression import parse_codec
from fedsqueeze.compression.errors import CodecError
from fedsqueeze.contracts.records import STUDENT_KEY, from_record, to_record, without

STUDENT_STATE_KEY = "fedsqueeze.student-weights"
"""Client ``Context.state`` ArrayRecord: the student's weights."""
STUDENT_META_KEY = "fedsqueeze.student-meta"
"""Client ``Context.state`` ConfigRecord: ``model`` (registry name) and ``version``."""


def student_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Keep the student a message carries; pass the message on without it."""
    if STUDENT_KEY not in msg.content.config_records:
        return call_next(msg, context)
    record = msg.content.config_records[STUDENT_KEY]
    try:
        codec = parse_codec(str(record["codec"]))
        arrays = downlink.reconstruct(codec, bytes(record["payload"]), int(record["seed"]))
        if not arrays or not all(np.isfinite(a).all() for a in arrays.values()):
            raise ModPreconditionError("the student's weights are empty or not finite")
        meta = ConfigRecord({"model": str(record["model"]), "version": int(record["version"])})
    except (ModPreconditionError, CodecError, KeyError, ValueError, TypeError) as err:
        return failed_precondition(msg, "student_mod", str(err))
    context.state[STUDENT_STATE_KEY] = to_record(arrays)
    context.state[STUDENT_META_KEY] = meta
    msg.content = without(msg.content, STUDENT_KEY)
    return call_next(msg, context)


def held_student(context: Context) -> tuple[str, int, dict[str, np.ndarray]] | None:
    """``(model name, version, weights)`` of the student this client holds, or None."""
    meta = context.state.config_records.get(STUDENT_META_KEY)
    if meta is None or STUDENT_STATE_KEY not in context.state.array_records:
        return None
    weights = from_record(context.state.array_records[STUDENT_STATE_KEY])
    return str(meta["model"]), int(meta["version"]), weights


def student_model(context: Context, input_shape: tuple[int, ...], num_classes: int):  # type: ignore[no-untyped-def]
    """The held student as a torch model in eval mode (None when the client holds none)."""
    held = held_student(context)
    if held is None:
        return None
    from fedsqueeze.models import build_model
    from fedsqueeze.models.weights import load_numpy_state

    model = build_model(held[0], input_shape, num_classes)
    load_numpy_state(model, held[2])
    return model.eval()
