"""Run one comparison suite: every ``simulations/<suite>/*.toml`` as a real simulated federation.

    python simulations/run.py SUITE [--only NAME ...] [--out DIR]

Each TOML holds run-config keys (see DESIGN.md) and an optional ``label``. Results go to
``simulations/results/<suite>/``: one run directory per config, ``table.md`` (the table
pasted into simulations/README.md), ``results.json`` and ``accuracy_vs_uplink.png``.
For several seeds and the mean ± sd table use ``fedsqueeze compare simulations/<suite>/*.toml
--seeds N`` (:mod:`fedsqueeze.compare`, which also holds the shared statistics).
The first config (sorted by file name) is the baseline the ratios are taken against.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from fedsqueeze.compare import cumulative_uplink, uplink_to_reach

HERE = Path(__file__).resolve().parent


def run_suite(suite: str, only: list[str], out_root: Path) -> list[dict[str, Any]]:
    from fedsqueeze.cli import _configure_environment, simulate
    from fedsqueeze.config import load_toml, resolve_config

    _configure_environment(verbose=False)
    configs = sorted((HERE / suite).glob("*.toml"))
    if not configs:
        raise SystemExit(f"no configs in {HERE / suite}")
    results = []
    for path in configs:
        if only and path.stem not in only:
            continue
        raw = load_toml(path)
        label = str(raw.pop("label", path.stem))
        config = resolve_config(raw)
        run_dir = out_root / path.stem
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        print(f"== {suite}/{path.stem}: {label}", flush=True)
        summary = simulate(config, run_dir, quiet=True)
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results.append({"name": path.stem, "label": label, "summary": summary, "rounds": rows})
        print(
            f"   final acc {summary['final_accuracy']:.4f}  "
            f"uplink {summary['total_uplink_bytes'] / 1e6:.3f} MB  wall {summary['wall_s']:.1f} s",
            flush=True,
        )
    return results


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table: accuracy, uplink, uplink to reach 95% of the baseline's final accuracy."""
    base = results[0]
    target = 0.95 * base["summary"]["final_accuracy"]
    base_up = base["summary"]["total_uplink_bytes"]
    base_reach = uplink_to_reach(base["rounds"], target)
    lines = [
        f"Target = 95% of {base['label']}'s final accuracy = {target:.4f}.",
        "",
        "| method | final acc | best acc | uplink MB | ratio vs baseline | "
        "uplink MB to target | ratio to target | downlink MB | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["summary"]
        reach = uplink_to_reach(r["rounds"], target)
        reach_txt = f"{reach / 1e6:.3f}" if reach is not None else "not reached"
        ratio_reach = (
            f"{base_reach / reach:.1f}x" if reach is not None and base_reach is not None else "—"
        )
        lines.append(
            f"| {r['label']} | {s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} | "
            f"{s['total_uplink_bytes'] / 1e6:.3f} | {base_up / s['total_uplink_bytes']:.1f}x | "
            f"{reach_txt} | {ratio_reach} | {s['total_downlink_bytes'] / 1e6:.3f} | "
            f"{s['wall_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def per_round_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of test accuracy per round, one column per config."""
    head = "| round | " + " | ".join(r["label"] for r in results) + " |"
    sep = "|---" * (len(results) + 1) + "|"
    n = max(len(r["rounds"]) for r in results)
    lines = [head, sep]
    for i in range(n):
        cells = [
            f"{r['rounds'][i]['accuracy']:.4f}" if i < len(r["rounds"]) else "" for r in results
        ]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        cum = cumulative_uplink(r["rounds"]) / 1e6
        ax.plot(cum, [x["accuracy"] for x in r["rounds"]], marker=".", label=r["label"])
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink MB (log scale)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite")
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or HERE / "results" / args.suite
    out.mkdir(parents=True, exist_ok=True)
    results = run_suite(args.suite, args.only, out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = table(results) + "\nAccuracy per round:\n\n" + per_round_table(results)
    (out / "table.md").write_text(text)
    plot(results, out / "accuracy_vs_uplink.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
