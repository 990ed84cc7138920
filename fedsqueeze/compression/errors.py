"""Typed errors of the codec.

Every error a user or a peer can cause is a :class:`CodecError`, itself a ``ValueError``,
so callers can catch one type. The server side only needs to catch :class:`PayloadError`
to drop a malformed update.
"""

from __future__ import annotations


class CodecError(ValueError):
    """Base class: a codec was misused or received data it cannot handle."""


class CodecSpecError(CodecError):
    """A codec spec string (or stage argument) is invalid."""


class PayloadError(CodecError):
    """A payload is malformed: truncated, corrupted, forged, or does not match expectations."""
