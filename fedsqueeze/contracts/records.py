"""Conversions between numpy arrays and Flower records, and their serialized size.

The size is what byte accounting reports: the protobuf-serialized size of a message's
``RecordDict``, i.e. the records as they travel in Flower messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord holding ``arrays`` in order."""
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of an ArrayRecord as numpy, in order."""
    return {k: v.numpy() for k, v in record.items()}


def as_int(value: object, what: str = "value") -> int:
    """A config-record number as ``int``; anything else (a list, bytes) is a ``TypeError``
    naming ``what`` (record values are a union of scalars and lists)."""
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        return int(value)
    raise TypeError(f"{what} must be a number, got {type(value).__name__}")


def as_bytes(value: object, what: str = "value") -> bytes:
    """A config-record ``bytes`` value; anything else is a ``TypeError`` naming ``what``."""
    if isinstance(value, bytes):
        return value
    raise TypeError(f"{what} must be bytes, got {type(value).__name__}")


def serialized_size(content: RecordDict) -> int:
    """Bytes of ``content`` serialized as Flower serializes message records."""
    return int(recorddict_to_proto(content).ByteSize())


def without(content: RecordDict, *names: str) -> RecordDict:
    """``content`` minus the records ``names``: what a mod or wrapper consumed (its own
    record) before the next layer sees the message."""
    return RecordDict({k: v for k, v in content.items() if k not in names})


@dataclass(frozen=True)
class RecordNames:
    """The record names and weight key an app's strategy uses, with Flower's defaults.

    Flower's strategies take ``arrayrecord_key``, ``configrecord_key`` and
    ``weighted_by_key``; fedsqueeze's wrappers read them from the strategy they wrap
    (:meth:`of`) instead of assuming the defaults.
    """

    arrays: str = "arrays"
    config: str = "config"
    weight: str = "num-examples"

    @classmethod
    def of(cls, strategy: Any) -> RecordNames:
        """The names of the innermost strategy of a wrapper chain that declares them."""
        seen = 0
        while strategy is not None and seen < 32:
            if hasattr(strategy, "arrayrecord_key"):
                return cls(
                    arrays=str(strategy.arrayrecord_key),
                    config=str(getattr(strategy, "configrecord_key", cls.config)),
                    weight=str(getattr(strategy, "weighted_by_key", cls.weight)),
                )
            strategy = getattr(strategy, "inner", None) or getattr(strategy, "strategy", None)
            seen += 1
        return cls()


def single_metrics(content: RecordDict) -> tuple[str, Any] | None:
    """``(name, MetricRecord)`` of a reply's only MetricRecord (Flower's convention), or None."""
    records = content.metric_records
    if len(records) != 1:
        return None
    return next(iter(records.items()))


# Record keys of the fedsqueeze wire contract. Instructions travel in fedsqueeze's own
# records, never inside the app's config record, so each mod reads only its own record.
CODEC_KEY = "fedsqueeze.codec"
"""ConfigRecord in a train message: ``codec`` (uplink spec) and ``codec-seed``; tells
``compress_mod`` to encode the reply."""
UPDATE_KEY = "fedsqueeze.update"
"""ConfigRecord in a train reply: ``payload`` (encoded delta bytes)."""
DOWNLINK_KEY = "fedsqueeze.downlink"
"""ConfigRecord in a train or evaluate message: ``payload``, ``codec``, ``seed``, ``version``,
``base-version`` (-1: the payload is the full model; else a delta against that version),
``arrays`` (the record name to restore the model under)."""
DOWNLINK_ACK_KEY = "fedsqueeze.downlink-ack"
"""ConfigRecord in a reply: ``version`` of the model the client now holds."""
CODEC_STATE_KEY = "fedsqueeze.codec-state"
"""Client ``Context.state`` ArrayRecord: the uplink codec's state (error-feedback residuals)."""
CODEC_META_KEY = "fedsqueeze.codec-meta"
"""Client ``Context.state`` ConfigRecord: which codec spec the stored state belongs to."""
VIEW_KEY = "fedsqueeze.view"
"""Client ``Context.state`` ArrayRecord: the global model as this client last reconstructed it."""
VIEW_META_KEY = "fedsqueeze.view-meta"
"""Client ``Context.state`` ConfigRecord: ``version`` of the stored view."""
PRUNE_KEY = "fedsqueeze.prune"
"""ConfigRecord in a train or evaluate message of a pruned federation: ``digest`` of the
mask and, unless the client acknowledged holding it, ``mask`` (bytes,
:func:`fedsqueeze.compression.masked.encode_mask`); the message's weights are then the kept
values only (:func:`~fedsqueeze.compression.masked.gather`), and so is a train reply's."""
PRUNE_STATE_KEY = "fedsqueeze.prune-state"
"""Client ``Context.state`` ConfigRecord: ``digest`` and ``mask`` of the mask last received."""
STUDENT_KEY = "fedsqueeze.student"
"""ConfigRecord in a train or evaluate message: the distilled student for on-device
inference, sent only to a client that does not hold its current version: ``payload`` (the
full model, :func:`fedsqueeze.downlink.encode`), ``codec``, ``seed``, ``version`` (the round
it was distilled in) and ``model`` (its registry name)."""
LOWRANK_KEY = "fedsqueeze.lowrank"
"""ConfigRecord in a train or evaluate message of a low-rank federation: ``layers`` (names)
and ``ranks`` (ints); the message's weights are then the factors of those layers
(:func:`fedsqueeze.models.lowrank.factorize`), and so is a train reply's."""
QAT_KEY = "fedsqueeze.qat"
"""ConfigRecord in a train message asking the client to train with fake quantization
(``scheme``: ``"int8"``; :mod:`fedsqueeze.models.qat`)."""


def flatten(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """All arrays as one float64 vector, in order (the secure path works on flat vectors)."""
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays.values()])


def unflatten(flat: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten`, as float32 arrays shaped like ``like``."""
    out, pos = {}, 0
    for name, ref in like.items():
        out[name] = flat[pos : pos + ref.size].reshape(ref.shape).astype(np.float32)
        pos += ref.size
    return out
