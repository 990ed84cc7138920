"""Exception hierarchy of the secure-aggregation core.

Every error is a :class:`ValueError` so callers that treat "bad input" generically keep
working, while the Flower glue can tell an abort (too few survivors, the round is lost)
from a protocol violation (a peer or the server sent something malformed or forged).
"""

from __future__ import annotations


class SecAggError(ValueError):
    """Base class of every error raised by :mod:`fedsqueeze.secagg`."""


class SecAggConfigError(SecAggError):
    """Invalid protocol parameters (threshold, bit width, vector length, client ids, ...)."""


class SecAggOverflowError(SecAggConfigError):
    """The configured bit width cannot hold the sum without wrap-around."""


class SecAggInputError(SecAggError):
    """A client's input vector has the wrong shape, dtype or range."""


class SecAggProtocolError(SecAggError):
    """A message is malformed, arrives at the wrong stage, or asks for something forbidden."""


class SecAggDecryptionError(SecAggProtocolError):
    """An encrypted share failed authentication (tampered, replayed or misaddressed)."""


class SecAggAbort(SecAggError):
    """Too few clients survived for the sum to be recovered; the round must be abandoned."""
