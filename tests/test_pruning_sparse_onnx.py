"""A pruned artifact's weights stored as one bitmap + kept values per dtype rebuild the same
tensors, bit for bit, under onnxruntime (fedsqueeze.models.sparse_onnx); the byte breakdown
adds up; fp16 constants are the fp16-rounded values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from fedsqueeze.models.sparse_onnx import (
    MIN_ELEMENTS,
    NODE_OVERHEAD,
    byte_breakdown,
    pack_sparse_initializers,
    packed_bytes,
)

_ONNX_TYPE = {np.int8: TensorProto.INT8, np.float32: TensorProto.FLOAT}


def _graph_returning(weights: np.ndarray, path: Path, input_name: str = "x") -> Path:
    """A model whose output is ``weights + 0 * x``: the initializer itself, through an input
    (a graph whose output is a bare constant would be folded before any packing matters)."""
    t = _ONNX_TYPE[weights.dtype.type]
    nodes = [
        helper.make_node("Mul", [input_name, "zero"], ["xz"]),
        helper.make_node("Add", ["W", "xz"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(input_name, t, list(weights.shape))],
        [helper.make_tensor_value_info("y", t, list(weights.shape))],
        initializer=[
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(np.zeros((), weights.dtype), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def _run(path: Path, shape: tuple[int, ...], dtype: type, input_name: str = "x") -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["y"], {input_name: np.zeros(shape, dtype)})[0]


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 70),
    cols=st.integers(1, 90),
    density=st.floats(0.0, 0.3),
    dtype=st.sampled_from([np.int8, np.float32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_packed_tensor_is_rebuilt_exactly(
    tmp_path_factory, rows: int, cols: int, density: float, dtype: type, seed: int
) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (rows, cols)).astype(dtype)
    w[rng.random((rows, cols)) >= density] = 0
    path = _graph_returning(w, tmp_path_factory.mktemp("p") / "m.onnx")
    report = pack_sparse_initializers(path)
    np.testing.assert_array_equal(_run(path, w.shape, dtype), w)
    if "W" in report.tensors:  # packed only when it pays for its nodes
        assert report.tensors["W"]["packed_bytes"] == packed_bytes(w)
        assert report.bytes_after < report.bytes_before
    else:
        assert w.size < MIN_ELEMENTS or packed_bytes(w) + NODE_OVERHEAD >= w.nbytes


def test_a_very_sparse_tensors_bitmap_is_packed_too_and_the_file_shrinks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = np.zeros((64, 320), np.int8)  # cnn1d's fc1 at 99.5% sparsity
    w.flat[rng.choice(w.size, 100, replace=False)] = rng.integers(1, 127, 100)
    path = _graph_returning(w, tmp_path / "m.onnx")
    report = pack_sparse_initializers(path)
    assert set(report.tensors) == {"W", "sp0_bits"}  # two levels
    np.testing.assert_array_equal(_run(path, w.shape, np.int8), w)
    assert report.bytes_after < w.size / 8 + 100 + 1500  # below one level's bitmap + values


def test_a_dense_tensor_is_left_alone_and_short_names_avoid_the_graphs_own(tmp_path: Path) -> None:
    w = np.arange(1, 301, dtype=np.float32).reshape(10, 30)
    # "0", "1", ... are the short names: a graph input called "1" must keep its meaning
    path = _graph_returning(w, tmp_path / "m.onnx", input_name="1")
    report = pack_sparse_initializers(path)
    assert report.tensors == {}
    np.testing.assert_array_equal(_run(path, w.shape, np.float32, input_name="1"), w)


def _graph_returning_all(tensors: list[np.ndarray], path: Path) -> Path:
    """A model whose i-th output is ``tensors[i] + 0 * x_i`` (several initializers at once)."""
    nodes, inputs, outputs, inits = [], [], [], []
    for i, w in enumerate(tensors):
        t = _ONNX_TYPE[w.dtype.type]
        nodes += [
            helper.make_node("Mul", [f"x{i}", f"zero{i}"], [f"xz{i}"]),
            helper.make_node("Add", [f"W{i}", f"xz{i}"], [f"y{i}"]),
        ]
        inputs.append(helper.make_tensor_value_info(f"x{i}", t, list(w.shape)))
        outputs.append(helper.make_tensor_value_info(f"y{i}", t, list(w.shape)))
        inits += [
            numpy_helper.from_array(w, f"W{i}"),
            numpy_helper.from_array(np.zeros((), w.dtype), f"zero{i}"),
        ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, initializer=inits),
        opset_imports=[helper.make_opsetid("", 20)],
    )
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def _run_all(path: Path, tensors: list[np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {f"x{i}": np.zeros(w.shape, w.dtype) for i, w in enumerate(tensors)}
    return sess.run([f"y{i}" for i in range(len(tensors))], feed)


_shapes = st.lists(st.integers(1, 40), min_size=1, max_size=3)


@settings(max_examples=20, deadline=None)
@given(
    specs=st.lists(
        st.tuples(_shapes, st.floats(0.0, 0.4), st.sampled_from([np.int8, np.float32])),
        min_size=1,
        max_size=5,
    ),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_tensor_of_a_group_is_rebuilt_exactly(tmp_path_factory, specs, seed) -> None:  # type: ignore[no-untyped-def]
    """Random masks, shapes (1-3 dims, any length: bitmap padding) and dtypes, several
    tensors per file: each output is its initializer, bit for bit; one group per dtype."""
    rng = np.random.default_rng(seed)
    tensors = []
    for shape, density, dtype in specs:
        w = rng.integers(-127, 128, shape).astype(dtype)
        w[rng.random(shape) >= density] = 0
        tensors.append(w)
    path = _graph_returning_all(tensors, tmp_path_factory.mktemp("g") / "m.onnx")
    report = pack_sparse_initializers(path)
    for got, want in zip(_run_all(path, tensors), tensors, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    first_level = {n for n in report.tensors if n.startswith("W")}
    dtypes = {tensors[int(n[1:])].dtype for n in first_level}
    bitmaps = [n for n in onnx.load(str(path)).graph.node if n.op_type == "BitShift"]
    assert len(bitmaps) == report.groups >= len(dtypes)
    assert report.groups <= 2 * len(dtypes)  # a second level at most once per group


def test_tensors_of_one_dtype_share_one_bitmap_and_one_set_of_nodes(tmp_path: Path) -> None:
    """cnn1d's three pruned int8 weights: one group, eight unpacking nodes + a Reshape each
    (a set of ten nodes per tensor before), and a smaller file than packing them one by one."""
    rng = np.random.default_rng(0)
    tensors = []
    for shape in ((32, 32, 5), (32, 32, 3), (64, 320)):
        w = rng.integers(-127, 128, shape).astype(np.int8)
        w[rng.random(shape) >= 0.1] = 0
        tensors.append(w)
    path = _graph_returning_all(tensors, tmp_path / "m.onnx")
    report = pack_sparse_initializers(path)
    # one group for the weights; at 10% density its bitmap is packed once more (a second level)
    assert set(report.tensors) == {"W0", "W1", "W2", "sp0_bits"} and report.groups == 2
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("BitShift") == ops.count("Gather") == ops.count("Split") == 2
    assert len(ops) == 6 + 2 * 8 + 3 + 1  # the model's Mul/Add, 8 per group, the Reshapes
    alone = sum(
        pack_sparse_initializers(_graph_returning(w, tmp_path / f"{i}.onnx")).bytes_after
        for i, w in enumerate(tensors)
    )
    assert report.bytes_after < alone
    for got, want in zip(_run_all(path, tensors), tensors, strict=True):
        np.testing.assert_array_equal(got, want)


def test_byte_breakdown_names_the_payloads_and_adds_up(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    w = np.zeros((64, 320), np.int8)
    w.flat[rng.choice(w.size, 2000, replace=False)] = rng.integers(1, 127, 2000)
    bias = rng.normal(size=64).astype(np.float32)
    path = _graph_returning_all([w, bias], tmp_path / "m.onnx")
    pack_sparse_initializers(path)
    parts = byte_breakdown(path)
    total = parts.pop("total")
    assert total["file_bytes"] == path.stat().st_size
    assert sum(p["file_bytes"] for p in parts.values()) == total["file_bytes"]
    # payload + a few bytes of protobuf framing each
    assert 2001 <= parts["kept_values"]["file_bytes"] < 2001 + 40
    # 10% dense: the bitmap is packed once more, its own bitmap + nonzero bytes are positions
    assert parts["positions"]["count"] == 2
    assert w.size // 64 < parts["positions"]["file_bytes"] < w.size // 8
    assert 4 * 64 <= parts["float_constants"]["file_bytes"] < 4 * 64 + 60
    assert parts["nodes"]["count"] == 4 + 2 * (8 + 1)  # the model, two levels + Reshapes
    assert 0 < parts["kept_values"]["zstd_bytes"] <= total["zstd_bytes"]


def test_half_floats_store_the_fp16_rounded_constants_in_one_vector(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    scales = [rng.normal(size=n).astype(np.float32) for n in (32, 64, 10)]
    scalar = np.array(0.123456789, np.float32)  # below HALF_MIN_ELEMENTS: stays fp32
    tensors = [*scales, scalar]
    path = _graph_returning_all(tensors, tmp_path / "m.onnx")
    exact = pack_sparse_initializers(path, tmp_path / "exact.onnx")
    half = pack_sparse_initializers(path, half_floats=True)
    assert half.half_floats == {"tensors": 3, "elements": 106}
    got = _run_all(path, tensors)
    for g, w in zip(got[:3], scales, strict=True):
        np.testing.assert_array_equal(g, w.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got[3], scalar)
    assert half.bytes_after < exact.bytes_after - 2 * 106 + 100
