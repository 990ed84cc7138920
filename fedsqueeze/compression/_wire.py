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

    def varint(self, value: int) -> None:
        """Unsigned LEB128 (7 bits a byte, low first); at most 10 bytes for a u64."""
        if not 0 <= value < 1 << 64:
            raise ValueError(f"varint out of range: {value}")
        out = bytearray()
        while True:
            byte = value & 0x7F
            value >>= 7
            if value:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                break
        self._parts.append(bytes(out))

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

    def varint(self) -> int:
        """Read an unsigned LEB128 u64; overlong or non-canonical forms are rejected."""
        value = 0
        for i in range(10):
            byte = self.u8()
            if i and byte == 0:
                raise PayloadError(f"{self._what}: non-canonical varint")
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if value >= 1 << 64:
                    raise PayloadError(f"{self._what}: varint exceeds 64 bits")
                return value
        raise PayloadError(f"{self._what}: varint longer than 10 bytes")

    def f32_array(self, count: int) -> np.ndarray:
        return np.frombuffer(self.take(4 * count), dtype="<f4").astype(np.float32)

    def u16_array(self, count: int) -> np.ndarray:
        return np.frombuffer(self.take(2 * count), dtype="<u2")

    def expect_end(self) -> None:
        if self.remaining:
            raise PayloadError(f"{self._what} has {self.remaining} unexpected trailing bytes")
