"""Per-round wall time of a deployed run (real SuperLink + SuperNodes on 127.0.0.1),
one code tree against another, plain and under SecAgg+.

Usage::

    python benchmarks/deployed_round.py --code /path/to/baseline --code . \\
        [--reps 3] [--modes plain secagg] [--nodes 3] [--rounds 2] [--out FILE.json]

Each ``--code`` is a checkout of fedsqueeze. Every measurement is a fresh child process
with ``PYTHONPATH=<code>`` that starts the code's own deployment harness
(``<code>/tests/deployment.py``: one ``flower-superlink``, ``--nodes`` SuperNodes,
``flwr run <code>``), so the SuperNodes run that checkout's ClientApp. The runs are
interleaved (rep 1: A plain, B plain, A secagg, B secagg; rep 2: ...) so that a change in
the machine's load hits both sides alike. Per-round time is the ServerApp's ``wall_s`` of
each round in ``metrics.jsonl`` (send → all replies aggregated → evaluated); the table
gives the median over all rounds of all reps, its ratio to the first ``--code``'s, and
the paired ratio (each rep's mean round time over the first code's in the same rep; mean ±
sd over reps). Wall-clock numbers are only comparable side by side on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

RUN_CONFIG: dict[str, Any] = {
    "dataset": "digits",
    "model": "logreg",
    "local-epochs": 1,
    "lr": 0.1,
}
MODES: dict[str, dict[str, Any]] = {"plain": {}, "secagg": {"secagg": True}}


def measure_once(code: Path, mode: str, nodes: int, rounds: int) -> dict[str, Any]:
    """One deployed run of ``code`` (call in a process whose PYTHONPATH is ``code``)."""
    sys.path.insert(0, str(code / "tests"))
    from deployment import deployment  # the harness of the code under test

    config = {
        **RUN_CONFIG,
        **MODES[mode],
        "num-clients": nodes,
        "clients-per-round": nodes,
        "num-rounds": rounds,
    }
    with tempfile.TemporaryDirectory(prefix="deployed-round-") as tmp:
        with deployment(Path(tmp), num_nodes=nodes, app=code) as dep:
            result = dep.run(config, timeout=900)
        rows = [r for r in result.metrics() if int(r["round"]) >= 1]
        return {
            "round_s": [float(r["wall_s"]) for r in rows],
            "accuracy": float(rows[-1]["accuracy"]),
            "run_s": result.wall_s,
            "survivors": len(dep.survivors()),
        }


def run_child(code: Path, mode: str, nodes: int, rounds: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(code))
    argv = [sys.executable, __file__, "--one", "--code", str(code), "--modes", mode]
    argv += ["--nodes", str(nodes), "--rounds", str(rounds)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{code} {mode} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(results: list[dict[str, Any]], codes: list[str], modes: list[str]) -> str:
    lines = ["| mode | code | per-round s (median) | ratio to first | paired ratio | runs |"]
    lines.append("|---|---|---|---|---|---|")
    for mode in modes:
        medians, per_rep = {}, {}
        for code in codes:
            runs = [r for r in results if r["code"] == code and r["mode"] == mode]
            medians[code] = statistics.median(s for r in runs for s in r["round_s"])
            per_rep[code] = {r["rep"]: statistics.mean(r["round_s"]) for r in runs}
        for code in codes:
            ratio = medians[code] / medians[codes[0]]
            # the same rep of two codes ran back to back, under about the same load
            paired = [t / per_rep[codes[0]][rep] for rep, t in per_rep[code].items()]
            sd = statistics.stdev(paired) if len(paired) > 1 else 0.0
            lines.append(
                f"| {mode} | {code} | {medians[code]:.1f} | {ratio:.2f} | "
                f"{statistics.mean(paired):.2f} ± {sd:.2f} | {len(paired)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", action="append", required=True, help="a fedsqueeze checkout")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="append each result to this JSON-lines file")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    codes = [str(Path(c).resolve()) for c in args.code]
    if args.one:
        print(json.dumps(measure_once(Path(codes[0]), args.modes[0], args.nodes, args.rounds)))
        return
    done: list[dict[str, Any]] = []
    if args.out and args.out.exists():  # restartable: finished runs are kept
        done = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    for rep in range(args.reps):
        for mode in args.modes:
            for code in codes:
                key = {"rep": rep, "mode": mode, "code": code}
                key.update(nodes=args.nodes, rounds=args.rounds)
                if any(all(r.get(k) == v for k, v in key.items()) for r in done):
                    continue
                row = {**key, **run_child(Path(code), mode, args.nodes, args.rounds)}
                print(json.dumps(row), flush=True)
                done.append(row)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    mine = [r for r in done if r["nodes"] == args.nodes and r["rounds"] == args.rounds]
    print(summary(mine, codes, args.modes))


if __name__ == "__main__":
    main()
