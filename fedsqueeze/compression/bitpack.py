"""Bit-packing of unsigned integers at a fixed width (1..64 bits), vectorized with numpy.

Shared by the codec (quantized values travel at their bit width) and by secure
aggregation (masked vectors in Z_{2^b} travel at b bits per coordinate).

Layout: value ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the output, least
significant bit first, bytes in order (the ``bitorder="little"`` convention of
:func:`numpy.packbits`).
"""

from __future__ import annotations

import numpy as np

# Values are processed in chunks of this many (a multiple of 8, so every chunk ends on a
# byte boundary): peak scratch memory stays at ~64 bytes x chunk whatever the input size.
_CHUNK = 1 << 18


def packed_size(count: int, bits: int) -> int:
    """Number of bytes :func:`pack_bits` produces for ``count`` values of ``bits`` bits."""
    return (count * bits + 7) // 8


def _container(bits: int) -> int:
    """Smallest byte width in {1, 2, 4, 8} that holds ``bits`` bits."""
    for width in (1, 2, 4, 8):
        if bits <= 8 * width:
            return width
    raise AssertionError("unreachable")


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers ``< 2**bits`` into ``ceil(len*bits/8)`` bytes (LSB first).

    Raises ``ValueError`` if a value does not fit or ``bits`` is outside 1..64.
    """
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in 1..64, got {bits}")
    v = np.ascontiguousarray(values).reshape(-1)
    if v.size == 0:
        return b""
    if v.dtype.kind == "b":
        v = v.view(np.uint8)
    if v.dtype.kind == "i":
        if int(v.min()) < 0:
            raise ValueError("pack_bits takes non-negative integers")
    elif v.dtype.kind != "u":
        raise ValueError(f"pack_bits takes integer arrays, got {v.dtype}")
    vmax = int(v.max())
    if bits < 64 and vmax >> bits:
        raise ValueError(f"value {vmax} does not fit in {bits} bits")
    width = _container(bits)
    v = v.astype(f"<u{width}", copy=False)
    if bits == 8 * width:
        return v.tobytes()
    if bits in (1, 2, 4):
        return _pack_sub_byte(v, bits)
    out = bytearray(packed_size(v.size, bits))
    for start in range(0, v.size, _CHUNK):
        chunk = v[start : start + _CHUNK]
        # (n, 8*width) bit matrix of each value, keep its low `bits` columns, repack.
        byte_matrix = chunk.view(np.uint8).reshape(-1, width)
        bit_matrix = np.unpackbits(byte_matrix, axis=1, bitorder="little")
        packed = np.packbits(bit_matrix[:, :bits], bitorder="little")
        offset = start * bits // 8
        out[offset : offset + packed.size] = packed.tobytes()
    return bytes(out)


def _pack_sub_byte(v: np.ndarray, bits: int) -> bytes:
    per_byte = 8 // bits
    n = v.size
    padded = np.zeros(-(-n // per_byte) * per_byte, dtype=np.uint8)
    padded[:n] = v
    groups = padded.reshape(-1, per_byte)
    acc = groups[:, 0].copy()
    for j in range(1, per_byte):
        acc |= groups[:, j] << np.uint8(j * bits)
    return acc.tobytes()


def unpack_bits(data: bytes | bytearray | memoryview, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`; returns ``count`` values as ``uint64``.

    Raises ``ValueError`` if ``data`` has the wrong length.
    """
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in 1..64, got {bits}")
    if count < 0:
        raise ValueError("count must be non-negative")
    expected = packed_size(count, bits)
    if len(data) != expected:
        raise ValueError(
            f"expected {expected} bytes for {count} values of {bits} bits, got {len(data)}"
        )
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    raw = np.frombuffer(data, dtype=np.uint8)
    width = _container(bits)
    if bits == 8 * width:
        return raw.view(f"<u{width}").astype(np.uint64)
    if bits == 1:
        return np.unpackbits(raw, count=count, bitorder="little").astype(np.uint64)
    if bits in (2, 4):
        mask = np.uint8((1 << bits) - 1)
        shifts = np.arange(0, 8, bits, dtype=np.uint8)
        vals = (raw[:, None] >> shifts[None, :]) & mask
        return vals.reshape(-1)[:count].astype(np.uint64)
    out = np.empty(count, dtype=f"<u{width}")
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first = start * bits // 8
        chunk_bits = np.unpackbits(
            raw[first : first + packed_size(n, bits)], bitorder="little", count=n * bits
        ).reshape(n, bits)
        full = np.zeros((n, 8 * width), dtype=np.uint8)
        full[:, :bits] = chunk_bits
        out[start : start + n] = np.packbits(full, axis=1, bitorder="little").view(f"<u{width}")[
            :, 0
        ]
    return out.astype(np.uint64)
