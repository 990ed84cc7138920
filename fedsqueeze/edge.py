"""On-device inference with an exported artifact: onnxruntime and numpy only.

No torch, no Flower: this module is what a Raspberry-Pi-class device needs to run the model
``fedsqueeze export`` wrote. ``python -m fedsqueeze.edge MODEL.onnx INPUT.npz`` (or
``fedsqueeze predict``) prints one predicted class per input row; ``--out PRED.npz`` writes
``pred`` (classes) and ``logits`` instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

INPUT_NAME = "x"
OUTPUT_NAME = "logits"


class EdgeError(ValueError):
    """An artifact or input file that cannot be used (one line, names the file)."""


SESSION_CONFIG = {"session.x64quantprecision": "1"}
"""onnxruntime session settings of every measurement here. On x86 CPUs without VNNI,
onnxruntime's default int8 GEMM multiplies u8 activations by s8 weights with pairwise int16
sums that saturate (measured: a QDQ MLP's logits off by up to 0.58, 4% of its predictions
changed, against 0.004 and none with this setting); ``x64quantprecision`` selects its
non-saturating path. It has no effect on ARM or VNNI CPUs, whose kernels do not saturate."""


def load(artifact: str | Path, threads: int = 1) -> Any:
    """An onnxruntime session for ``artifact`` (CPU, ``threads`` intra-op threads)."""
    import onnxruntime as ort

    path = Path(artifact)
    if not path.is_file():
        raise EdgeError(f"{path}: no such artifact")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    for key, value in SESSION_CONFIG.items():
        opts.add_session_config_entry(key, value)
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise EdgeError(f"{path}: not a loadable ONNX model ({type(err).__name__})") from None


def predict(session: Any, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits for ``x`` (shape ``(N, *input_shape)``; reshaped if only the size matches)."""
    shape = session.get_inputs()[0].shape[1:]
    x = np.ascontiguousarray(x, dtype=np.float32)
    if all(isinstance(d, int) for d in shape) and tuple(x.shape[1:]) != tuple(shape):
        if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
            raise EdgeError(f"inputs of shape {x.shape[1:]} do not fit the model's {tuple(shape)}")
        x = x.reshape(len(x), *shape)
    outs = [
        session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch_size]})[0]
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def read_inputs(path: str | Path) -> np.ndarray:
    """Array ``x`` of an ``.npz`` file."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as f:
            return np.asarray(f["x"], dtype=np.float32)
    except (OSError, ValueError, KeyError) as err:
        raise EdgeError(f"{p}: cannot read array 'x' ({err})") from None


def main(argv: Sequence[str] | None = None) -> int:
    """``predict ARTIFACT INPUT.npz [--out PRED.npz]``; exit 2 with one line on bad input."""
    parser = argparse.ArgumentParser(prog="fedsqueeze predict", description=__doc__.split("\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("inputs", help=".npz with array x")
    parser.add_argument("--out", help="write pred and logits to this .npz instead of printing")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        logits = predict(load(args.artifact, args.threads), read_inputs(args.inputs))
    except EdgeError as err:
        print(f"fedsqueeze: error: {err}", file=sys.stderr)
        return 2
    pred = logits.argmax(axis=1) if logits.size else np.zeros(0, np.int64)
    if args.out:
        np.savez(args.out, pred=pred, logits=logits)
    else:
        sys.stdout.write("".join(f"{int(c)}\n" for c in pred))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
