"""Protocol parameters, the communication graph, and message-field helpers.

Messages between stages are flat dicts whose values are Flower ``ConfigRecord`` friendly
(``int``, ``bool``, ``str``, ``bytes`` and homogeneous lists of those).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from fedsqueeze.secagg.errors import SecAggConfigError, SecAggProtocolError
from fedsqueeze.secagg.field import MAX_BITS, MIN_BITS

PROTOCOL = "fedsqueeze-secagg+/1"
MAX_ID = (1 << 64) - 1  # Flower node ids and round seeds are uint64
# The PRG output for one mask is vector_len * 8 bytes at most; keep it sane.
MAX_VECTOR_LEN = 1 << 31
CONFIG_FIELDS = (
    "num_clients",
    "neighbours",
    "threshold",
    "bits",
    "vector_len",
    "round_seed",
    "allow_low_threshold",  # last: the only bool
)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SecAggConfig:
    """Public parameters of one SecAgg+ round.

    Parameters
    ----------
    num_clients:
        ``n``, the number of clients selected for the round (>= 2).
    neighbours:
        ``k``, the degree of the communication graph; ``n - 1`` is the full graph
        (Bonawitz et al.), smaller values give SecAgg+ (Bell et al.). ``n * k`` must be
        even for a k-regular graph to exist.
    threshold:
        ``t``, shares needed to reconstruct a secret; ``2 <= t <= k + 1`` (each client
        shares among its ``k`` neighbours and itself). Unless ``allow_low_threshold``,
        ``t > (k + 1) / 2`` is required: below it a server that lies about who dropped can
        collect both the self-mask and the mask-key shares of one client from two disjoint
        groups of honest holders and unmask that client's input.
    bits:
        ``b``, inputs and the sum live in Z_{2^b}; 1..62.
    vector_len:
        ``d``, the input length (> 0).
    round_seed:
        Public per-round randomness (uint64): fixes the graph and the session id.
    allow_low_threshold:
        Permit ``t <= (k + 1) / 2`` (only secure against a server that reports dropouts
        honestly).
    """

    num_clients: int
    neighbours: int
    threshold: int
    bits: int
    vector_len: int
    round_seed: int
    allow_low_threshold: bool = False

    def __post_init__(self) -> None:
        n, k, t, b, d = (
            self.num_clients,
            self.neighbours,
            self.threshold,
            self.bits,
            self.vector_len,
        )
        for name in ("num_clients", "neighbours", "threshold", "bits", "vector_len", "round_seed"):
            if not _is_int(getattr(self, name)):
                raise SecAggConfigError(f"{name} must be an int, got {getattr(self, name)!r}")
        if not isinstance(self.allow_low_threshold, bool):
            raise SecAggConfigError("allow_low_threshold must be a bool")
        if n < 2:
            raise SecAggConfigError(f"num_clients must be >= 2, got {n}")
        if not 1 <= k <= n - 1:
            raise SecAggConfigError(f"neighbours must be in 1..{n - 1} (n-1 = full graph), got {k}")
        if (n * k) % 2:
            raise SecAggConfigError(
                f"no {k}-regular graph exists on {n} clients (n*k must be even); "
                f"use neighbours={k + 1 if k + 1 <= n - 1 else k - 1}"
            )
        if not 2 <= t <= k + 1:
            raise SecAggConfigError(
                f"threshold must be in 2..{k + 1} (k+1 share holders per client), got {t}"
            )
        if not self.allow_low_threshold and 2 * t <= k + 1:
            raise SecAggConfigError(
                f"threshold {t} <= (k+1)/2 = {(k + 1) / 2}: a server lying about dropouts "
                f"could unmask a client; use threshold >= {(k + 1) // 2 + 1} "
                "or set allow_low_threshold=True"
            )
        if not MIN_BITS <= b <= MAX_BITS:
            raise SecAggConfigError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {b}")
        if not 1 <= d <= MAX_VECTOR_LEN:
            raise SecAggConfigError(f"vector_len must be in 1..{MAX_VECTOR_LEN}, got {d}")
        if not 0 <= self.round_seed <= MAX_ID:
            raise SecAggConfigError(f"round_seed must be a uint64, got {self.round_seed}")

    def to_fields(self) -> dict[str, int | bool]:
        """The parameters as flat message fields (setup messages, saved client state)."""
        return {name: getattr(self, name) for name in CONFIG_FIELDS}

    @classmethod
    def from_fields(cls, msg: Mapping[str, Any]) -> SecAggConfig:
        """Inverse of :meth:`to_fields`; type errors raise ``SecAggProtocolError``."""
        return cls(
            **{name: get_int(msg, name) for name in CONFIG_FIELDS[:-1]},
            allow_low_threshold=get_bool(msg, "allow_low_threshold"),
        )

    @staticmethod
    def min_secure_threshold(neighbours: int) -> int:
        """Smallest ``t`` accepted without ``allow_low_threshold``: ``floor((k+1)/2) + 1``."""
        return (neighbours + 1) // 2 + 1


def check_client_ids(client_ids: Sequence[int], num_clients: int) -> list[int]:
    """Validate and return the sorted client ids (distinct uint64 values, ``num_clients``)."""
    ids = list(client_ids)
    if len(ids) != num_clients:
        raise SecAggConfigError(f"expected {num_clients} client ids, got {len(ids)}")
    for cid in ids:
        if not _is_int(cid) or not 0 <= cid <= MAX_ID:
            raise SecAggConfigError(f"client ids must be uint64 ints, got {cid!r}")
    if len(set(ids)) != len(ids):
        raise SecAggConfigError("client ids must be distinct")
    return sorted(ids)


def session_id(config: SecAggConfig, client_ids: Sequence[int]) -> bytes:
    """SHA-256 over every public parameter of the round.

    Bound into every key derivation and every ciphertext's associated data, so nothing from
    another round (or a round with different parameters or participants) is accepted.
    """
    h = hashlib.sha256(PROTOCOL.encode())
    for value in (
        config.num_clients,
        config.neighbours,
        config.threshold,
        config.bits,
        config.vector_len,
        config.round_seed,
        int(config.allow_low_threshold),
    ):
        h.update(value.to_bytes(8, "big"))
    for cid in sorted(client_ids):
        h.update(cid.to_bytes(8, "big"))
    return h.digest()


def neighbour_graph(
    client_ids: Sequence[int], neighbours: int, round_seed: int
) -> dict[int, tuple[int, ...]]:
    """The k-regular communication graph of the round, derived from public data only.

    A Harary graph (ring offsets ``±1..±floor(k/2)``, plus the antipode when ``k`` is odd)
    over the clients ordered by ``SHA-256(seed, id)``, i.e. a pseudo-random relabelling
    fixed by the round seed. Any client can recompute it, so the server cannot choose
    whom a client shares with. ``k = n - 1`` yields the complete graph.
    """
    n = len(client_ids)
    seed = round_seed.to_bytes(8, "big")

    def rank(cid: int) -> tuple[bytes, int]:
        return hashlib.sha256(
            b"fedsqueeze/secagg/v1/graph" + seed + cid.to_bytes(8, "big")
        ).digest(), cid

    order = sorted(client_ids, key=rank)
    offsets: set[int] = set()
    for j in range(1, neighbours // 2 + 1):
        offsets.update((j, n - j))
    if neighbours % 2:
        offsets.add(n // 2)
    return {order[i]: tuple(sorted(order[(i + o) % n] for o in offsets)) for i in range(n)}


# --- message field helpers -------------------------------------------------------------


def get_int(msg: Mapping[str, Any], key: str) -> int:
    value = _get(msg, key)
    if not _is_int(value):
        raise SecAggProtocolError(f"field {key!r} must be an int")
    return value


def get_bool(msg: Mapping[str, Any], key: str) -> bool:
    value = _get(msg, key)
    if not isinstance(value, bool):
        raise SecAggProtocolError(f"field {key!r} must be a bool")
    return value


def get_str(msg: Mapping[str, Any], key: str) -> str:
    value = _get(msg, key)
    if not isinstance(value, str):
        raise SecAggProtocolError(f"field {key!r} must be a str")
    return value


def get_bytes(msg: Mapping[str, Any], key: str, length: int | None = None) -> bytes:
    value = _get(msg, key)
    if not isinstance(value, bytes):
        raise SecAggProtocolError(f"field {key!r} must be bytes")
    if length is not None and len(value) != length:
        raise SecAggProtocolError(f"field {key!r} must be {length} bytes, got {len(value)}")
    return value


def get_id_list(msg: Mapping[str, Any], key: str) -> list[int]:
    """A list of distinct uint64 ids."""
    value = _get(msg, key)
    if not isinstance(value, list) or not all(_is_int(v) and 0 <= v <= MAX_ID for v in value):
        raise SecAggProtocolError(f"field {key!r} must be a list of uint64 ints")
    if len(set(value)) != len(value):
        raise SecAggProtocolError(f"field {key!r} has duplicate ids")
    return list(value)


def get_bytes_list(msg: Mapping[str, Any], key: str, length: int | None = None) -> list[bytes]:
    value = _get(msg, key)
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise SecAggProtocolError(f"field {key!r} must be a list of bytes")
    if length is not None and any(len(v) != length for v in value):
        raise SecAggProtocolError(f"every item of {key!r} must be {length} bytes")
    return list(value)


def _get(msg: Mapping[str, Any], key: str) -> Any:
    if not isinstance(msg, Mapping):
        raise SecAggProtocolError(f"a message must be a mapping, got {type(msg).__name__}")
    if key not in msg:
        raise SecAggProtocolError(f"message lacks field {key!r}")
    return msg[key]
