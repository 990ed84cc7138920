"""Client mod for restricted fine-tuning (``train-layers``): only the trained tensors travel.

The server sends the tensors a round trains in the message's model record and the frozen
rest in :data:`~fedsqueeze.models.retrain.FROZEN_KEY` (``fedsqueeze.server.layers``).
Everything outside this mod — downlink decoding, secure aggregation, the uplink codec —
sees the trained tensors only. This mod, inside them:

- on the way in, joins the two into the full model for the handler and names the trained
  tensors in the message's config (``train-tensors``), so the handler freezes the rest
  (:func:`~fedsqueeze.models.retrain.set_trainable`);
- on the way out, keeps only the trained tensors of the handler's reply.

No-op for messages without the frozen record.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedsqueeze.client.mods import ModPreconditionError, failed_precondition, single_arrays
from fedsqueeze.contracts.records import from_record, to_record, without
from fedsqueeze.models.retrain import FROZEN_KEY, TRAIN_TENSORS, decode_arrays


def layers_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Full model in (trained tensors named), trained tensors out; see the module doc."""
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or FROZEN_KEY not in msg.content.config_records
    ):
        return call_next(msg, context)
    try:
        frozen = decode_arrays(bytes(msg.content.config_records[FROZEN_KEY]["payload"]))  # type: ignore[arg-type]
        name, record = single_arrays(msg.content, "a train message")
        trained = from_record(record)
        if set(frozen) & set(trained):
            raise ModPreconditionError("a tensor is both trained and frozen")
    except (ModPreconditionError, KeyError, TypeError, ValueError) as err:
        return failed_precondition(msg, "layers_mod", str(err))
    content = without(msg.content, FROZEN_KEY, name)
    content[name] = to_record({**trained, **frozen})
    old = content.config_records.get("config")
    content["config"] = ConfigRecord({**(dict(old) if old else {}), TRAIN_TENSORS: list(trained)})
    msg.content = content
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    try:
        out_name, local = single_arrays(reply.content, "the train reply")
        arrays = from_record(local)
        reply.content[out_name] = to_record({k: arrays[k] for k in trained})
    except (ModPreconditionError, KeyError) as err:
        return failed_precondition(msg, "layers_mod", str(err))
    return reply
