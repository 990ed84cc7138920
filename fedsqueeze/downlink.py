"""Downlink compression: how the server sends the global model and how a client rebuilds it.

Numpy only. The server encodes either the full global model, or — when the client said
it holds an earlier version the server still remembers — the delta against that
version. Both sides reconstruct with :func:`reconstruct`, so the server knows exactly
the weights each client starts from (it needs them to turn a client's encoded delta
back into local weights).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedsqueeze.compression import Codec, PayloadError

FULL = -1
"""``base-version`` value meaning the payload is the full model, not a delta."""


def encode(
    codec: Codec,
    global_arrays: Mapping[str, np.ndarray],
    seed: int,
    base: Mapping[str, np.ndarray] | None = None,
) -> bytes:
    """Encode the full model (``base is None``) or ``global - base``.

    A delta carries only a digest of the layout (both sides hold ``base``); the full model
    carries the layout table, since a client receiving it may know nothing yet.
    """
    if base is None:
        target = {k: np.asarray(v, dtype=np.float32) for k, v in global_arrays.items()}
    else:
        target = {
            k: (np.asarray(v, dtype=np.float32) - base[k]).astype(np.float32)
            for k, v in global_arrays.items()
        }
    layout = "full" if base is None else "hash"
    return codec.encode(target, seed=seed, state=None, layout=layout).payload


def reconstruct(
    codec: Codec,
    payload: bytes,
    seed: int,
    base: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Rebuild the model from a downlink payload (and the base for a delta payload)."""
    if base is None:
        return codec.decode(payload, seed=seed).arrays
    expected = {k: (np.shape(v), "float32") for k, v in base.items()}
    decoded = codec.decode(payload, seed=seed, expected=expected).arrays
    if set(decoded) != set(base):
        raise PayloadError("downlink delta does not match the names of the held model")
    return {k: (base[k] + decoded[k]).astype(np.float32) for k in decoded}
