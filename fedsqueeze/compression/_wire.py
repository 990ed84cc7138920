"""Bounds-checked little-endian reader/writer for the payload format."""

from __future__ import annotations

import struct

import numpy as np

from fedsqueeze.compression.errors import PayloadError


class Writer:
    """Accumulates byte chunks; ``getvalue`` joins them once."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> None:
        self._parts.append(struct.pack("<B", value))

    def u16(self, value: int) -> None:
        self._parts.append(struct.pack("<H", value))

    def u32(self, value: int) -> None:
        self._parts.append(struct.pack("<I", value))

    def u64(self, value: int) -> None:
        self._parts.append(struct.pack("<Q", value))

    def raw(self, data: bytes) -> None:
        self._parts.append(bytes(data))

    def f32_array(self, values: np.ndarray) -> None:
        self._parts.append(np.ascontiguousarray(values, dtype="<f4").tobytes())

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Reads from a buffer; any read past the end raises :class:`PayloadError`."""

    def __init__(self, data: bytes | memoryview, what: str = "payload") -> None:
        self._buf = memoryview(data)
        self._pos = 0
        self._what = what

    @property
    def remaining(self) -> int:
        return len(self._buf) - self._pos

    def take(self, n: int) -> memoryview:
        if n < 0 or n > self.remaining:
            raise PayloadError(
                f"{self._what} truncated: need {n} bytes at offset {self._pos}, "
                f"{self.remaining} left"
            )
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def _unpack(self, fmt: str, size: int) -> int:
        return int(struct.unpack(fmt, self.take(size))[0])

    def u8(self) -> int:
        return self._unpack("<B", 1)

    def u16(self) -> int:
        return self._unpack("<H", 2)

    def u32(self) -> int:
        return self._unpack("<I", 4)

    def u64(self) -> int:
        return self._unpack("<Q", 8)

    def f32_array(self, count: int) -> np.ndarray:
        return np.frombuffer(self.take(4 * count), dtype="<f4").astype(np.float32)

    def u16_array(self, count: int) -> np.ndarray:
        return np.frombuffer(self.take(2 * count), dtype="<u2")

    def expect_end(self) -> None:
        if self.remaining:
            raise PayloadError(f"{self._what} has {self.remaining} unexpected trailing bytes")
