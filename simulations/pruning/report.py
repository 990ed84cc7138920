"""Table of a pruning suite run by ``simulations/pruning/run.py`` (its ``results*.json``).

    python simulations/pruning/run.py pruning && python simulations/pruning/report.py pruning

Per config: final accuracy, sparsity of the prunable weights, the model's size (dense fp32,
and as stored: fp32 kept values + the coded mask), the bytes per round of the final round
(after the schedule: what a pruned federation costs from then on) in both directions, and
the first round reaching 95% of the first (dense) config's final accuracy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def table(results: list[dict]) -> str:
    base = results[0]
    target = 0.95 * base["summary"]["final_accuracy"]
    base_up = base["rounds"][-1]["uplink_bytes"]
    lines = [
        f"Target = 95% of {base['label']}'s final accuracy = {target:.4f}. Bytes per round are "
        "the last round's, summed over its clients (Flower message sizes).",
        "",
        "| method | final acc | sparsity | model KB dense → stored | uplink KB/round | "
        "uplink vs dense | downlink KB/round | rounds to target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, last = r["summary"], r["rounds"][-1]
        dense = last.get("model_bytes_dense", 4 * s["num_parameters"])
        stored = last.get("model_bytes_sparse", last.get("model_bytes_lowrank", dense))
        reach = next((x["round"] for x in r["rounds"] if x["accuracy"] >= target), "not reached")
        lines.append(
            f"| {r['label']} | {s['final_accuracy']:.4f} | {last.get('sparsity', 0.0):.3f} | "
            f"{dense / 1e3:.1f} → {stored / 1e3:.1f} ({dense / stored:.1f}x) | "
            f"{last['uplink_bytes'] / 1e3:.1f} | {base_up / last['uplink_bytes']:.1f}x | "
            f"{last['downlink_bytes'] / 1e3:.1f} | {reach} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``report.py SUITE``: every ``results*.json`` of the suite, in config order."""
    suite = argv[0] if argv else "pruning"
    by_name = {}
    for path in sorted((HERE / "results" / suite).glob("results*.json")):
        by_name.update({r["name"]: r for r in json.loads(path.read_text())})
    print(table([by_name[k] for k in sorted(by_name)]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
