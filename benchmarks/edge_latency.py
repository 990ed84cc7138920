"""Edge latency: fp32 vs int8 ONNX artifacts of one run under onnxruntime, side by side.

Usage::

    python benchmarks/edge_latency.py RUN_DIR [--repeats 5] [--iters 300] [--out FILE.json]

Exports RUN_DIR's model (the student when the run has one) as fp32 and int8 ONNX
(``fedsqueeze.models.export``), then alternates fp32 and int8 measurements ``--repeats``
times (one onnxruntime thread, batch 1 and 32, p50/p95 after warm-up) so that both see the
same machine load, and reports the int8/fp32 p50 ratio as mean ± sd over the repeats.
Absolute milliseconds depend on the machine and its load; compare only the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fedsqueeze.federation import dataset_for
from fedsqueeze.models.export import export_run, latency_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--out")
    args = parser.parse_args()

    report = export_run(args.run_dir, int8=True, latency_iters=10)
    from fedsqueeze.models.export import load_run_model

    _, config, _ = load_run_model(Path(args.run_dir))
    sample = dataset_for(config).x_test[:64]
    paths = {k: Path(v["path"]) for k, v in report["artifacts"].items()}
    ratios: dict[str, list[float]] = {"batch1": [], "batch32": []}
    raw: list[dict[str, object]] = []
    for rep in range(args.repeats):
        for batch in (1, 32):
            fp32 = latency_ms(paths["fp32"], sample, batch, iters=args.iters)
            int8 = latency_ms(paths["int8"], sample, batch, iters=args.iters)
            ratios[f"batch{batch}"].append(int8["p50"] / fp32["p50"])
            raw.append({"repeat": rep, "batch": batch, "fp32": fp32, "int8": int8})
    print(
        f"model {report['model_name']} ({report['parameters']} parameters), "
        f"onnxruntime {report['onnxruntime_version']}, {report['cpu']}, 1 thread"
    )
    for kind, art in report["artifacts"].items():
        print(
            f"  {kind}: {art['file_bytes']} B file, {art['download_bytes']} B zstd, "
            f"acc {art['accuracy_onnxruntime']:.4f} (torch {report['accuracy_torch']:.4f})"
        )
    for key, vals in ratios.items():
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        print(f"  int8 / fp32 p50 latency, {key}: {statistics.mean(vals):.2f} ± {sd:.2f}")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"export": report, "ratios": ratios, "raw": raw}, indent=1)
        )


if __name__ == "__main__":
    main()
