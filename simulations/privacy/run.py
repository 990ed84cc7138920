"""Accuracy against ε: run the privacy suite and write its table and plot.

    python simulations/privacy/run.py [--only NAME ...] [--report-only] [--out DIR]

Runs every ``simulations/privacy/*.toml`` (or ``--only`` those) through the real Simulation
Engine with ``simulations/run.py``'s runner, one run directory per config under
``simulations/results/privacy/``, then writes ``privacy_table.md`` and
``accuracy_vs_epsilon.png`` from *all* run directories found there (``--report-only`` skips
the runs and only rebuilds the report from what is on disk).
"""

from __future__ import annotations

import argparse
import json
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


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean_last(r: dict[str, Any]) -> float:
        last = [x["accuracy"] for x in r["rounds"][-5:]]
        return sum(last) / len(last)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    central = sorted(
        (r for r in runs if r["summary"]["config"].get("dp") == "central"
         and not r["summary"]["config"].get("secagg")),
        key=lambda r: r["summary"]["epsilon"],
    )  # fmt: skip
    if central:
        ax1.plot(
            [r["summary"]["epsilon"] for r in central],
            [mean_last(r) for r in central],
            marker="o",
            label="central DP",
        )
    for r in runs:
        cfg = r["summary"]["config"]
        if cfg.get("dp") == "distributed" or (cfg.get("dp") == "central" and cfg.get("secagg")):
            ax1.scatter([r["summary"]["epsilon"]], [mean_last(r)], marker="x", label=r["label"])
        if cfg.get("dp", "none") == "none":
            ax1.axhline(mean_last(r), color="gray", linestyle="--", label="no DP")
        ax2.plot([x["accuracy"] for x in r["rounds"]], label=r["label"])
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("ε (user level, final)")
    ax1.set_ylabel("test accuracy (mean of last 5 rounds)")
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("round")
    ax2.set_ylabel("test accuracy")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=6)
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
