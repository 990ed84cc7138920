"""Table of a pruning suite run by ``simulations/pruning/run.py`` (its ``results*.json``).

    python simulations/pruning/run.py pruning && python simulations/pruning/report.py pruning
    python simulations/pruning/report.py pruning --files results-12r-b.json,results-12r-a.json
    python simulations/pruning/report.py pruning --seeds 0=results-a.json,results-b.json 2=...

Per config: final accuracy, sparsity of the prunable weights, the model's size (dense fp32,
and as stored: fp32 kept values + the coded mask; a QAT run without pruning: its int8
weights), the bytes per round of the final round (after the schedule: what a pruned
federation costs from then on) in both directions, and the first round reaching 95% of the
first (dense) config's final accuracy. ``--seeds``: final accuracy over seeds (mean ± sd) and
each config's gap to the first one, seed by seed.
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
        stored = last.get(
            "model_bytes_sparse",
            last.get("model_bytes_lowrank", last.get("model_bytes_int8", dense)),
        )
        reach = next((x["round"] for x in r["rounds"] if x["accuracy"] >= target), "not reached")
        lines.append(
            f"| {r['label']} | {s['final_accuracy']:.4f} | {last.get('sparsity', 0.0):.3f} | "
            f"{dense / 1e3:.1f} → {stored / 1e3:.1f} ({dense / stored:.1f}x) | "
            f"{last['uplink_bytes'] / 1e3:.1f} | {base_up / last['uplink_bytes']:.1f}x | "
            f"{last['downlink_bytes'] / 1e3:.1f} | {reach} |"
        )
    return "\n".join(lines) + "\n"


def seeds_table(by_seed: dict[str, list[dict]], only: list[str] | None = None) -> str:
    """Final accuracy per config over seeds, and its gap to the first config seed by seed.

    ``by_seed`` maps a seed to the results of that seed; the first config in name order (or of
    ``only``) is the baseline, e.g. ``01-fp32``. A seed a config lacks is shown as "—".
    """
    import statistics

    seeds = list(by_seed)
    runs = {s: {r["name"]: r for r in rs} for s, rs in by_seed.items()}
    names = only or sorted({n for rs in runs.values() for n in rs})
    base = names[0]

    def mean_sd(xs: list[float], digits: int = 3) -> str:
        if len(xs) < 2:
            return f"{xs[0]:.{digits}f} (one seed)"
        return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"

    def final(s: str, name: str, key: str = "final_accuracy") -> float | None:
        return runs[s][name]["summary"].get(key) if name in runs[s] else None

    lines = [
        f"| method | final acc (seeds {', '.join(seeds)}) | mean ± sd | int8 acc mean ± sd | "
        f"gap to {base}, pp (per seed) | gap mean ± sd, pp |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        acc = [final(s, name) for s in seeds]
        int8 = [x for x in (final(s, name, "final_int8_accuracy") for s in seeds) if x is not None]
        gaps = [
            None if a is None or b is None else 100 * (b - a)
            for a, b in zip(acc, (final(s, base) for s in seeds), strict=True)
        ]
        label = next(runs[s][name]["label"] for s in seeds if name in runs[s])
        given = [g for g in gaps if g is not None]
        lines.append(
            f"| {label} | {', '.join('—' if a is None else f'{a:.3f}' for a in acc)} | "
            f"{mean_sd([a for a in acc if a is not None])} | "
            f"{mean_sd(int8) if int8 else '—'} | "
            + ("—" if name == base else ", ".join("—" if g is None else f"{g:.1f}" for g in gaps))
            + f" | {'—' if name == base or not given else mean_sd(given, 1)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``report.py SUITE [--files FILE,...]``: the suite's results (every ``results*.json``, or
    the files named), in config order. A config found in several files (other seeds, other
    round counts) is taken from the first file in name order, and the others are named on
    stderr: a table never mixes runs silently.

    ``report.py SUITE --seeds SEED=FILE[,FILE...] ... [--only NAME ...]``: the seeds table.
    """
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("suite", nargs="?", default="pruning")
    parser.add_argument("--seeds", nargs="*", default=[], help="SEED=FILE[,FILE...]")
    parser.add_argument("--only", nargs="*", default=None, help="configs, baseline first")
    parser.add_argument("--files", default="", help="FILE[,FILE...] (default: results*.json)")
    args = parser.parse_args(argv)
    suite = args.suite
    if args.seeds:
        by_seed: dict[str, list[dict]] = {}
        for arg in args.seeds:
            seed, files = arg.split("=", 1)
            for f in files.split(","):
                by_seed.setdefault(seed, []).extend(
                    json.loads((HERE / "results" / suite / f).read_text())
                )
        print(seeds_table(by_seed, args.only))
        return 0
    folder = HERE / "results" / suite
    paths = (
        sorted(folder / f for f in args.files.split(","))
        if args.files
        else sorted(folder.glob("results*.json"))
    )
    by_name: dict[str, dict] = {}
    source: dict[str, str] = {}
    for path in paths:
        for r in json.loads(path.read_text()):
            if r["name"] in by_name:
                print(
                    f"{r['name']}: using {source[r['name']]}, not {path.name} (--files to choose)",
                    file=sys.stderr,
                )
                continue
            by_name[r["name"]], source[r["name"]] = r, path.name
    print(table([by_name[k] for k in sorted(by_name)]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
