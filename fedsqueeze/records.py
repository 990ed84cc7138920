"""Conversions between numpy arrays and Flower records, and their serialized size.

The size is what byte accounting reports: the protobuf-serialized size of a message's
``RecordDict``, i.e. the records as they travel in Flower messages.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord holding ``arrays`` in order."""
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of an ArrayRecord as numpy, in order."""
    return {k: v.numpy() for k, v in record.items()}


def serialized_size(content: RecordDict) -> int:
    """Bytes of ``content`` serialized as Flower serializes message records."""
    return int(recorddict_to_proto(content).ByteSize())


# Record keys of the fedsqueeze wire contract (besides Flower's "arrays"/"config"/"metrics").
UPDATE_KEY = "fedsqueeze.update"
"""ConfigRecord in a train reply: ``payload`` (encoded delta bytes)."""
DOWNLINK_KEY = "fedsqueeze.downlink"
"""ConfigRecord in a train message: ``payload``, ``codec``, ``seed``, ``version``,
``base-version`` (-1: the payload is the full model; else a delta against that version)."""
CODEC_STATE_KEY = "fedsqueeze.codec-state"
"""Client ``Context.state`` ArrayRecord: the uplink codec's state (error-feedback residuals)."""
CODEC_META_KEY = "fedsqueeze.codec-meta"
"""Client ``Context.state`` ConfigRecord: which codec spec the stored state belongs to."""
VIEW_KEY = "fedsqueeze.view"
"""Client ``Context.state`` ArrayRecord: the global model as this client last reconstructed it."""
VIEW_META_KEY = "fedsqueeze.view-meta"
"""Client ``Context.state`` ConfigRecord: ``version`` of the stored view."""
