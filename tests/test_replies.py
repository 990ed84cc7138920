"""The reply validator (fedsqueeze.server.replies) on its own: every probe of a hostile reply
is refused with a ReplyError before anything is allocated, and nothing else ever escapes it.
"""

from __future__ import annotations

import io
import math
import tracemalloc

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.contracts.records import serialized_size, to_record
from fedsqueeze.server.replies import (
    SAFE_MAGNITUDE,
    ReplyError,
    check_magnitude,
    clip_update,
    common_keys,
    layout_of,
    npy_array,
    read_array_record,
    read_metrics,
    record_size,
    update_norm,
)

F32 = np.dtype("float32")
MODEL = {"w": np.zeros((6, 4), np.float32), "b": np.zeros(4, np.float32)}
LAYOUT = layout_of(MODEL)


def _npy(header: str, body: bytes = b"") -> bytes:
    """Hand-made .npy v1 bytes (any header text, any body)."""
    text = header.encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + body


def _array(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def test_model_arrays_round_trip_as_a_view() -> None:
    a = np.arange(24, dtype=np.float32).reshape(6, 4)
    out = npy_array(_array(a), (6, 4), F32)
    np.testing.assert_array_equal(out, a)
    assert not out.flags.writeable  # a view of the reply's bytes, not a copy


def test_header_declaring_2_pow_33_elements_allocates_nothing() -> None:
    """Finding 1: numpy's own loader allocates 32 GiB for this header before reading."""
    data = _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (8589934592,), }", b"\0" * 64)
    tracemalloc.start()
    with pytest.raises(ReplyError, match="shape"):
        npy_array(data, (24,), F32)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize(
    "data",
    [
        b"garbage, not an array at all",
        b"\x93NUMPY\x01\x00\xff\xff",  # header longer than the data
        _npy("{'descr': '|O', 'fortran_order': False, 'shape': (24,), }", b"\0" * 192),
        _npy("__import__('os').system('true')", b"\0" * 96),
        _npy("{'descr': '<f4', 'fortran_order': True, 'shape': (6, 4), }", b"\0" * 96),
        _npy("{'descr': '>f4', 'fortran_order': False, 'shape': (6, 4), }", b"\0" * 96),
        _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (6, 4), }", b"\0" * 95),
        _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (6, 4), }", b"\0" * 97),
        _npy("{'descr': '<f4', 'shape': (6, 4), }", b"\0" * 96),
        _array(np.zeros((6, 4), np.float64)),
    ],
    ids=[
        "garbage",
        "truncated",
        "object",
        "code",
        "fortran",
        "big-endian",
        "short",
        "long",
        "no-order",
        "float64",
    ],
)
def test_malformed_npy_is_refused(data: bytes) -> None:
    with pytest.raises(ReplyError):
        npy_array(data, (6, 4), F32)


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64, np.float16, np.float64])
def test_other_dtypes_are_refused_not_cast(dtype: type) -> None:
    """Finding 9: int32/bool/complex arrays were silently cast and averaged."""
    record = ArrayRecord({k: Array(np.zeros(v.shape, dtype)) for k, v in MODEL.items()})
    with pytest.raises(ReplyError, match="float32"):
        read_array_record(record, LAYOUT)


def _with(name: str, array: Array) -> ArrayRecord:
    record = to_record(MODEL)
    record[name] = array
    return record


@pytest.mark.parametrize(
    "record",
    [
        ConfigRecord({"w": 1.0}),  # "arrays" sent as a ConfigRecord
        MetricRecord({"w": 1.0}),
        to_record({"b": MODEL["b"], "w": MODEL["w"]}),  # another order
        to_record({"w": MODEL["w"]}),  # a missing array
        to_record({**MODEL, "x": MODEL["b"]}),  # an extra one
        _with("w", Array(dtype="float32", shape=(6, 4), stype="torch.Tensor", data=b"\0" * 96)),
        _with("w", Array(dtype="float32", shape=(4, 6), stype="numpy.ndarray", data=b"")),
        _with("w", Array(np.zeros((4, 6), np.float32))),
        _with("b", Array(np.full(4, np.nan, np.float32))),
        # metadata that lies about the bytes it describes
        _with("w", Array("float32", (6, 4), "numpy.ndarray", _array(np.zeros(24, np.float32)))),
    ],
    ids=[
        "config",
        "metric",
        "order",
        "missing",
        "extra",
        "stype",
        "no-data",
        "shape",
        "nan",
        "lying-meta",
    ],
)
def test_bad_array_records_are_refused(record: object) -> None:
    with pytest.raises(ReplyError):
        read_array_record(record, LAYOUT)


@pytest.mark.parametrize(
    "metrics",
    [
        {"num-examples": 5, "train-loss": [1.0, 2.0]},
        {"num-examples": 5, "train-loss": math.nan},
        {"num-examples": 5, "train-loss": math.inf},
        {"num-examples": 0},
        {"num-examples": -3},
        {"num-examples": 2.5},
        {"train-loss": 1.0},
    ],
    ids=["list-loss", "nan-loss", "inf-loss", "zero", "negative", "float", "missing"],
)
def test_bad_metrics_are_refused(metrics: dict) -> None:
    with pytest.raises(ReplyError):
        read_metrics(MetricRecord(metrics), "num-examples")


def test_metrics_claimed_weight_is_capped_and_zero_allowed_for_evaluation() -> None:
    out = read_metrics(MetricRecord({"num-examples": 10**12, "loss": 1.0}), "num-examples", 150)
    assert out == {"num-examples": 150, "loss": 1.0}
    assert read_metrics(MetricRecord({"num-examples": 0}), "num-examples", 150, True) == {
        "num-examples": 0
    }
    with pytest.raises(ReplyError):
        read_metrics(ConfigRecord({"num-examples": 3}), "num-examples")


def test_common_keys_are_what_every_reply_reports() -> None:
    rows = [{"n": 1, "loss": 1.0, "x": 2.0}, {"n": 1, "loss": 2.0}, {"loss": 0.5, "n": 3, "y": 1}]
    assert common_keys(rows) == ["n", "loss"]
    assert common_keys([]) == []


def test_clip_scales_large_updates_to_the_bound_and_keeps_small_ones() -> None:
    big = {k: np.full_like(v, 1e30) for k, v in MODEL.items()}
    clipped, norm = clip_update(big, 10.0)
    assert norm == pytest.approx(1e30 * math.sqrt(28), rel=1e-6)
    assert update_norm(clipped) == pytest.approx(10.0, rel=1e-5)
    small = {k: np.full_like(v, 0.1) for k, v in MODEL.items()}
    same, _ = clip_update(small, 10.0)
    assert all(np.array_equal(same[k], small[k]) for k in small)
    unbounded, _ = clip_update(big, 0.0)
    assert unbounded["w"][0, 0] == np.float32(1e30)


def test_magnitude_that_could_overflow_the_aggregate_is_refused() -> None:
    """Finding 3: finite 3e38 values made round 2's aggregate non-finite."""
    with pytest.raises(ReplyError, match="overflow"):
        check_magnitude(MODEL, {k: np.full_like(v, 3e38) for k, v in MODEL.items()})
    check_magnitude(MODEL, {k: np.full_like(v, SAFE_MAGNITUDE / 2) for k, v in MODEL.items()})


# ---- record_size: exact, and without a second copy ---------------------------------------------
_scalar = st.one_of(
    st.integers(-(2**62), 2**62),
    st.floats(allow_nan=False),
    st.booleans(),
    st.text(max_size=40),
    st.binary(max_size=300),
)
_config_value = st.one_of(
    _scalar,
    st.lists(st.binary(max_size=200), min_size=1, max_size=4),
    st.lists(st.text(max_size=20), min_size=1, max_size=4),
    st.lists(st.floats(allow_nan=False), min_size=1, max_size=4),
)
_keys = st.text(min_size=1, max_size=12)


@st.composite
def _contents(draw: st.DrawFn) -> RecordDict:
    content = RecordDict()
    for name in draw(st.lists(_keys, max_size=4, unique=True)):
        kind = draw(st.sampled_from(["array", "config", "metric"]))
        if kind == "array":
            arrays = draw(st.dictionaries(_keys, st.integers(0, 300), max_size=3))
            content[name] = ArrayRecord(
                {k: Array(np.zeros(n, np.float32)) for k, n in arrays.items()}
            )
        elif kind == "config":
            content[name] = ConfigRecord(draw(st.dictionaries(_keys, _config_value, max_size=4)))
        else:
            content[name] = MetricRecord(
                draw(st.dictionaries(_keys, st.floats(allow_nan=False) | st.integers(0, 2**60)))
            )
    return content


@settings(max_examples=200, deadline=None)
@given(_contents())
def test_record_size_equals_the_serialized_size(content: RecordDict) -> None:
    assert record_size(content) == serialized_size(content)


def test_record_size_of_a_large_record_makes_no_copy() -> None:
    """Finding 8: counting a reply's bytes serialized it a second time."""
    junk = b"\0" * (64 << 20)
    content = RecordDict({"junk": ConfigRecord({"x": junk, "y": [junk]}), "a": to_record(MODEL)})
    tracemalloc.start()
    size = record_size(content)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert size > 2 * len(junk)
    assert peak < 1 << 20


# ---- fuzz: the validator raises ReplyError or returns what the model allows -----------------
@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=400),
        st.builds(
            lambda d, f, s, body: _npy(
                f"{{'descr': {d!r}, 'fortran_order': {f}, 'shape': {s!r}, }}", body
            ),
            st.sampled_from(["<f4", ">f4", "<f8", "|O", "<i4", "|b1", "<c8", "V4", "zz"]),
            st.sampled_from([False, True, 0, "'x'"]),
            st.one_of(
                st.tuples(st.integers(-5, 2**40)),
                st.tuples(st.integers(0, 8), st.integers(0, 8)),
                st.just((6, 4)),
            ),
            st.binary(max_size=200),
        ),
    ),
    mutation=st.tuples(st.integers(0, 400), st.integers(0, 255)),
)
def test_fuzzed_npy_bytes_never_escape_as_anything_but_reply_error(
    data: bytes, mutation: tuple[int, int]
) -> None:
    pos, byte = mutation
    if data and pos < len(data):
        data = data[:pos] + bytes([byte]) + data[pos + 1 :]
    try:
        out = npy_array(data, (6, 4), F32)
    except ReplyError:
        return
    assert out.shape == (6, 4) and out.dtype == F32


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from(["float32", "float64", "int32", "bool", "object", "", "complex64"]),
    shape=st.lists(st.integers(0, 2**33), max_size=3).map(tuple),
    stype=st.sampled_from(["numpy.ndarray", "torch.Tensor", ""]),
    data=st.binary(max_size=200),
    values=st.dictionaries(_keys, _scalar | st.lists(st.floats(), min_size=1, max_size=3)),
)
def test_fuzzed_records_never_escape_as_anything_but_reply_error(
    dtype: str, shape: tuple[int, ...], stype: str, data: bytes, values: dict
) -> None:
    record = to_record(MODEL)
    record["w"] = Array(dtype=dtype, shape=shape, stype=stype, data=data)
    with pytest.raises(ReplyError):
        read_array_record(record, LAYOUT)
    try:
        metrics = MetricRecord(
            {k: v for k, v in values.items() if not isinstance(v, str | bytes | bool)}
        )
    except (TypeError, ValueError):
        return
    try:
        out = read_metrics(metrics, "num-examples", 100)
    except ReplyError:
        return
    assert 0 < out["num-examples"] <= 100
    assert all(isinstance(v, int | float) and math.isfinite(v) for v in out.values())
