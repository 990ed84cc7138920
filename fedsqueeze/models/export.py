"""Edge export: a run's final model (or its distilled student) as an ONNX artifact.

``export_run`` rebuilds the model from a run directory, exports it with ``torch.onnx``
(the dynamo exporter, one self-contained file: ``external_data=False``), optionally
quantizes it to int8 with onnxruntime's static QDQ quantization calibrated on server-side
data, checks the artifact under onnxruntime against the torch model, and writes
``export.json`` beside it.

Calibration data, in order of preference: the run's public distillation transfer data
(``distill-data`` or the dataset's built-in slice, which no client holds); otherwise the
first ``calib`` samples of the test split (the report says which — those samples only set
activation ranges, but the reported int8 accuracy then includes them).

A run trained with quantization-aware training (``qat = "int8"``) is exported with its own
scales instead (:func:`quantize_qat`): the int8 model the server evaluated every round
(:mod:`fedsqueeze.models.qat`), so the artifact's accuracy is the one the federation
reported; ``export.json`` records ``int8_method``.

A magnitude-pruned run's artifacts (fp32 and int8) store their mostly-zero weight tensors as
one bitmap plus the kept values per dtype, rebuilt by standard operators that onnxruntime
folds into the dense tensors when the session starts (:mod:`fedsqueeze.models.sparse_onnx`):
the file shrinks with the sparsity, the outputs are bit-identical (checked on the whole test
split; the export fails otherwise). ``export.json`` gives each artifact's bytes before and
after and its ``byte_breakdown``; ``fp16_constants`` (``--fp16-constants``) trades exactness
for fp16 biases and scales in the int8 artifact, checked by top-1 agreement.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsqueeze.edge import SESSION_CONFIG
from fedsqueeze.models.sparse_onnx import byte_breakdown

__all__ = [
    "ExportError",
    "calibration_data",
    "export_onnx",
    "export_run",
    "latency_ms",
    "quantize",
    "quantize_qat",
    "quantize_static",
    "run_onnx",
]

INPUT_NAME = "x"
OUTPUT_NAME = "logits"


class ExportError(ValueError):
    """A run directory that cannot be exported (one line, names the file)."""


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """Write ``model`` as a single-file ONNX graph with a dynamic batch axis."""
    model = model.eval()
    example = torch.zeros((2, *input_shape), dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        external_data=False,
        dynamo=True,
        verbose=False,
    )
    compact_onnx(path)
    return path


def compact_onnx(path: Path) -> Path:
    """Rewrite ``path`` without the exporter's metadata (per node: source locations, module
    names, half of a small model's file; per graph: its signature) and with every
    quantize/dequantize node holding its own scale and zero-point initializers: the exporter
    shares equal constants (the all-zero weight zero points of two 32-channel layers), and
    onnxruntime 1.32's x86 int8 weight transform then fails to load the model ("Attempt to
    replace the existing tensor")."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    # the exporter's graph signature and per-input notes (~2 KB of a pruned int8 file), the
    # quantizer's notes and the opset imports of domains no node uses
    del graph.metadata_props[:], model.metadata_props[:]
    for value in (*graph.input, *graph.output):
        del value.metadata_props[:]
    nodes = [*graph.node, *(n for f in model.functions for n in f.node)]
    domains = {n.domain or "ai.onnx" for n in nodes} | {"ai.onnx"}
    opsets = [o for o in model.opset_import if (o.domain or "ai.onnx") in domains]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    inits = {t.name: t for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        del node.metadata_props[:]
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i in (1, 2):
            name = node.input[i] if i < len(node.input) else ""
            if name not in inits:
                continue
            if name in used:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}_{node.name or len(graph.initializer)}"
                graph.initializer.append(copy)
                node.input[i] = copy.name
            used.add(node.input[i])
    onnx.save(model, str(path))
    return path


def _session(path: Path, threads: int = 1) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    for key, value in SESSION_CONFIG.items():
        opts.add_session_config_entry(key, value)
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of the artifact at ``path`` for ``x`` under onnxruntime (one thread)."""
    sess = _session(path)
    x = np.ascontiguousarray(x, dtype=np.float32)
    outs = [
        sess.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch_size]})[0]
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def quantize(
    fp32: Path,
    out: Path,
    config: Mapping[str, Any],
    calib: int = 512,
    run_dir: Path | None = None,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """Write the int8 artifact ``out``; the report fields saying how it was made.

    The global model of a run trained with QAT (``qat = "int8"``; ``model`` and ``run_dir``
    given) is exported with its own scales (:func:`quantize_qat`); any other model (a
    distilled student was not trained with QAT) by onnxruntime's static QDQ quantization of the
    fp32 artifact ``fp32`` calibrated on the server's calibration data (:func:`quantize_static`).
    """
    if str(config.get("qat", "none")) != "none" and run_dir is not None and model is not None:
        return quantize_qat(run_dir, model, out, config)
    cal, source = calibration_data(config, calib)
    quantize_static(fp32, out, cal)
    return {
        "int8_method": "onnxruntime static QDQ (post-training), per-channel weights",
        "calibration": f"{len(cal)} samples: {source}",
    }


def quantize_qat(
    run_dir: Path, model: nn.Module, out: Path, config: Mapping[str, Any]
) -> dict[str, Any]:
    """The int8 model the QAT federation evaluated (its activation scales from the run's
    checkpoint, :mod:`fedsqueeze.server.qat`) as an ONNX QDQ graph with int8 weights."""
    from fedsqueeze.federation import dataset_for
    from fedsqueeze.models.qat import QATError, int8_model
    from fedsqueeze.models.weights import evaluate
    from fedsqueeze.server.rundir import RunDir

    ckpt = RunDir(run_dir).load_checkpoint()
    state = ckpt.extra.get("hooks", {}).get("qat", {}) if ckpt is not None else {}
    if not state.get("scales"):
        raise ExportError(f"{run_dir}: a QAT run needs its checkpoint.npz (the QAT scales)")
    scales = {k: (float(v[0]), int(v[1])) for k, v in state["scales"].items()}
    try:
        int8 = int8_model(model, scales)
    except QATError as err:
        raise ExportError(f"{run_dir}: {err}") from None
    ds = dataset_for(config)
    export_onnx(int8, ds.input_shape, out)
    logits = int8(torch.from_numpy(ds.x_test)).detach().numpy()
    onnx_logits = run_onnx(out, ds.x_test)
    last = state.get("last", {})
    return {
        "int8_method": "QAT scales: per-channel symmetric int8 weights, activation scales "
        "calibrated by the server (run checkpoint)",
        "calibration": str(state.get("calibration", "")),
        "accuracy_int8_torch": evaluate(int8, ds.x_test, ds.y_test)[1],
        "accuracy_int8_federation": last.get("int8_accuracy"),
        "int8_agreement_with_int8_torch": float((onnx_logits.argmax(1) == logits.argmax(1)).mean()),
        "int8_max_abs_diff_int8_torch": float(np.abs(onnx_logits - logits).max()),
    }


def quantize_static(fp32: Path, out: Path, calib: np.ndarray) -> Path:
    """Static int8 QDQ quantization (per-channel weights) calibrated on ``calib``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            data = np.ascontiguousarray(calib, dtype=np.float32)
            self._it = iter([{INPUT_NAME: data[i : i + 32]} for i in range(0, len(data), 32)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    pre = out.with_name(out.stem + ".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
        compact_onnx(out)
    finally:
        pre.unlink(missing_ok=True)
    return out


def latency_ms(
    path: Path, x: np.ndarray, batch: int, iters: int = 200, warmup: int = 20
) -> dict[str, float]:
    """p50/p95 latency (ms) of one onnxruntime run at ``batch``, one thread, after warm-up."""
    sess = _session(path)
    reps = int(np.ceil(batch / max(len(x), 1)))
    feed = {INPUT_NAME: np.ascontiguousarray(np.tile(x, (reps,) + (1,) * (x.ndim - 1))[:batch])}
    for _ in range(warmup):
        sess.run([OUTPUT_NAME], feed)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sess.run([OUTPUT_NAME], feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"p50": float(np.percentile(times, 50)), "p95": float(np.percentile(times, 95))}


def artifact_bytes(path: Path) -> int:
    """Bytes of the artifact and of any external-data file beside it."""
    extra = path.with_name(path.name + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)


def download_bytes(path: Path) -> int:
    """zstd-compressed size of the artifact: what a device fetches."""
    import zstandard

    return len(zstandard.ZstdCompressor(level=19).compress(path.read_bytes()))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_run_model(run_dir: Path) -> tuple[nn.Module, dict[str, Any], str]:
    """The model to export from ``run_dir`` (the student if the run has one), its run config,
    and which model it is (``"global"`` or ``"student"``)."""
    from fedsqueeze.config import ConfigError, load_toml, resolve_config
    from fedsqueeze.federation import dataset_for
    from fedsqueeze.models import build_model
    from fedsqueeze.models.weights import load_numpy_state

    cfg_path, model_path = run_dir / "config.toml", run_dir / "model.pt"
    if not cfg_path.is_file() or not model_path.is_file():
        raise ExportError(f"{run_dir}: not a run directory (no config.toml / model.pt)")
    try:
        base = load_toml(cfg_path)
        base.pop("out-dir", None)
        config = resolve_config(base)
    except ConfigError as err:
        raise ExportError(f"{cfg_path}: {err}") from None
    ds = dataset_for(config)
    student = _student_arrays(run_dir) if config["distill"] == "student" else None
    name, which = str(config["model"]), "global"
    if student is not None:
        arrays, name, which = student, str(config["student-model"]), "student"
    else:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
        arrays = {k: v.numpy() for k, v in state.items()}
    model = build_model(name, ds.input_shape, ds.num_classes)
    load_numpy_state(model, arrays)
    if str(config["prune"]) == "channel" and which == "global":
        from fedsqueeze.models.channels import shrink_zero_channels

        model = shrink_zero_channels(model)  # pruned channels physically gone, same outputs
    return model.eval(), config, which


def _student_arrays(run_dir: Path) -> dict[str, np.ndarray] | None:
    """The student's weights from the server's checkpoint (hook state ``distill``)."""
    from fedsqueeze.server.distill import STUDENT_STATE
    from fedsqueeze.server.rundir import RunDir

    ckpt = RunDir(run_dir).load_checkpoint()
    if ckpt is None:
        raise ExportError(
            f"{run_dir}: a student run needs its checkpoint.npz to export the student"
        )
    state = ckpt.extra.get("hooks", {}).get("distill", {})
    arrays = state.get(STUDENT_STATE)
    return dict(arrays) if arrays is not None else None


def calibration_data(config: Mapping[str, Any], limit: int = 512) -> tuple[np.ndarray, str]:
    """Server-side calibration inputs and where they come from (module docstring); the QAT
    server hook calibrates its activation ranges on the same data."""
    from fedsqueeze.distill import DistillError, load_transfer_data
    from fedsqueeze.federation import dataset_for

    ds = dataset_for(config)
    try:
        x = load_transfer_data(str(config["distill-data"]), str(config["dataset"]), ds.input_shape)
        return x[:limit], "public transfer data"
    except DistillError:
        return ds.x_test[:limit], f"first {min(limit, len(ds.x_test))} test samples"


def export_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    int8: bool = False,
    calib: int = 512,
    latency_iters: int = 200,
    fp16_constants: bool = False,
) -> dict[str, Any]:
    """Export ``run_dir``'s model to ONNX (and int8 with ``int8``); write ``export.json``.

    ``fp16_constants``: the int8 artifact stores its biases and per-channel scales in fp16
    (``half_floats`` of :mod:`fedsqueeze.models.sparse_onnx`), kept only when its top-1
    agreement with the exact artifact on the test split is at least ``HALF_MIN_AGREEMENT``.
    Returns the report (also written as ``export.json`` beside the artifact).
    """
    from fedsqueeze.federation import dataset_for
    from fedsqueeze.models.weights import evaluate
    from fedsqueeze.models.zoo import count_parameters

    run_dir = Path(run_dir)
    model, config, which = load_run_model(run_dir)
    ds = dataset_for(config)
    if out is None:
        fp32_path = run_dir / "model.onnx"
        target = run_dir / "model.int8.onnx" if int8 else fp32_path
    else:
        target = Path(out)
        fp32_path = target.with_name(target.stem + ".fp32.onnx") if int8 else target
    export_onnx(model, ds.input_shape, fp32_path)

    torch_logits = model(torch.from_numpy(ds.x_test)).detach().numpy()
    torch_acc = evaluate(model, ds.x_test, ds.y_test)[1]
    params = count_parameters(model)
    nonzeros = int(sum(int((p != 0).sum()) for p in model.parameters()))
    fp32_bytes = 4 * params
    report: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model": which,
        "model_name": str(config["student-model"] if which == "student" else config["model"]),
        "parameters": params,
        "nonzeros": nonzeros,
        "fp32_model_bytes": fp32_bytes,
        "accuracy_torch": torch_acc,
        "onnxruntime_version": _ort_version(),
        "onnxruntime_session_config": SESSION_CONFIG,
        "cpu": _cpu_model(),
        "threads": 1,
        "artifacts": {},
    }
    variants = [("fp32", fp32_path)]
    if int8:
        qat_model = model if which == "global" else None
        report.update(quantize(fp32_path, target, config, calib, run_dir, qat_model))
        variants.append(("int8", target))
    sample = ds.x_test[:64]
    for kind, path in variants:
        logits = run_onnx(path, ds.x_test)
        entry: dict[str, Any] = {}
        sparse = str(config["prune"]) == "magnitude" and which == "global"
        half = fp16_constants and kind == "int8"
        if sparse or half:
            entry["sparse_packing"] = _pack(path, logits, ds.x_test, half)
            logits = run_onnx(path, ds.x_test)  # the same unless fp16 constants were kept
        entry["byte_breakdown"] = byte_breakdown(path)
        entry |= {
            "path": str(path),
            "file_bytes": artifact_bytes(path),
            "download_bytes": download_bytes(path),
            "accuracy_onnxruntime": float((logits.argmax(1) == ds.y_test).mean()),
            "agreement_with_torch": float((logits.argmax(1) == torch_logits.argmax(1)).mean()),
            "max_abs_diff_logits": float(np.abs(logits - torch_logits).max()),
            "latency_ms": {
                f"batch{b}": latency_ms(path, sample, b, iters=latency_iters) for b in (1, 32)
            },
        }
        entry["ratio_to_fp32_model"] = fp32_bytes / entry["download_bytes"]
        entry["file_ratio_to_fp32_model"] = fp32_bytes / entry["file_bytes"]
        report["artifacts"][kind] = entry
    report["artifact"] = str(target)
    (target.parent / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


HALF_MIN_AGREEMENT = 0.995
"""Top-1 agreement with the exact artifact an fp16-constants artifact needs to be kept (so its
accuracy is within 0.5 pp of the exact one's)."""


def _pack(path: Path, logits: np.ndarray, x: np.ndarray, half: bool = False) -> dict[str, Any]:
    """Store the pruned artifact's zeros as bitmaps (:mod:`fedsqueeze.models.sparse_onnx`);
    refuse to leave an artifact whose outputs differ from the unpacked one's in any bit.
    ``half``: then try fp16 constants; kept only at ``HALF_MIN_AGREEMENT`` with ``logits``."""
    from fedsqueeze.models.sparse_onnx import pack_sparse_initializers

    unpacked = path.read_bytes()
    report = pack_sparse_initializers(path)
    if not np.array_equal(run_onnx(path, x), logits):
        path.write_bytes(unpacked)
        raise ExportError(f"{path}: the sparse-packed artifact's outputs differ; left unpacked")
    out = report.as_dict() | {"outputs_identical_to_unpacked": True}
    if not half:
        return out
    exact = path.read_bytes()
    path.write_bytes(unpacked)
    half_report = pack_sparse_initializers(path, half_floats=True)
    agreement = float((run_onnx(path, x).argmax(1) == logits.argmax(1)).mean())
    if agreement < HALF_MIN_AGREEMENT:
        path.write_bytes(exact)
        return out | {"half_floats_refused": {"agreement_with_exact": agreement}}
    return half_report.as_dict() | {
        "outputs_identical_to_unpacked": False,
        "agreement_with_exact": agreement,
        "file_bytes_exact": len(exact),
    }


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)
