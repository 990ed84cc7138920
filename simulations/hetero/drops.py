"""Stability table of a ``fedsqueeze compare`` output: how far accuracy falls between rounds.

    python simulations/hetero/drops.py DIR [DIR ...] [--after 5]

reads each ``DIR/results.json`` written by ``fedsqueeze compare`` and prints, per method, the
final accuracy (mean ± sd over seeds) and the largest round-to-round accuracy drop after
round ``--after`` (``acc[r-1] - acc[r]`` for ``r-1 >= after``): the largest over the seeds
and its mean ± sd over the seeds. Issue 14's acceptance: no drop over 10 pp after round 5.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path


def max_drop(accuracies: Sequence[float], after: int) -> float:
    """Largest ``acc[r-1] - acc[r]`` over rounds ``r-1 >= after`` (1-based); 0 if none."""
    drops = [accuracies[i - 1] - accuracies[i] for i in range(after, len(accuracies))]
    return max([0.0, *drops])


def _mean_sd(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def rows(results_json: Path, after: int) -> list[str]:
    """One markdown row per method of one comparison."""
    data = json.loads(results_json.read_text())
    out = []
    for result in data["results"]:
        runs = result["runs"]
        finals = [float(r["summary"]["final_accuracy"]) for r in runs]
        drops = [max_drop([float(x["accuracy"]) for x in r["rounds"]], after) for r in runs]
        cfg = runs[0]["summary"]["config"]
        n, k = int(cfg["num-clients"]), int(cfg["clients-per-round"])
        clients = f"{n} clients" if k >= n else f"{k} of {n} clients a round"
        part = f"{cfg['dataset']}/{cfg['model']}, {clients}, " + (
            f"Dirichlet α={cfg['dirichlet-alpha']:g}"
            if cfg["partition"] == "dirichlet"
            else cfg["partition"]
        )
        out.append(
            f"| {part} | {result['label']} | {len(runs)} | {_mean_sd(finals)} "
            f"| {100 * max(drops):.1f} | {100 * statistics.mean(drops):.1f}"
            + (f" ± {100 * statistics.stdev(drops):.1f}" if len(drops) > 1 else "")
            + " |"
        )
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="fedsqueeze compare output dirs")
    parser.add_argument("--after", type=int, default=5, help="count drops after this round")
    args = parser.parse_args(argv)
    print(
        f"| federation | method | seeds | final acc | max drop after round {args.after} (pp, "
        "worst seed) | per-seed max drop (pp, mean ± sd) |"
    )
    print("|---|---|---|---|---|---|")
    for d in args.dirs:
        print("\n".join(rows(d / "results.json", args.after)))


if __name__ == "__main__":
    main()
