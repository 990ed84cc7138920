"""Distillation and edge export on MNIST-1D: FedDF vs FedAvg, teacher -> student with and
without SecAgg, and the int8 ONNX artifacts of the results.

    python simulations/distill/run.py [--seeds 0 1 2] [--rounds 10] [--out DIR]
    python simulations/distill/run.py --point converged --seeds 0 1 2 --only student

Each seed runs three real federations in Flower's Simulation Engine (cnn1d, 20 clients,
Dirichlet alpha = 0.1, 10 per round):

- ``student``: FedAvg; the server distills the global (teacher, cnn1d, 29.6k parameters)
  into ``cnn1d-small`` (5.1k) on the built-in public transfer slice every 5 rounds and at
  the end. The teacher *is* the FedAvg baseline (distillation never changes the global);
- ``student-secagg``: the same under secure aggregation (post-processing of the sum);
- ``feddf``: FedAvg + FedDF ensemble distillation every round.

``--point converged`` is the teacher -> student acceptance operating point instead: Dirichlet
alpha = 0.5, 30 rounds, the student distilled every 5 rounds (1000 steps, lr 3e-3), so the
teacher has converged when it is distilled (the alpha = 0.1 point is still rising at round 10).

``--point converged-tuned``: the same federations with the server's distillation settings that
close the teacher -> student gap (cosine lr, 4000 steps at the last round, a 20,000-sample
built-in public slice; ``simulations/distill/redistill.py`` measures them on finished runs).

``--only hetero hetero-feddf``: clients of different sizes (half ``cnn1d``, half
``cnn1d-small``), each architecture aggregated on its own, without and with FedDF across them.

Then ``fedsqueeze export --int8`` on the student run (exports the student) and on the
FedDF run (exports the cnn1d global). Prints markdown tables (mean ± sd over seeds) and
writes ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BASE: dict[str, Any] = {
    "dataset": "mnist1d",
    "model": "cnn1d",
    "partition": "dirichlet",
    "dirichlet-alpha": 0.1,
    "num-clients": 20,
    "clients-per-round": 10,
    "local-epochs": 2,
    "distill-steps": 200,
}
RUNS: dict[str, dict[str, Any]] = {
    "student": {"distill": "student", "student-model": "cnn1d-small", "distill-every": 5},
    "student-secagg": {
        "distill": "student",
        "student-model": "cnn1d-small",
        "distill-every": 5,
        "secagg": True,
        "secagg-clip": 5.0,
    },
    "feddf": {"distill": "feddf", "distill-steps": 100},
    # clients of different sizes: half cnn1d, half cnn1d-small, without and with FedDF
    "hetero": {"client-models": "cnn1d:0.5,cnn1d-small:0.5"},
    "hetero-feddf": {
        "client-models": "cnn1d:0.5,cnn1d-small:0.5",
        "distill": "feddf",
        "distill-steps": 100,
    },
}
_STUDENT_CONVERGED = {"distill-every": 5, "distill-steps": 1000, "distill-lr": 0.003}
_STUDENT_TUNED = _STUDENT_CONVERGED | {
    "distill-schedule": "cosine",
    "distill-final-steps": 4000,
    "distill-public-samples": 20000,
}
POINTS: dict[str, dict[str, Any]] = {
    # per point: its number of rounds, keys for every run, keys per run
    "alpha0.1": {"rounds": 10, "all": {}},
    "converged": {
        "rounds": 30,
        # one simulated client at a time: the machine is shared
        "all": {"dirichlet-alpha": 0.5, "client-cpus": 2.0},
        "student": _STUDENT_CONVERGED,
        "student-secagg": _STUDENT_CONVERGED,
    },
    # the same federations; only the server's distillation differs: a cosine-decayed lr,
    # 4000 steps at the last round, and a 20,000-sample built-in public slice
    "converged-tuned": {
        "rounds": 30,
        "all": {"dirichlet-alpha": 0.5, "client-cpus": 2.0},
        "student": _STUDENT_TUNED,
        "student-secagg": _STUDENT_TUNED,
    },
}


def _ms(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=0, help="0 = the point's (10 for alpha0.1)")
    parser.add_argument("--point", choices=list(POINTS), default="alpha0.1")
    parser.add_argument(
        "--only", nargs="+", choices=list(RUNS), default=["student", "student-secagg", "feddf"]
    )
    parser.add_argument("--table", action="store_true", help="only print the tables of --out")
    parser.add_argument("--out", default="")
    parser.add_argument(
        "--engine",
        choices=["ray", "inprocess"],
        default="ray",
        help="inprocess: the same ClientApp, strategy chain and round loop over the test "
        "suite's in-process grid (one process; for a machine where Ray cannot start)",
    )
    args = parser.parse_args()
    default_out = HERE.parent / "results" / "distill"
    suffix = "" if args.point == "alpha0.1" else f"-{args.point}"
    out = Path(args.out or f"{default_out}{suffix}")
    if set(args.only) <= {"hetero", "hetero-feddf"}:
        show = hetero_table
    else:
        show = tables if args.point == "alpha0.1" else acceptance_table
    if args.table:
        print(show(_collect(out), args.seeds))
        return

    from fedsqueeze.cli import _configure_environment, simulate
    from fedsqueeze.config import resolve_config
    from fedsqueeze.models.export import export_run

    _configure_environment(verbose=False)
    for seed in args.seeds:
        for name in args.only:
            point = POINTS[args.point]
            rounds = args.rounds or point["rounds"]
            cfg = resolve_config(
                BASE,
                RUNS[name],
                {**point["all"], **point.get(name, {})},
                {"num-rounds": rounds, "seed": seed},
            )
            run_dir = out / f"{name}-s{seed}"
            if (run_dir / RESULT).exists():  # finished: the driver can simply be restarted
                print(f"== {name} seed {seed}: done, skipped", flush=True)
                continue
            if run_dir.exists():  # a run that died part-way: start it again
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            summary = (
                simulate(cfg, run_dir, quiet=True)
                if args.engine == "ray"
                else _simulate_inprocess(cfg, run_dir)
            )
            rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            entry: dict[str, Any] = {"summary": summary, "rounds": rows}
            exported = {"student", "feddf"} | (
                {"student-secagg"} if args.point != "alpha0.1" else set()
            )
            if name in exported:
                entry["export"] = export_run(run_dir, int8=True)
            (run_dir / RESULT).write_text(json.dumps(entry, indent=1, default=str))
            print(f"== {name} seed {seed}: final {summary['final_accuracy']:.4f}", flush=True)
    results = _collect(out)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(show(results, args.seeds))


RESULT = "distill-result.json"


def _simulate_inprocess(cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:

    import torch
    from flwr.supercore.task_identity import TaskIdentity

    from fedsqueeze.client.app import build_client_app
    from fedsqueeze.inprocess import InProcessGrid
    from fedsqueeze.server.rounds import run_federation
    from fedsqueeze.server.rundir import RunDir

    torch.set_num_threads(1)  # the machine is shared
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1  # as Flower's
    grid = InProcessGrid(build_client_app(cfg), int(cfg["num-clients"]))
    return run_federation(grid, cfg, RunDir(run_dir))


def _collect(out: Path) -> dict[str, Any]:
    """Every finished run under ``out`` (runs may be launched by separate processes), over
    the committed ``results.json`` (run directories themselves are not committed)."""
    saved = out / "results.json"
    results = json.loads(saved.read_text()) if saved.exists() else {}
    results.update(
        {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob(f"*/{RESULT}"))}
    )
    return results


def tables(results: dict[str, Any], seeds: list[int]) -> str:
    """FedDF against FedAvg (the student run's global) per seed, and their int8 exports."""

    def done(name: str) -> list[dict[str, Any]]:
        return [results[f"{name}-s{s}"] for s in seeds if f"{name}-s{s}" in results]

    pairs = [
        (results[f"student-s{s}"], results[f"feddf-s{s}"])
        for s in seeds
        if f"student-s{s}" in results and f"feddf-s{s}" in results
    ]
    fedavg = [float(a["summary"]["final_accuracy"]) for a, _ in pairs]
    feddf = [float(b["summary"]["final_accuracy"]) for _, b in pairs]
    gain = [100 * (b - a) for a, b in zip(fedavg, feddf, strict=True)]
    lines = [
        "| seeds | FedAvg final acc | FedDF final acc | FedDF − FedAvg (pp) | per seed (pp) |",
        "|---|---|---|---|---|",
    ]
    if pairs:
        lines.append(
            f"| {len(pairs)} | {_ms(fedavg)} | {_ms(feddf)} | {_ms(gain, 1)} | "
            f"{', '.join(f'{g:+.1f}' for g in gain)} |"
        )
    lines += ["", export_table({n: done(n) for n in ("student", "student-secagg", "feddf")})]
    return "\n".join(lines) + "\n"


def export_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    """``fedsqueeze export --int8`` of each run: sizes, accuracy, agreement (mean ± sd)."""
    lines = [
        "| run | seeds | artifact | params | file B | zstd B | fp32-params B / zstd B | "
        "acc torch | acc onnxruntime | top-1 agreement | p50 int8 / fp32 @1, @32 (one run) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, done in runs.items():
        reps = [r["export"] for r in done if "export" in r]
        if not reps:
            continue
        for kind in ("fp32", "int8"):
            arts = [r["artifacts"][kind] for r in reps]
            lat = "—"
            if kind == "int8":
                one = reps[0]["artifacts"]
                ratio = [
                    one["int8"]["latency_ms"][b]["p50"] / one["fp32"]["latency_ms"][b]["p50"]
                    for b in ("batch1", "batch32")
                ]
                lat = f"{ratio[0]:.2f}x, {ratio[1]:.2f}x"
            lines.append(
                f"| {name} | {len(reps)} | {reps[0]['model_name']} {kind} | "
                f"{reps[0]['parameters']:,} | {arts[0]['file_bytes']:,} | "
                f"{_ms([float(a['download_bytes']) for a in arts], 0)} | "
                f"{_ms([a['ratio_to_fp32_model'] for a in arts], 2)} | "
                f"{_ms([r['accuracy_torch'] for r in reps])} | "
                f"{_ms([a['accuracy_onnxruntime'] for a in arts])} | "
                f"{_ms([a['agreement_with_torch'] for a in arts])} | {lat} |"
            )
    return "\n".join(lines) + "\n"


def acceptance_table(results: dict[str, Any], seeds: list[int]) -> str:
    """Teacher vs student per seed and mean ± sd, and the int8 export's agreement."""
    lines = [
        "| run | seeds | teacher (global) acc | student acc | teacher − student (pp) | "
        "student / teacher params | int8 acc (onnxruntime) | int8 top-1 agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"student": "FedAvg + student", "student-secagg": "same, SecAgg"}
    for name, label in names.items():
        done = [results[f"{name}-s{s}"] for s in seeds if f"{name}-s{s}" in results]
        if not done:
            continue
        teacher = [float(r["summary"]["final_accuracy"]) for r in done]
        student = [float(r["summary"]["student_final_accuracy"]) for r in done]
        gap = [100 * (t - s) for t, s in zip(teacher, student, strict=True)]
        int8 = [r["export"]["artifacts"]["int8"] for r in done if "export" in r]
        s0 = done[0]["summary"]
        ratio = s0["teacher_parameters"] / s0["student_parameters"]
        lines.append(
            f"| {label} | {len(done)} | {_ms(teacher)} | {_ms(student)} | "
            f"{_ms(gap, 2)} | {s0['student_parameters']:,} / "
            f"{s0['teacher_parameters']:,} ({ratio:.1f}x fewer) | "
            f"{_ms([a['accuracy_onnxruntime'] for a in int8]) if int8 else '—'} | "
            f"{_ms([a['agreement_with_torch'] for a in int8]) if int8 else '—'} |"
        )
    runs = {n: [results[f"{n}-s{s}"] for s in seeds if f"{n}-s{s}" in results] for n in names}
    return "\n".join(lines) + "\n\n" + export_table(runs)


def hetero_table(results: dict[str, Any], seeds: list[int]) -> str:
    """Each architecture's final accuracy with and without FedDF across architectures."""
    lines = ["| run | seeds | cnn1d final acc | cnn1d-small final acc |", "|---|---|---|---|"]
    for name, label in (("hetero", "per-architecture FedAvg"), ("hetero-feddf", "+ FedDF")):
        done = [results[f"{name}-s{s}"] for s in seeds if f"{name}-s{s}" in results]
        if done:
            acc = {
                arch: [float(r["summary"]["client_models"][arch]["final_accuracy"]) for r in done]
                for arch in ("cnn1d", "cnn1d-small")
            }
            lines.append(
                f"| {label} | {len(done)} | {_ms(acc['cnn1d'])} | {_ms(acc['cnn1d-small'])} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
