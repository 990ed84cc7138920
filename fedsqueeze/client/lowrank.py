"""Client mod for low-rank federations: the handler builds, trains and returns the factors.

The server sends the factors of the global model (``fedsqueeze.lowrank`` record: which
layers, at which rank, with which constant scale ``c``). For the duration of the handler
this mod makes every model the handler builds the factorized architecture
(:func:`fedsqueeze.models.lowrank.factorized_models`), whose ``state_dict`` is exactly the
factors: the handler loads them, trains them and replies with them like any weights, and
every mod outside this one (the downlink decoder, secure aggregation, the uplink codec) sees
only the smaller factor arrays. A handler built this way needs no low-rank code:
``ClientApp(mods=[..., lowrank_mod])``.
"""

from __future__ import annotations

import math

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedsqueeze.client.mods import ModPreconditionError, failed_precondition
from fedsqueeze.contracts.records import LOWRANK_KEY, without

ADAPTER_KEY = "fedsqueeze.adapters"
"""The adapters' record (:data:`fedsqueeze.models.adapters.ADAPTER_KEY`; repeated here so the
mod imports torch only when a message asks for adapters)."""


def ranks_of(record: ConfigRecord) -> dict[str, int]:
    """The ``{layer: rank}`` a ``fedsqueeze.lowrank`` record names (validated)."""
    layers, ranks = record.get("layers"), record.get("ranks")
    if not isinstance(layers, list) or not isinstance(ranks, list) or len(layers) != len(ranks):
        raise ModPreconditionError("low-rank record needs equally long 'layers' and 'ranks'")
    valid = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool) and r >= 1]
    if len(valid) != len(ranks):
        raise ModPreconditionError("low-rank ranks must be integers >= 1")
    return {str(layer): r for layer, r in zip(layers, valid, strict=True)}


def scales_of(record: ConfigRecord, ranks: dict[str, int]) -> dict[str, float]:
    """The per-layer factor scales ``c`` of a ``fedsqueeze.lowrank`` record (validated; a
    record without ``scales`` means ``c = 1``)."""
    scales = record.get("scales")
    if scales is None:
        return {layer: 1.0 for layer in ranks}
    if not isinstance(scales, list) or len(scales) != len(ranks):
        raise ModPreconditionError("low-rank 'scales' must list one number per layer")
    if not all(
        isinstance(c, float | int) and not isinstance(c, bool) and math.isfinite(c) and c > 0
        for c in scales
    ):
        raise ModPreconditionError("low-rank scales must be finite numbers > 0")
    return {layer: float(c) for layer, c in zip(ranks, scales, strict=True)}  # type: ignore[arg-type]


def lowrank_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Models built by the handler are the factorized ones the message names (module doc)."""
    if LOWRANK_KEY not in msg.content.config_records:
        return call_next(msg, context)
    try:
        record = msg.content.config_records[LOWRANK_KEY]
        ranks = ranks_of(record)
        scales = scales_of(record, ranks)
    except ModPreconditionError as err:
        return failed_precondition(msg, "lowrank_mod", str(err))
    msg.content = without(msg.content, LOWRANK_KEY)
    from fedsqueeze.models.lowrank import LowRankError, factorized_models  # torch: only when asked

    try:
        with factorized_models(ranks, scales):
            return call_next(msg, context)
    except LowRankError as err:
        return failed_precondition(msg, "lowrank_mod", str(err))


def adapter_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Low-rank adapters (``lowrank-adapter``): models built by the handler carry the adapters
    the message names, on a frozen base.

    ``layers_mod`` does the rest with the records the server sends
    (``fedsqueeze.server.adapters``): it joins the frozen base with the adapters for the
    handler, names the adapters as the only trained tensors, and replies with the adapters
    only."""
    if ADAPTER_KEY not in msg.content.config_records:
        return call_next(msg, context)
    try:
        ranks = ranks_of(msg.content.config_records[ADAPTER_KEY])
    except ModPreconditionError as err:
        return failed_precondition(msg, "adapter_mod", str(err))
    msg.content = without(msg.content, ADAPTER_KEY)
    from fedsqueeze.models.adapters import AdapterError, adapted_models

    try:
        with adapted_models(ranks):
            return call_next(msg, context)
    except AdapterError as err:
        return failed_precondition(msg, "adapter_mod", str(err))
