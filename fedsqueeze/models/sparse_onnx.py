"""Pruned weights stored sparse inside a standard ONNX file: a bitmap plus the kept values.

A pruned model's int8 artifact still stores every zero: one byte per weight, so 90% sparsity
saves nothing in the file (only zstd on the download notices). ONNX's own
``sparse_initializer`` does not help: the standard requires int64 COO indices (8 bytes per
kept int8 weight: a sparse tensor larger than the dense one; onnxruntime accepts narrower
indices, but ``onnx.checker`` refuses them and other runtimes need not accept them).

:func:`pack_sparse_initializers` rewrites each large, mostly-zero initializer ``W`` (int8
weights of an int8 artifact, fp32 ones of an fp32 artifact) as two initializers and a few
standard operators that rebuild it exactly::

    bits   uint8[ceil(n/8)]   the kept positions, np.packbits order (MSB first)
    values T[nnz + 1]         0, then the kept values in row-major order
    m   = Cast<int64>(Slice(Reshape(BitwiseAnd(BitShift(bits[:, None], [7..0]), 1)), 0, n))
    W   = Reshape(Gather(values, CumSum(m) * m), shape)     # position i -> 0 or its value

Every input of that subgraph is a constant, so onnxruntime folds it into the dense ``W`` when
the session is created (its default graph optimisation level): the graph it runs — and its
outputs, bit for bit — are those of the unpacked file (tested). A runtime that does not fold
constants still computes the same weights, on every call. The file then holds ``n/8 + nnz``
bytes per tensor instead of ``n`` (int8) or ``4n`` (fp32); a tensor is packed only when that
is smaller including the ~0.5 KB of nodes it adds. ``value_info`` (shape annotations the
runtime re-infers) is dropped and internal tensor names are shortened: together a third of
a small pruned model's file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["PackReport", "pack_sparse_initializers", "packed_bytes"]

MIN_ELEMENTS = 256
"""Smaller tensors (biases, scales) are left alone: the nodes would cost more than they save."""

NODE_OVERHEAD = 400
"""Bytes the rebuilding nodes and their constants add to the file per packed tensor (measured:
~300, plus ~150 once for the constants they share)."""

_PACKABLE = (np.int8, np.uint8, np.float32)


@dataclass
class PackReport:
    """What :func:`pack_sparse_initializers` changed."""

    tensors: dict[str, dict[str, int]] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "format": "bitmap + kept values, rebuilt by standard ONNX operators",
            "packed_tensors": self.tensors,
            "file_bytes_unpacked": self.bytes_before,
            "file_bytes_packed": self.bytes_after,
        }


def packed_bytes(values: np.ndarray) -> int:
    """Payload bytes of ``values`` packed (bitmap + kept values + the leading zero)."""
    nnz = int(np.count_nonzero(values))
    return (values.size + 7) // 8 + (nnz + 1) * values.dtype.itemsize


def pack_sparse_initializers(path: Path, out: Path | None = None) -> PackReport:
    """Rewrite the ONNX file ``path`` (into ``out``, default in place) with its mostly-zero
    initializers packed (module docstring). Returns what was packed."""
    import onnx
    from onnx import helper, numpy_helper

    out = out or path
    model = onnx.load(str(path))
    graph = model.graph
    report = PackReport(bytes_before=path.stat().st_size)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    del graph.value_info[:]
    graph_inputs = {i.name for i in graph.input}
    keep, nodes = [], []
    todo = list(graph.initializer)
    while todo:  # a packed tensor's bitmap is considered too (two levels for very sparse ones)
        init = todo.pop(0)
        values = numpy_helper.to_array(init)
        dense = values.size * values.dtype.itemsize
        if (
            opset < 18  # BitwiseAnd
            or init.name in graph_inputs  # an overridable initializer is an input: leave it
            or values.dtype.type not in _PACKABLE
            or values.size < MIN_ELEMENTS
            or packed_bytes(values) + NODE_OVERHEAD >= dense
        ):
            keep.append(init)
            continue
        prefix = f"sp{len(report.tensors)}_"
        new_inits, new_nodes = _packed(init.name, prefix, values, helper, numpy_helper)
        todo = new_inits[:1] + todo
        keep.extend(new_inits[1:])
        nodes = new_nodes + nodes
        report.tensors[init.name] = {
            "elements": int(values.size),
            "nonzeros": int(np.count_nonzero(values)),
            "dense_bytes": dense,
            "packed_bytes": packed_bytes(values),
        }
    if report.tensors:
        keep.extend(_shared_constants(numpy_helper))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    # the rebuilt tensors keep their names; their producers go first (topological order)
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old)
    _short_names(graph)
    onnx.save(model, str(out))
    report.bytes_after = out.stat().st_size
    return report


def _short_names(graph) -> None:  # type: ignore[no-untyped-def]
    """Internal tensor names as short ids, nodes unnamed: the exporter's descriptive names
    are a quarter of a pruned int8 file. The graph's inputs and outputs keep theirs; a graph
    with subgraphs (If/Loop bodies may refer to outer names) is left as it is."""
    if any(a.type in (5, 10) for n in graph.node for a in n.attribute):  # GRAPH, GRAPHS
        return
    fixed = {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name in fixed:
            return name
        if name not in names:
            new = np.base_repr(len(names), 36).lower()
            names[name] = new + "_" if new in fixed else new
        return names[name]

    for init in graph.initializer:
        init.name = short(init.name)
    for n in graph.node:
        n.name = ""
        n.doc_string = ""
        n.input[:] = [short(i) for i in n.input]
        n.output[:] = [short(o) for o in n.output]


_SHARED = "sp_"
"""Prefix of the constants every packed tensor's nodes share."""


def _shared_constants(numpy_helper):  # type: ignore[no-untyped-def]
    return [
        numpy_helper.from_array(array, name=_SHARED + name)
        for name, array in (
            ("shifts", np.arange(7, -1, -1, dtype=np.uint8)),  # np.packbits: MSB first
            ("one", np.ones(1, np.uint8)),
            ("axes", np.array([1], np.int64)),
            ("flat", np.array([-1], np.int64)),
            ("zero", np.array([0], np.int64)),
            ("axis0", np.array(0, np.int64)),
        )
    ]


def _packed(name: str, p: str, values: np.ndarray, helper, numpy_helper) -> tuple[list, list]:  # type: ignore[no-untyped-def]
    """Initializers and nodes rebuilding ``values`` as ``name`` (``p``: this tensor's prefix)."""
    flat = values.reshape(-1)
    kept = flat != 0
    inits = [
        numpy_helper.from_array(np.packbits(kept), name=p + "bits"),
        numpy_helper.from_array(np.concatenate([np.zeros(1, flat.dtype), flat[kept]]), p + "v"),
        numpy_helper.from_array(np.array([flat.size], np.int64), name=p + "n"),
        numpy_helper.from_array(np.array(values.shape, np.int64), name=p + "shape"),
    ]
    s = _SHARED

    def node(op: str, inputs: list[str], output: str, **attrs):  # type: ignore[no-untyped-def]
        return helper.make_node(op, inputs, [output], **attrs)

    nodes = [
        node("Unsqueeze", [p + "bits", s + "axes"], p + "a"),
        node("BitShift", [p + "a", s + "shifts"], p + "b", direction="RIGHT"),
        node("BitwiseAnd", [p + "b", s + "one"], p + "c"),
        node("Reshape", [p + "c", s + "flat"], p + "d"),
        node("Slice", [p + "d", s + "zero", p + "n"], p + "e"),
        node("Cast", [p + "e"], p + "m", to=7),  # INT64
        node("CumSum", [p + "m", s + "axis0"], p + "r"),
        node("Mul", [p + "r", p + "m"], p + "i"),
        node("Gather", [p + "v", p + "i"], p + "g", axis=0),
        node("Reshape", [p + "g", p + "shape"], name),
    ]
    return inits, nodes
