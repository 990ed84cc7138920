"""The bits-on-the-wire table of a `fedsqueeze compare` run of the distributed-DP configs.

    python simulations/compression-ddp/table.py runs/ddp-sketch [--seeds N] [--json OUT.json]
    python simulations/compression-ddp/table.py runs/ddp-wide --per-seed

Per config (the run directories `compare` wrote, `NAME/seedN/`): final accuracy and the mean
of the last 5 rounds (mean ± sd over seeds), the realized ε, the payload — the masked
vector's bits (`secagg_vector_len x secagg_bits`, what SecAgg+ sums) per model parameter —
and every uplink byte of the Flower replies (all five SecAgg+ stages) per parameter and per
client update. Without SecAgg+ the payload is the float32 update (32 bits per parameter).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from fedsqueeze.config import load_toml

HERE = Path(__file__).resolve().parent


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def _bits(value: float) -> str:
    """Two decimals where the 2-bit line is read (below 10), one above."""
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def summarize(run_dir: Path, seeds: int = 0) -> list[dict[str, Any]]:
    """One row per config directory under ``run_dir`` (in name order), over its seeds
    ``0 .. seeds - 1`` (0 = all it has)."""
    labels = {p.stem: str(load_toml(p).get("label", p.stem)) for p in HERE.glob("*.toml")}
    rows = []
    for config_dir in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        runs = sorted(
            (p for p in config_dir.glob("seed*/summary.json")),
            key=lambda p: int(p.parent.name.removeprefix("seed")),
        )
        runs = [p for p in runs if not seeds or int(p.parent.name.removeprefix("seed")) < seeds]
        if not runs:
            continue
        finals, last5, eps, payload, per_param, per_update = [], [], [], [], [], []
        for path in runs:
            summary = json.loads(path.read_text())
            lines = (path.parent / "metrics.jsonl").read_text().splitlines()
            metrics = [json.loads(line) for line in lines if line.strip()]
            d = int(summary["num_parameters"])
            updates = sum(int(m.get("clients", 0)) for m in metrics)
            finals.append(float(summary["final_accuracy"]))
            last5.append(statistics.mean(float(m["accuracy"]) for m in metrics[-5:]))
            eps.append(float(summary.get("epsilon") or 0.0))
            row = metrics[-1]
            bits = row.get("secagg_vector_len", d) * row.get("secagg_bits", 32) / d
            payload.append(bits)
            per_update.append(summary["total_uplink_bytes"] / max(1, updates))
            per_param.append(per_update[-1] * 8 / d)
        rows.append(
            {
                "name": config_dir.name,
                "label": labels.get(config_dir.name, config_dir.name),
                "seeds": len(runs),
                "final": finals,
                "last5": last5,
                "epsilon": statistics.mean(eps),
                "payload_bits_per_param": statistics.mean(payload),
                "uplink_bytes_per_update": statistics.mean(per_update),
                "uplink_bits_per_param": statistics.mean(per_param),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    out = [
        "| method | seeds | final acc | mean acc last 5 rounds | ε (realized) "
        "| payload bits / param | uplink B / update | uplink bits / param (all protocol bytes) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['label']} | {r['seeds']} | {_mean_sd(r['final'])} | {_mean_sd(r['last5'])} "
            f"| {r['epsilon']:.2f} | {r['payload_bits_per_param']:.2f} "
            f"| {r['uplink_bytes_per_update']:,.0f} | {_bits(r['uplink_bits_per_param'])} |"
        )
    return "\n".join(out)


def per_seed(rows: list[dict[str, Any]]) -> str:
    """Final accuracy / mean of the last 5 rounds of every config, one line per seed."""
    out = [
        "| seed | " + " | ".join(r["label"] for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for i in range(max(r["seeds"] for r in rows)):
        cells = [
            f"{r['final'][i]:.4f} / {r['last5'][i]:.4f}" if i < r["seeds"] else "" for r in rows
        ]
        out.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seeds", type=int, default=0, help="only seeds 0..N-1 (0 = all)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument(
        "--per-seed", action="store_true", help="one line per seed instead (final / last 5)"
    )
    args = parser.parse_args(argv)
    rows = summarize(args.run_dir, args.seeds)
    print(per_seed(rows) if args.per_seed else markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
