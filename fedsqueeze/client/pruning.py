"""Client mod for pruned federations: the handler trains the full model with the server's mask.

The server sends the kept values of the global model (one vector per tensor) and the mask
(``fedsqueeze.prune`` record: the coded mask, or only its digest when this client already
holds it). Everything outside this mod — the downlink decoder, secure aggregation, the
uplink codec — works on the kept values only, so none of them needs to know about pruning,
and what travels carries no position bytes. This mod, innermost, is the only place where
full tensors exist:

- on the way in, it rebuilds the full model (exact zeros at pruned positions) for the
  handler and, for the duration of the handler, installs the mask in every model the
  handler builds (:func:`fedsqueeze.models.pruning.masked_training`: masked gradients, and
  pruned weights and optimizer state set back to zero after every step);
- on the way out, it replaces the handler's full weights by their kept values (the update
  is mask-aligned by construction). The mask is stored before the handler runs, so a reply
  without error tells the server this client holds it (no acknowledgement record, which
  outer mods such as ``secagg_mod`` would not forward).

A handler built this way needs no pruning code: ``ClientApp(mods=[..., prune_mod])``.
Why a mod rather than a model-factory argument: the mask arrives in the message, which only
mods see before the handler; a mod keeps the handler a plain Flower train function, as
Flower's own mods do for secure aggregation and DP.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedsqueeze.client.mods import ModPreconditionError, failed_precondition, single_arrays
from fedsqueeze.compression.errors import CodecError
from fedsqueeze.compression.masked import Masks, decode_mask, gather, mask_digest, scatter
from fedsqueeze.contracts.records import (
    PRUNE_KEY,
    PRUNE_STATE_KEY,
    from_record,
    to_record,
    without,
)


def _mask(record: ConfigRecord, context: Context) -> Masks:
    """The mask the message names: sent along, or the one this client holds."""
    digest = str(record["digest"])
    payload = record.get("mask")
    if payload is None:
        held = context.state.config_records.get(PRUNE_STATE_KEY)
        if held is None or str(held["digest"]) != digest:
            raise ModPreconditionError(f"server named mask {digest}, which this client lacks")
        payload = held["mask"]
    payload = bytes(payload)  # type: ignore[arg-type]
    if mask_digest(payload) != digest:
        raise ModPreconditionError("pruning mask does not match its digest")
    masks = decode_mask(payload)
    context.state[PRUNE_STATE_KEY] = ConfigRecord({"digest": digest, "mask": payload})
    return masks


def prune_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Full model in (mask installed for training), kept values out; see the module doc."""
    if PRUNE_KEY not in msg.content.config_records:
        return call_next(msg, context)
    try:
        masks = _mask(msg.content.config_records[PRUNE_KEY], context)
        name, kept = single_arrays(msg.content, "a pruned model message")
        full = scatter(from_record(kept), masks)
    except (ModPreconditionError, CodecError, KeyError, TypeError) as err:
        return failed_precondition(msg, "prune_mod", str(err))
    content = without(msg.content, PRUNE_KEY, name)
    content[name] = to_record(full)
    msg.content = content
    from fedsqueeze.models.pruning import PruningError, masked_training  # torch: only when asked

    try:
        with masked_training(masks):
            reply = call_next(msg, context)
    except PruningError as err:
        return failed_precondition(msg, "prune_mod", str(err))
    if reply.has_error():
        return reply
    if msg.metadata.message_type == MessageType.TRAIN:
        try:
            out_name, local = single_arrays(reply.content, "the train reply")
            reply.content[out_name] = to_record(gather(from_record(local), masks))
        except (ModPreconditionError, CodecError) as err:
            return failed_precondition(msg, "prune_mod", str(err))
    return reply
