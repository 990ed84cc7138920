"""Accuracy against ε: run the privacy suite and write its table and plot.

    python simulations/privacy/run.py [--only NAME ...] [--report-only] [--out DIR]

Runs every ``simulations/privacy/*.toml`` (or ``--only`` those) through the real Simulation
Engine with ``simulations/run.py``'s runner, one run directory per config under
``simulations/results/privacy/``, then writes ``privacy_table.md`` and
``accuracy_vs_epsilon.png`` from *all* run directories found there (``--report-only`` skips
the runs and only rebuilds the report from what is on disk). The plot also shows, as error
bars, the noise-only spread written there by ``noise_spread.py`` (``noise_spread_*.txt``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SIMULATIONS = HERE.parent


def load_runs(out: Path) -> list[dict[str, Any]]:
    """Every finished run under ``out`` (one directory per config), in config order."""
    from fedsqueeze.config import load_toml

    runs = []
    for cfg_path in sorted(HERE.glob("*.toml")):
        run_dir = out / cfg_path.stem
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file():
            continue
        summary = json.loads(summary_path.read_text())
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        label = str(load_toml(cfg_path).get("label", cfg_path.stem))
        runs.append({"name": cfg_path.stem, "label": label, "summary": summary, "rounds": rows})
    return runs


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| run | dp | bits | target ε | final ε | δ | z (accounted) | rounds | final acc | "
        "best acc | mean acc last 5 | uplink MB | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s, cfg = r["summary"], r["summary"]["config"]
        dp = str(cfg.get("dp", "none"))
        last = [x["accuracy"] for x in r["rounds"][-5:]]
        zs = [x["dp_noise_multiplier"] for x in r["rounds"] if "dp_noise_multiplier" in x]
        z = f"{min(zs):.3f}" if zs else "—"
        bits = str(cfg.get("dp-bits")) if dp == "distributed" else "—"
        target = cfg.get("dp-epsilon") if dp != "none" else None
        lines.append(
            f"| {r['label']} | {dp} | {bits} | {_fmt(target, 'g')} | "
            f"{_fmt(s.get('epsilon'), '.3f')} | {_fmt(s.get('delta'), '.0e')} | {z} | "
            f"{s['num_rounds']} | {s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} | "
            f"{sum(last) / len(last):.4f} | {s['total_uplink_bytes'] / 1e6:.2f} | "
            f"{s['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _family(cfg: dict[str, Any]) -> str:
    """Which curve a run belongs to: "central" (plain path), "distributed-16" or ""."""
    if cfg.get("secagg-randk", 1.0) != 1.0 or str(cfg.get("codec", "none")) != "none":
        return ""
    if cfg.get("dp") == "central" and not cfg.get("secagg"):
        return "central"
    if cfg.get("dp") == "distributed" and int(cfg.get("dp-bits", 0)) == 16:
        return "distributed-16"
    return ""


def mean_last(r: dict[str, Any], n: int = 5) -> float:
    last = [x["accuracy"] for x in r["rounds"][-n:]]
    return sum(last) / len(last)


def curves(runs: list[dict[str, Any]]) -> dict[str, list[tuple[float, float, list[float]]]]:
    """Per family, sorted by target ε: (ε, mean over seeds of mean-last-5, each seed's value)."""
    grouped: dict[str, dict[float, list[float]]] = {}
    for r in runs:
        cfg = r["summary"]["config"]
        fam = _family(cfg)
        if fam:
            eps = float(cfg["dp-epsilon"])
            grouped.setdefault(fam, {}).setdefault(eps, []).append(mean_last(r))
    return {
        fam: [(e, sum(v) / len(v), v) for e, v in sorted(by_eps.items())]
        for fam, by_eps in grouped.items()
    }


def noise_spread(out: Path) -> dict[tuple[str, float], list[float]]:
    """Mean-of-last-5 values per (mode, ε) from ``noise_spread.py``'s output files in ``out``."""
    spread: dict[tuple[str, float], list[float]] = {}
    for path in sorted(out.glob("noise_spread_*.txt")):
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                key = (str(row["mode"]), float(row["epsilon"]))
                spread.setdefault(key, []).append(float(row["mean_last5"]))
    return spread


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    styles = {"central": ("central DP (plain path)", "o", "C0"),
              "distributed-16": ("distributed DP, 16 bits (secagg)", "s", "C1")}  # fmt: skip
    for fam, points in curves(runs).items():
        label, marker, color = styles[fam]
        eps = [e for e, _, _ in points]
        ax1.plot(eps, [m for _, m, _ in points], marker=marker, color=color, label=label)
        for e, _, values in points:
            if len(values) > 1:
                ax1.scatter([e] * len(values), values, marker=".", color=color, alpha=0.6)
    colors = {"central": "C0", "distributed": "C1"}
    for (mode, eps), values in noise_spread(path.parent).items():
        if len(values) > 1:
            mean, sd = statistics.mean(values), statistics.stdev(values)
            offset = 0.93 if mode == "central" else 1.07
            ax1.errorbar([eps * offset], [mean], yerr=[sd], fmt="D", ms=4, capsize=3,
                         color=colors.get(mode, "k"),
                         label=f"{mode}: {len(values)} noise seeds, mean ± sd")  # fmt: skip
    for r in runs:
        cfg = r["summary"]["config"]
        dp = cfg.get("dp", "none")
        if dp == "none":
            ax1.axhline(mean_last(r), color="gray", linestyle="--", label="no DP")
        elif not _family(cfg):
            ax1.scatter([float(cfg["dp-epsilon"])], [mean_last(r)], marker="x", label=r["label"])
        ax2.plot([x["accuracy"] for x in r["rounds"]], label=r["label"])
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("target ε (user level; final ε in the table)")
    ax1.set_ylabel("test accuracy (mean of last 5 rounds)")
    ax1.set_title("line: mean over seeds, dots: single seeds", fontsize=8)
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("round")
    ax2.set_ylabel("test accuracy")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--out", type=Path, default=SIMULATIONS / "results" / "privacy")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        sys.path.insert(0, str(SIMULATIONS))
        from run import run_suite  # simulations/run.py

        run_suite("privacy", args.only, args.out)
    runs = load_runs(args.out)
    if not runs:
        raise SystemExit(f"no finished runs under {args.out}")
    text = table(runs)
    (args.out / "privacy_table.md").write_text(text)
    plot(runs, args.out / "accuracy_vs_epsilon.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
