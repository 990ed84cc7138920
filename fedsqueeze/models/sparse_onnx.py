"""Pruned weights stored sparse inside a standard ONNX file: one bitmap plus the kept values.

A pruned model's int8 artifact still stores every zero: one byte per weight, so 90% sparsity
saves nothing in the file (only zstd on the download notices). ONNX's own
``sparse_initializer`` does not help: the standard requires int64 COO indices (8 bytes per
kept int8 weight: a sparse tensor larger than the dense one; onnxruntime accepts narrower
indices, but ``onnx.checker`` refuses them and other runtimes need not accept them).

:func:`pack_sparse_initializers` rewrites the large, mostly-zero initializers ``W1 .. Wk`` of
one dtype (int8 weights of an int8 artifact, fp32 ones of an fp32 artifact) as ONE group: two
initializers for all of them and a few standard operators that rebuild each exactly::

    bits   uint8[B, 1]        kept positions of W1 .. Wk flattened and concatenated,
                              np.packbits order (MSB first), B = ceil(n / 8)
    values T[nnz + 1]         0, then the kept values in that order
    sizes  int64[k (+1)]      elements of each Wi (and the padding bits of the last byte)
    m   = Cast<int64>(Reshape(BitwiseAnd(BitShift(bits, [7..0]), 1), [-1]))
    W1 .. Wk (+pad) = Split(Gather(values, CumSum(m) * m), sizes)   # i -> 0 or its value
    Wi  = Reshape(Wi, shape_i)                                      # when Wi is not 1-D

Every input of that subgraph is a constant, so onnxruntime folds it into the dense tensors
when the session is created (its default graph optimisation level): the graph it runs — and
its outputs, bit for bit — are those of the unpacked file (tested). A runtime that does not
fold constants still computes the same weights, on every call. The file holds ``n/8 + nnz``
bytes per group instead of ``n`` (int8) or ``4n`` (fp32), and one set of seven unpacking
nodes for all tensors (a set per tensor was ~1 KB of a 90%-pruned int8 ``cnn1d``'s 8 KB
download); a group is packed only when that is smaller including its nodes. A very sparse
group's bitmap is considered once more (a second level). ``value_info`` (shape annotations
the runtime re-infers) is dropped and internal tensor names are shortened: together a third
of a small pruned model's file.

``half_floats = True`` (opt-in: it changes the outputs, so the exporter checks accuracy)
stores the 1-D fp32 constants — biases, per-channel quantization scales, an fp32 group's
kept values — as ONE fp16 vector, rebuilt by ``Split(Cast<float>(...))``.

:func:`byte_breakdown` says what a file's bytes (and each part's zstd bytes) are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PackReport", "byte_breakdown", "pack_sparse_initializers", "packed_bytes"]

MIN_ELEMENTS = 256
"""Smaller tensors (biases, scales) are never packed."""

NODE_OVERHEAD = 400
"""Bytes a group's unpacking nodes and constants add to the file (a group of one tensor;
measured: ~340-395)."""

TENSOR_OVERHEAD = 40
"""Bytes each further tensor of a group adds (its Split output, Reshape and shape)."""

HALF_MIN_ELEMENTS = 8
"""``half_floats`` leaves scalars and tiny vectors (activation scales) in fp32."""

_PACKABLE = (np.int8, np.uint8, np.float32)


@dataclass
class PackReport:
    """What :func:`pack_sparse_initializers` changed."""

    tensors: dict[str, dict[str, int]] = field(default_factory=dict)
    groups: int = 0
    half_floats: dict[str, int] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "format": "one bitmap + kept values per dtype, rebuilt by standard ONNX operators",
            "packed_tensors": self.tensors,
            "groups": self.groups,
            "half_floats": self.half_floats,
            "file_bytes_unpacked": self.bytes_before,
            "file_bytes_packed": self.bytes_after,
        }


def packed_bytes(values: np.ndarray) -> int:
    """Payload bytes of ``values`` packed alone (bitmap + kept values + the leading zero)."""
    nnz = int(np.count_nonzero(values))
    return (values.size + 7) // 8 + (nnz + 1) * values.dtype.itemsize


def pack_sparse_initializers(
    path: Path, out: Path | None = None, half_floats: bool = False
) -> PackReport:
    """Rewrite the ONNX file ``path`` (into ``out``, default in place) with its mostly-zero
    initializers packed (module docstring). Returns what was packed."""
    import onnx
    from onnx import numpy_helper

    out = out or path
    model = onnx.load(str(path))
    graph = model.graph
    report = PackReport(bytes_before=path.stat().st_size)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    del graph.value_info[:]
    graph_inputs = {i.name for i in graph.input}
    inits = {t.name: t for t in graph.initializer}
    arrays = {name: numpy_helper.to_array(t) for name, t in inits.items()}
    nodes: list[Any] = []
    candidates = [n for n in inits if n not in graph_inputs]
    for _level in range(2):  # the weights; then, once, the bitmaps of very sparse groups
        if opset < 18:  # BitwiseAnd
            break
        new_bits: list[str] = []
        for dtype in _PACKABLE:
            names = [
                n
                for n in candidates
                if n in arrays
                and arrays[n].dtype.type is dtype
                and arrays[n].size >= MIN_ELEMENTS
                and packed_bytes(arrays[n]) + TENSOR_OVERHEAD < arrays[n].nbytes
            ]
            saved = sum(arrays[n].nbytes - packed_bytes(arrays[n]) for n in names)
            if not names or saved <= NODE_OVERHEAD + TENSOR_OVERHEAD * (len(names) - 1):
                continue
            prefix = f"sp{report.groups}_"
            report.groups += 1
            group_inits, group_nodes = _packed(prefix, {n: arrays[n] for n in names})
            for n in names:
                report.tensors[n] = {
                    "elements": int(arrays[n].size),
                    "nonzeros": int(np.count_nonzero(arrays[n])),
                    "dense_bytes": int(arrays[n].nbytes),
                    "packed_bytes": packed_bytes(arrays[n]),
                }
                del inits[n], arrays[n]
            for name, array in group_inits.items():
                inits[name] = numpy_helper.from_array(array, name=name)
                arrays[name] = array
            nodes = group_nodes + nodes  # producers first (topological order)
            new_bits.append(prefix + "bits")
        candidates = new_bits
    if report.groups:
        for name, array in _shared_constants().items():
            inits[name] = numpy_helper.from_array(array, name=name)
    if half_floats:
        half = [
            n
            for n in inits
            if n not in graph_inputs
            and arrays.get(n, np.zeros(0)).dtype == np.float32
            and arrays[n].ndim == 1
            and arrays[n].size >= HALF_MIN_ELEMENTS
            and np.isfinite(arrays[n].astype(np.float16)).all()
        ]
        if half:
            blob = np.concatenate([arrays[n].astype(np.float16) for n in half])
            split = np.array([arrays[n].size for n in half], np.int64)
            for n in half:
                del inits[n]
            inits["hf_v"] = numpy_helper.from_array(blob, name="hf_v")
            inits["hf_sizes"] = numpy_helper.from_array(split, name="hf_sizes")
            nodes = [
                _node("Cast", ["hf_v"], ["hf_f"], to=1),  # FLOAT
                _node("Split", ["hf_f", "hf_sizes"], half, axis=0),
                *nodes,
            ]
            report.half_floats = {"tensors": len(half), "elements": int(blob.size)}
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old)
    del graph.initializer[:]
    graph.initializer.extend(inits.values())
    _short_names(graph)
    onnx.save(model, str(out))
    report.bytes_after = out.stat().st_size
    return report


def _node(op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> Any:
    from onnx import helper

    return helper.make_node(op, inputs, outputs, **attrs)


_SHARED = "sp_"
"""Prefix of the constants every group's nodes share."""


def _shared_constants() -> dict[str, np.ndarray]:
    return {
        _SHARED + "shifts": np.arange(7, -1, -1, dtype=np.uint8),  # np.packbits: MSB first
        _SHARED + "one": np.ones(1, np.uint8),
        _SHARED + "flat": np.array([-1], np.int64),
        _SHARED + "axis0": np.array(0, np.int64),
    }


def _packed(p: str, tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[Any]]:
    """Initializers and nodes rebuilding every tensor of ``tensors`` under its own name
    (``p``: this group's prefix)."""
    flat = np.concatenate([a.reshape(-1) for a in tensors.values()])
    kept = flat != 0
    bits = np.packbits(kept)
    sizes = [a.size for a in tensors.values()]
    pad = 8 * bits.size - flat.size
    inits = {
        p + "bits": bits.reshape(-1, 1),
        p + "v": np.concatenate([np.zeros(1, flat.dtype), flat[kept]]),
        p + "sizes": np.array(sizes + ([pad] if pad else []), np.int64),
    }
    s = _SHARED
    parts = [name if a.ndim == 1 else f"{p}{i}" for i, (name, a) in enumerate(tensors.items())] + (
        [p + "pad"] if pad else []
    )
    nodes = [
        _node("BitShift", [p + "bits", s + "shifts"], [p + "b"], direction="RIGHT"),
        _node("BitwiseAnd", [p + "b", s + "one"], [p + "c"]),
        _node("Reshape", [p + "c", s + "flat"], [p + "d"]),
        _node("Cast", [p + "d"], [p + "m"], to=7),  # INT64
        _node("CumSum", [p + "m", s + "axis0"], [p + "r"]),
        _node("Mul", [p + "r", p + "m"], [p + "i"]),
        _node("Gather", [p + "v", p + "i"], [p + "g"], axis=0),
        _node("Split", [p + "g", p + "sizes"], parts, axis=0),
    ]
    for i, (name, a) in enumerate(tensors.items()):
        if a.ndim != 1:
            inits[f"{p}s{i}"] = np.array(a.shape, np.int64)
            nodes.append(_node("Reshape", [f"{p}{i}", f"{p}s{i}"], [name]))
    return inits, nodes


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


def byte_breakdown(path: Path) -> dict[str, Any]:
    """What the ONNX file at ``path`` spends its bytes on, and each part's zstd size alone.

    Parts: ``kept_values`` (the values of packed groups), ``positions`` (their bitmaps, and
    a second level's bitmap and values),
    ``float_constants`` (float vectors and scalars: biases, scales, an fp16 blob of them),
    ``dense_weights`` (other initializers of >= 2 dimensions or ``MIN_ELEMENTS``),
    ``other_constants`` (shapes, zero points), ``nodes``, and ``framing`` (the rest:
    protobuf headers, inputs/outputs, opsets) so that the parts' ``file_bytes`` sum to the
    file's.
    """
    import onnx
    import zstandard
    from onnx import numpy_helper

    def zstd(data: bytes) -> int:
        return len(zstandard.ZstdCompressor(level=19).compress(data))

    raw = Path(path).read_bytes()
    graph = onnx.load_from_string(raw).graph
    producer = {o: n for n in graph.node for o in n.output}
    bits = {n.input[0] for n in graph.node if n.op_type == "BitShift"}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def rebuilds(name: str) -> set[str]:
        """The tensors a group's Gather output ``name`` becomes (through Split, Reshape)."""
        out: set[str] = set()
        for n in consumers.get(name, []):
            if n.op_type in ("Split", "Reshape"):
                for o in n.output:
                    out |= {o} | rebuilds(o)
        return out

    values: set[str] = set()
    bitmap_values: set[str] = set()
    for n in graph.node:
        idx = producer.get(n.input[1]) if n.op_type == "Gather" else None
        src = producer.get(idx.input[0]) if idx is not None and idx.op_type == "Mul" else None
        if src is not None and src.op_type == "CumSum":  # a group's kept values
            # a second level's "values" are the nonzero bytes of a first level's bitmap
            (bitmap_values if rebuilds(n.output[0]) & bits else values).add(n.input[0])
    bits |= bitmap_values
    parts: dict[str, list[bytes]] = {
        k: []
        for k in (
            "kept_values",
            "positions",
            "dense_weights",
            "float_constants",
            "other_constants",
        )
    }
    for t in graph.initializer:
        a = numpy_helper.to_array(t)
        if t.name in values:
            key = "kept_values"
        elif t.name in bits:
            key = "positions"
        elif a.dtype.kind == "f" and a.ndim <= 1:
            key = "float_constants"
        elif a.ndim >= 2 or a.size >= MIN_ELEMENTS:
            key = "dense_weights"
        else:
            key = "other_constants"
        parts[key].append(t.SerializeToString())
    parts["nodes"] = [n.SerializeToString() for n in graph.node]
    out: dict[str, Any] = {
        k: {"count": len(v), "file_bytes": sum(map(len, v)), "zstd_bytes": zstd(b"".join(v))}
        for k, v in parts.items()
    }
    out["framing"] = {"file_bytes": len(raw) - sum(p["file_bytes"] for p in out.values())}
    out["total"] = {"file_bytes": len(raw), "zstd_bytes": zstd(raw)}
    return out
