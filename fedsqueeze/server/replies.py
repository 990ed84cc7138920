"""Client replies checked before the server uses anything in them.

Every train and evaluate reply passes through here before it is decoded, deserialized,
aggregated or counted into a metric. The adversary is a client (any one of them, or a
tampered device) that sends whatever bytes it likes in a well-formed Flower message:
records of the wrong kind, arrays in another serialization or dtype, a ``.npy`` header that
declares 2^33 elements, metrics with extra, missing, list-valued or non-finite entries, a
weight of 0 or 10^12, an update of huge norm, or a large record nobody asked for. What it
gets: a :class:`ReplyError` with the reason, raised to the strategy wrapper, which drops
that one reply, names its sender and goes on with the others. Nothing here allocates more
than the expected update before the reply passed its size check:

- :func:`record_size` gives the serialized size of a reply without serializing it (no second
  copy of a large record);
- :func:`npy_array` parses the ``.npy`` header itself and checks dtype, shape and length
  before it maps the array's bytes (zero-copy, read-only);
- :func:`read_metrics` returns only finite scalars; :func:`common_keys` normalises a
  round's metrics to the keys every usable reply reported, so a client's extra or missing
  key never reaches a Flower consistency check;
- :func:`clip_update` bounds one client's influence (its update's L2 norm), and
  :func:`check_magnitude` refuses an update that could make the aggregate non-finite.

The functions on arrays, bytes and dicts are framework-free; :func:`read_array_record`,
:func:`read_metrics` and :func:`record_size` read Flower's record types.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import config_record_to_proto, metric_record_to_proto
from flwr.proto.recorddict_pb2 import Array as ProtoArray
from flwr.proto.recorddict_pb2 import ArrayRecord as ProtoArrayRecord
from flwr.proto.recorddict_pb2 import ConfigRecord as ProtoConfigRecord
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

Layout = dict[str, tuple[tuple[int, ...], np.dtype]]
"""What the model allows: name -> (shape, dtype), in the model's order."""

NPY_STYPE = "numpy.ndarray"
NPY_MAGIC = b"\x93NUMPY"
NPY_HEADER_MAX = 4096
"""Largest ``.npy`` header accepted (numpy writes ~128 bytes, padded to 64)."""
SAFE_MAGNITUDE = 1e18
"""Largest |value| an update may hold: its square stays finite in float32 (3.4e38), as
FedAdam/FedYogi's second moments and the global model must."""
REPLY_SLACK_BYTES = 64 * 1024
"""Bytes a reply may carry beyond the fp32 update it stands for (metrics, names, headers)."""


class ReplyError(ValueError):
    """A client's reply cannot be used this round (the message says why)."""


def layout_of(arrays: Mapping[str, np.ndarray]) -> Layout:
    """The layout of the model the clients were sent."""
    return {k: (tuple(int(d) for d in v.shape), np.dtype(v.dtype)) for k, v in arrays.items()}


def layout_nbytes(layout: Layout) -> int:
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())


def max_reply_bytes(layout: Layout) -> int:
    """The largest reply accepted for a model of this layout: twice its fp32 size plus slack
    (a codec's payload is never larger than that; a plain reply is its size plus headers)."""
    return 2 * layout_nbytes(layout) + REPLY_SLACK_BYTES + 256 * len(layout)


# ---- arrays ----------------------------------------------------------------------------------
def _npy_header(data: bytes) -> tuple[dict[str, Any], int]:
    """The header dict of ``.npy`` bytes and where the array data starts; nothing allocated
    beyond the (bounded) header text."""
    if len(data) < 10 or data[:6] != NPY_MAGIC:
        raise ReplyError("array bytes are not .npy")
    major = data[6]
    if major == 1:
        size, start = int.from_bytes(data[8:10], "little"), 10
    elif major in (2, 3):
        size, start = int.from_bytes(data[8:12], "little"), 12
    else:
        raise ReplyError(f".npy format version {major} is not supported")
    if size > NPY_HEADER_MAX or start + size > len(data):
        raise ReplyError(".npy header too long or truncated")
    try:
        text = data[start : start + size].decode("latin1" if major < 3 else "utf8")
        header = ast.literal_eval(text)
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError):
        raise ReplyError(".npy header does not parse") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise ReplyError(".npy header lacks descr/fortran_order/shape")
    return header, start + size


def npy_array(data: object, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The array in ``.npy`` bytes that must hold exactly ``shape`` and ``dtype``.

    The header is parsed and checked (dtype exactly ``dtype``, no casting; C order; the shape;
    the byte count) before anything is allocated: a header declaring 2^33 elements costs
    nothing. The result is a read-only view of ``data``.
    """
    if not isinstance(data, bytes):
        raise ReplyError("array data is not bytes")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) > expected + NPY_HEADER_MAX + 12:
        raise ReplyError(f"array is {len(data)} bytes, the model's is {expected}")
    header, offset = _npy_header(data)
    try:
        descr = np.dtype(header["descr"])
    except (TypeError, ValueError):
        raise ReplyError(f".npy dtype {header['descr']!r} is not a dtype") from None
    if descr != dtype or descr.str != dtype.str:
        raise ReplyError(f"dtype {descr} where the model has {dtype}")
    if header["fortran_order"] is not False:
        raise ReplyError("array is not in C order")
    if header["shape"] != shape:
        raise ReplyError(f"shape {header['shape']} where the model has {shape}")
    if len(data) - offset != expected:
        raise ReplyError(f"array data is {len(data) - offset} bytes, expected {expected}")
    return np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)


def read_array_record(record: object, layout: Layout) -> dict[str, np.ndarray]:
    """The arrays of a reply's record, exactly the model's names, order, stype, dtype and
    shapes, all finite (raises :class:`ReplyError`)."""
    if not isinstance(record, ArrayRecord):
        raise ReplyError(f"weights are a {type(record).__name__}, not an ArrayRecord")
    if list(record.keys()) != list(layout):
        raise ReplyError("array names differ from the global model's")
    out: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in layout.items():
        array = record[name]
        if not isinstance(array, Array) or array.stype != NPY_STYPE:
            raise ReplyError(
                f"{name!r} is not a numpy array (stype {getattr(array, 'stype', None)!r})"
            )
        if array.dtype != dtype.name or tuple(array.shape) != shape:
            raise ReplyError(
                f"{name!r} is {array.dtype}{list(array.shape)}, not {dtype}{list(shape)}"
            )
        out[name] = npy_array(array.data, shape, dtype)
    if not all_finite(out):
        raise ReplyError("weights contain NaN or Inf")
    return out


def all_finite(arrays: Mapping[str, np.ndarray]) -> bool:
    return all(bool(np.isfinite(a).all()) for a in arrays.values())


# ---- metrics -------------------------------------------------------------------------------
def read_metrics(
    record: object, weight_key: str, max_weight: int | None = None, allow_zero: bool = False
) -> dict[str, int | float]:
    """A reply's metrics: finite int/float scalars (no lists), the weight a positive int
    (or 0 with ``allow_zero``: then the reply carries nothing and only the weight is
    returned), capped at ``max_weight`` — the most any client can honestly claim — so one
    client's claim cannot outweigh the others (raises :class:`ReplyError`)."""
    if not isinstance(record, MetricRecord):
        raise ReplyError("metrics are not a MetricRecord")
    weight = record.get(weight_key)
    if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
        raise ReplyError(f"{weight_key!r} is {weight!r}, not a non-negative integer")
    if weight == 0:
        if allow_zero:
            return {weight_key: 0}
        raise ReplyError(f"{weight_key!r} is 0")
    out: dict[str, int | float] = {}
    for key, value in record.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ReplyError(f"metric {key!r} is a {type(value).__name__}, not a number")
        if not math.isfinite(value):
            raise ReplyError(f"metric {key!r} is {value}")
        out[key] = value
    if max_weight is not None and weight > max_weight:
        out[weight_key] = int(max_weight)
    return out


def common_keys(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The metric keys every row reports, in the first row's order (what Flower aggregates)."""
    rows = list(rows)
    if not rows:
        return []
    shared = set(rows[0]).intersection(*rows[1:])
    return [k for k in rows[0] if k in shared]


# ---- influence -------------------------------------------------------------------------------
def update_norm(delta: Mapping[str, np.ndarray]) -> float:
    """L2 norm of an update, in float64 (finite for any finite float32 update)."""
    return math.sqrt(sum(float(np.square(a, dtype=np.float64).sum()) for a in delta.values()))


def clip_update(
    delta: Mapping[str, np.ndarray], bound: float
) -> tuple[dict[str, np.ndarray], float]:
    """``delta`` scaled to L2 norm at most ``bound`` (0: no bound) and its original norm."""
    norm = update_norm(delta)
    if bound <= 0 or norm <= bound:
        return dict(delta), norm
    scale = bound / norm
    return {
        k: (np.asarray(v, np.float64) * scale).astype(np.float32) for k, v in delta.items()
    }, norm


def check_magnitude(
    global_arrays: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]
) -> None:
    """Refuse an update that could make the aggregate non-finite: any |value| above
    :data:`SAFE_MAGNITUDE` (finite 3e38 values overflow as soon as they are summed or
    squared), checked per client so the others are kept."""
    for k, v in delta.items():
        peak = float(np.max(np.abs(v))) if v.size else 0.0
        ref = float(np.max(np.abs(global_arrays[k]))) if v.size else 0.0
        if not peak + ref <= SAFE_MAGNITUDE:
            raise ReplyError(f"update magnitude {peak:.3g} in {k!r} could overflow the aggregate")


# ---- size --------------------------------------------------------------------------------------
def _varint_len(n: int) -> int:
    return max(1, (int(n).bit_length() + 6) // 7)


def _field(payload: int, tag: int = 1) -> int:
    """Bytes of a length-delimited field holding ``payload`` bytes (tag bytes, length, data)."""
    return tag + _varint_len(payload) + payload


def _text_len(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


def _array_size(array: Array) -> int:
    meta = ProtoArray(dtype=array.dtype, shape=list(array.shape), stype=array.stype).ByteSize()
    n = len(array.data)
    return meta + (_field(n) if n else 0)


def _array_record_size(record: ArrayRecord) -> int:
    item = ProtoArrayRecord.Item
    return sum(_field(item(key=k).ByteSize() + _field(_array_size(v))) for k, v in record.items())


def _config_record_size(record: ConfigRecord) -> int:
    """Size of a ConfigRecord; bytes and strings are measured, not copied."""
    small: dict[str, Any] = {}
    total = 0
    item = ProtoConfigRecord.Item
    for k, v in record.items():
        if isinstance(v, bytes | str):
            value = _field(len(v) if isinstance(v, bytes) else _text_len(v))  # bytes/string (6/5)
        elif isinstance(v, list) and v and isinstance(v[0], bytes | str):
            inner = sum(_field(len(x) if isinstance(x, bytes) else _text_len(x)) for x in v)
            value = _field(inner, tag=2)  # bytes_list / string_list (26/25)
        else:
            small[k] = v
            continue
        total += _field(item(key=k).ByteSize() + _field(value))
    if small:
        total += config_record_to_proto(ConfigRecord(small)).ByteSize()
    return total


def record_size(content: RecordDict) -> int:
    """The serialized size of ``content`` (what ``recorddict_to_proto(content).ByteSize()``
    gives) without building a second copy of its arrays and byte strings."""
    item = ProtoRecordDict.Item
    total = 0
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            size = _array_record_size(record)
        elif isinstance(record, ConfigRecord):
            size = _config_record_size(record)
        elif isinstance(record, MetricRecord):
            size = metric_record_to_proto(record).ByteSize()
        else:  # RecordDict admits no other record type
            continue
        total += _field(item(key=key).ByteSize() + _field(size))
    return total
