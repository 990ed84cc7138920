"""Mask-aligned updates: a pruning mask both sides hold, coded once; values for kept positions only.

When the server has pruned the model and told every client which positions are kept, a
client's update is zero at every pruned position by construction. Neither side needs to
spend a bit on positions: :func:`gather` turns a model (or an update) into one 1-D vector of
kept values per tensor, in the tensor's flat order, and :func:`scatter` puts them back.
Everything between the two — any codec chain (quantization, top-k *within* the mask, error
feedback, lossless packing) or the secure-aggregation encodings — runs unchanged on the
gathered vectors, so it composes with every stage and the payload carries no index bytes.
Under secure aggregation the kept positions are a subset every client shares, exactly like
shared-seed random-k: only they are masked and summed.

The mask itself travels with the model (:func:`encode_mask`): the layout table (names and
shapes, which the client needs to rebuild full tensors) and the kept positions of the
flattened model, coded close to ``log2 C(d, k)`` bits with :mod:`.indexcode` (the
complement when more than half are kept, so an unpruned model's mask is a few bytes).

Wire format of a mask (``varint`` is unsigned LEB128)::

    b"FSQM"  u8 version=1  varint n_tensors
    per tensor: varint name_len  name (UTF-8)  u8 ndim  ndim x varint dim
    varint k (kept positions)  index stream (indexcode)  u32 CRC32 of everything above

Pure numpy: no torch, no Flower.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Mapping

import numpy as np

from fedsqueeze.compression._wire import Reader, Writer
from fedsqueeze.compression.errors import PayloadError
from fedsqueeze.compression.indexcode import decode_positions, encode_positions

MASK_MAGIC = b"FSQM"
MASK_VERSION = 1
_MAX_NDIM = 8
_MAX_ELEMENTS = 1 << 28

Masks = dict[str, np.ndarray]
"""Tensor name -> boolean array of that tensor's shape (True = kept)."""


def encode_mask(masks: Mapping[str, np.ndarray]) -> bytes:
    """Code ``masks`` (names and shapes in order, and the kept positions of the flat model)."""
    w = Writer()
    w.raw(MASK_MAGIC)
    w.u8(MASK_VERSION)
    w.varint(len(masks))
    for name, m in masks.items():
        raw = name.encode("utf-8")
        w.varint(len(raw))
        w.raw(raw)
        w.u8(m.ndim)
        for dim in m.shape:
            w.varint(int(dim))
    flat = np.concatenate([np.asarray(m, dtype=bool).ravel() for m in masks.values()])
    kept = np.flatnonzero(flat)
    w.varint(int(kept.size))
    w.raw(encode_positions(kept, int(flat.size)))
    body = w.getvalue()
    return body + zlib.crc32(body).to_bytes(4, "little")


def decode_mask(payload: bytes) -> Masks:
    """Inverse of :func:`encode_mask`; a malformed payload raises :class:`PayloadError`."""
    data = bytes(payload)
    if len(data) < len(MASK_MAGIC) + 5 or data[:4] != MASK_MAGIC:
        raise PayloadError("not a pruning mask (bad magic)")
    body, crc = data[:-4], int.from_bytes(data[-4:], "little")
    if zlib.crc32(body) != crc:
        raise PayloadError("pruning mask checksum mismatch")
    r = Reader(body, "pruning mask")
    r.take(4)
    if r.u8() != MASK_VERSION:
        raise PayloadError("unsupported pruning mask version")
    n = r.varint()
    if n > r.remaining:
        raise PayloadError("pruning mask declares more tensors than it holds")
    layout: list[tuple[str, tuple[int, ...]]] = []
    total = 0
    for _ in range(n):
        try:
            name = bytes(r.take(r.varint())).decode("utf-8")
        except UnicodeDecodeError:
            raise PayloadError("pruning mask tensor name is not UTF-8") from None
        ndim = r.u8()
        if ndim > _MAX_NDIM:
            raise PayloadError(f"pruning mask tensor {name!r} has {ndim} dimensions")
        shape = tuple(r.varint() for _ in range(ndim))
        total += math.prod(shape)
        if total > _MAX_ELEMENTS:
            raise PayloadError("pruning mask declares too many elements")
        layout.append((name, shape))
    if len({name for name, _ in layout}) != len(layout):
        raise PayloadError("pruning mask repeats a tensor name")
    k = r.varint()
    kept = decode_positions(r, total, k)
    r.expect_end()
    flat = np.zeros(total, dtype=bool)
    flat[kept] = True
    out: Masks = {}
    pos = 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = flat[pos : pos + size].reshape(shape)
        pos += size
    return out


def mask_digest(payload: bytes) -> str:
    """A short name of a coded mask: clients that hold it are sent only this."""
    return hashlib.blake2b(bytes(payload), digest_size=8).hexdigest()


def _check_layout(arrays: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]) -> None:
    if list(arrays) != list(masks):
        raise PayloadError("arrays and mask name different tensors")


def gather(
    arrays: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Per tensor, the kept values as one float32 vector (the tensor's flat order)."""
    _check_layout(arrays, masks)
    out = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.shape != masks[name].shape:
            raise PayloadError(f"{name!r} is {a.shape}, its mask {masks[name].shape}")
        out[name] = a.reshape(-1)[masks[name].reshape(-1)].astype(np.float32)
    return out


def scatter(
    values: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Inverse of :func:`gather`: full float32 tensors, exactly zero at pruned positions."""
    _check_layout(values, masks)
    out = {}
    for name, m in masks.items():
        v = np.asarray(values[name]).reshape(-1)
        flat_mask = m.reshape(-1)
        if v.size != int(flat_mask.sum()):
            raise PayloadError(
                f"{name!r}: {v.size} values for {int(flat_mask.sum())} kept positions"
            )
        full = np.zeros(m.size, dtype=np.float32)
        full[flat_mask] = v
        out[name] = full.reshape(m.shape)
    return out


def apply_mask(
    arrays: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``arrays`` with every pruned position set to exactly zero (float32)."""
    return scatter(gather(arrays, masks), masks)


def kept_count(masks: Mapping[str, np.ndarray]) -> int:
    return int(sum(int(np.count_nonzero(m)) for m in masks.values()))
