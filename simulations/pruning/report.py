"""Table of a pruning suite run by ``simulations/pruning/run.py`` (its ``results*.json``).

    python simulations/pruning/run.py pruning && python simulations/pruning/report.py pruning
    python simulations/pruning/report.py pruning --seeds 0=results-a.json,results-b.json 2=...

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


def seeds_table(by_seed: dict[str, list[dict]]) -> str:
    """Final accuracy per config over seeds, and its gap to the first config seed by seed.

    ``by_seed`` maps a seed to the results of that seed (the first config in name order is
    the baseline, e.g. ``01-fp32``); a config missing a seed is reported over the seeds it has.
    """
    import statistics

    seeds = list(by_seed)
    runs = {s: {r["name"]: r for r in rs} for s, rs in by_seed.items()}
    names = sorted({n for rs in runs.values() for n in rs})
    base = names[0]

    def mean_sd(xs: list[float], digits: int = 3) -> str:
        if len(xs) < 2:
            return f"{xs[0]:.{digits}f} (one seed)"
        return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"

    lines = [
        f"| method | final acc (seeds {', '.join(seeds)}) | mean ± sd | int8 acc mean ± sd | "
        f"gap to {base}, pp (per seed) | gap mean ± sd, pp |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        have = [s for s in seeds if name in runs[s]]
        acc = [runs[s][name]["summary"]["final_accuracy"] for s in have]
        int8 = [runs[s][name]["summary"].get("final_int8_accuracy") for s in have]
        gaps = [
            100 * (runs[s][base]["summary"]["final_accuracy"] - a)
            for s, a in zip(have, acc, strict=True)
            if base in runs[s]
        ]
        label = next(runs[s][name]["label"] for s in have)
        lines.append(
            f"| {label} | {', '.join(f'{a:.3f}' for a in acc)} | {mean_sd(acc)} | "
            + (mean_sd([float(x) for x in int8]) if None not in int8 else "—")
            + " | "
            + (", ".join(f"{g:.1f}" for g in gaps) if name != base else "—")
            + " | "
            + (mean_sd(gaps, 1) if name != base and gaps else "—")
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``report.py SUITE``: every ``results*.json`` of the suite, in config order.

    ``report.py SUITE --seeds SEED=FILE[,FILE...] ...``: the seeds table of those files.
    """
    suite = argv[0] if argv else "pruning"
    if "--seeds" in argv:
        by_seed: dict[str, list[dict]] = {}
        for arg in argv[argv.index("--seeds") + 1 :]:
            seed, files = arg.split("=", 1)
            for f in files.split(","):
                by_seed.setdefault(seed, []).extend(
                    json.loads((HERE / "results" / suite / f).read_text())
                )
        print(seeds_table(by_seed))
        return 0
    by_name = {}
    for path in sorted((HERE / "results" / suite).glob("results*.json")):
        by_name.update({r["name"]: r for r in json.loads(path.read_text())})
    print(table([by_name[k] for k in sorted(by_name)]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
