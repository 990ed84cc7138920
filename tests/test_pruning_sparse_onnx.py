"""A pruned artifact's weights stored as bitmap + kept values rebuild the same tensor, bit for
bit, under onnxruntime (fedsqueeze.models.sparse_onnx)."""

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
