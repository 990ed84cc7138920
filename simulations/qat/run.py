"""Quantization-aware training against post-training quantization, side by side.

    python simulations/qat/run.py [--tasks digits-mlp mnist1d-cnn1d] [--seeds 0 1]
        [--only none int8] [--rounds 15] [--runs runs/qat] [--table]

For each task and seed, two federations through fedsqueeze's round loop (``run_federation``:
the same strategy chain, client mods and ClientApp as ``fedsqueeze simulate``) over an
in-process grid (as ``simulations/pruning/run.py``: on a shared 2-core machine Ray spends
most of a round scheduling actors; the Flower messages and their bytes are the same):

- ``none``: fp32 FedAvg, then ``fedsqueeze export --int8`` = onnxruntime static QDQ
  (post-training quantization calibrated on the server's calibration data);
- ``int8``: the same federation with ``qat = "int8"``, then ``fedsqueeze export --int8`` =
  the QAT scales.

Records fp32 accuracy (torch), the federation's int8 accuracy per round (QAT runs), the
int8 artifact's accuracy under onnxruntime and its bytes, into
``simulations/results/qat/results.json``; ``--table`` prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

TASKS: dict[str, dict[str, Any]] = {
    "digits-mlp": {"dataset": "digits", "model": "mlp", "local-epochs": 2},
    "mnist1d-cnn1d": {"dataset": "mnist1d", "model": "cnn1d", "local-epochs": 2},
}
BASE: dict[str, Any] = {"num-clients": 5, "clients-per-round": 5, "partition": "iid"}
RESULTS = ROOT / "simulations" / "results" / "qat" / "results.json"


def run_one(task: str, qat: str, seed: int, rounds: int, runs: Path) -> dict[str, Any]:
    from flwr.supercore.task_identity import TaskIdentity

    from fedsqueeze.client.app import build_client_app
    from fedsqueeze.config import resolve_config
    from fedsqueeze.inprocess import InProcessGrid
    from fedsqueeze.server.rounds import run_federation
    from fedsqueeze.server.rundir import RunDir

    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1
    extra: dict[str, Any] = {"num-rounds": rounds, "seed": seed}
    if qat != "none":
        extra["qat"] = qat
    cfg = resolve_config(BASE, TASKS[task], extra)
    out = runs / f"{task}-{qat}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    grid = InProcessGrid(build_client_app(cfg), int(cfg["num-clients"]))
    run_federation(grid, cfg, RunDir(out), node_timeout=600)
    return record(task, qat, seed, out)


def record(task: str, qat: str, seed: int, out: Path) -> dict[str, Any]:
    """Export ``out`` (``--int8``) and collect its figures."""
    from fedsqueeze.models.export import export_run
    from fedsqueeze.server.rundir import RunDir

    summary = json.loads((out / "summary.json").read_text())
    rows = RunDir(out).read_metrics()
    report = export_run(out, int8=True, latency_iters=20)
    return {
        "task": task,
        "qat": qat,
        "seed": seed,
        "rounds": len(rows),
        "run_dir": str(out),
        "final_accuracy": summary["final_accuracy"],
        "federation_int8_accuracy": rows[-1].get("int8_accuracy"),
        "per_round": [
            {k: r.get(k) for k in ("round", "accuracy", "int8_accuracy", "uplink_bytes")}
            for r in rows
        ],
        "export": {
            "int8_method": report.get("int8_method"),
            "accuracy_torch": report["accuracy_torch"],
            "fp32_model_bytes": report["fp32_model_bytes"],
            **{
                f"{kind}_{k}": report["artifacts"][kind][k]
                for kind in ("fp32", "int8")
                for k in ("file_bytes", "download_bytes", "accuracy_onnxruntime")
            },
            "int8_agreement_with_torch": report["artifacts"]["int8"]["agreement_with_torch"],
        },
    }


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| task | training | seeds | fp32 acc (torch) | int8 acc, federation's report "
        "| int8 artifact acc (onnxruntime) | int8 method | int8 file bytes "
        "| int8 zstd bytes | fp32 ONNX bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        for qat in ("none", "int8"):
            rs = [r for r in results if r["task"] == task and r["qat"] == qat]
            if not rs:
                continue
            fed = [r["federation_int8_accuracy"] for r in rs if r["federation_int8_accuracy"]]
            ex = [r["export"] for r in rs]
            lines.append(
                f"| {task} | {'QAT int8' if qat == 'int8' else 'fp32 (then PTQ)'} "
                f"| {','.join(str(r['seed']) for r in rs)} "
                f"| {_ms([r['final_accuracy'] for r in rs])} "
                f"| {_ms(fed) if fed else '—'} "
                f"| {_ms([e['int8_accuracy_onnxruntime'] for e in ex])} "
                f"| {'QAT scales' if qat == 'int8' else 'static QDQ (PTQ)'} "
                f"| {round(statistics.mean(e['int8_file_bytes'] for e in ex)):,} "
                f"| {round(statistics.mean(e['int8_download_bytes'] for e in ex)):,} "
                f"| {round(statistics.mean(e['fp32_file_bytes'] for e in ex)):,} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import logging

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--only", nargs="*", default=["none", "int8"], choices=["none", "int8"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "qat"))
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--table", action="store_true", help="only print the table")
    parser.add_argument(
        "--export-only", action="store_true", help="re-export finished run directories"
    )
    args = parser.parse_args(argv)
    path = Path(args.results)
    done = json.loads(path.read_text()) if path.exists() else []
    if args.table:
        print(table(done))
        return 0
    logging.getLogger("flwr").setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(1)  # one CPU per client, as in the Simulation Engine
    path.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for task in args.tasks:
            for qat in args.only:
                print(f"== {task} qat={qat} seed={seed}", flush=True)
                out = Path(args.runs) / f"{task}-{qat}-s{seed}"
                if args.export_only:
                    if not (out / "summary.json").is_file():
                        continue
                    result = record(task, qat, seed, out)
                else:
                    result = run_one(task, qat, seed, args.rounds, Path(args.runs))
                done = json.loads(path.read_text()) if path.exists() else []
                key = (task, qat, seed)
                done = [r for r in done if (r["task"], r["qat"], r["seed"]) != key] + [result]
                path.write_text(json.dumps(done, indent=1) + "\n")
                print(
                    f"   fp32 {result['final_accuracy']:.4f}  int8 (onnxruntime) "
                    f"{result['export']['int8_accuracy_onnxruntime']:.4f}",
                    flush=True,
                )
    print(table(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
