"""Client mod for quantization-aware training: the handler trains with int8 fake quantization.

The server asks for it per train message (``fedsqueeze.qat`` record, from ``qat-start-round``
on). For the duration of the handler, every quantized layer it runs fake-quantizes its
weights and inputs (:func:`fedsqueeze.models.qat.qat_training`); the handler itself — model
building, the optimizer, the reply — is unchanged, and so is what it replies: the model's
fp32 weights under their usual names (fake quantization lives in forward hooks, not in the
state dict), so the uplink codec, secure aggregation and pruning see the same arrays as
without QAT. A model with a layer QAT cannot quantize is answered with a Flower ``Error``
naming the layer.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedsqueeze.client.mods import failed_precondition
from fedsqueeze.contracts.records import QAT_KEY, without

SCHEMES = ("int8",)


def qat_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the train handler under fake quantization when the server asks (``fedsqueeze.qat``)."""
    if msg.metadata.message_type != MessageType.TRAIN or QAT_KEY not in msg.content.config_records:
        return call_next(msg, context)
    scheme = str(msg.content.config_records[QAT_KEY].get("scheme", ""))
    if scheme not in SCHEMES:
        return failed_precondition(msg, "qat_mod", f"unknown qat scheme {scheme!r}")
    msg.content = without(msg.content, QAT_KEY)
    from fedsqueeze.models.qat import QATError, qat_training  # torch: only when asked

    try:
        with qat_training():
            return call_next(msg, context)
    except QATError as err:
        return failed_precondition(msg, "qat_mod", str(err))
