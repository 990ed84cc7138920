"""``fedsqueeze compare CONFIG.toml... --seeds N [--out DIR]``: methods side by side.

Each CONFIG.toml holds run-config keys (and an optional ``label``); all of them must describe
the same federation (:data:`FEDERATION_KEYS`). Every config runs once per seed (its ``seed``,
``seed + 1``, ...), each run in ``DIR/<config name>/seed<S>/`` (a normal run directory), and
the comparison is written to ``DIR``:

- ``table.md``: per method the final accuracy (mean ± sd over seeds), total uplink MB, uplink
  bits per parameter per client update, and — against a target of ``--target`` (0.95) times
  the first config's mean final accuracy — the uplink MB and rounds to reach it (mean over the
  seeds that reached it) and the ratio of the first config's bytes to target to the method's;
- ``results.json`` (every run's summary and per-round rows), ``accuracy_vs_round.png``,
  ``accuracy_vs_uplink.png`` (mean over seeds; the band is ± one sd).

A run directory that already holds a ``summary.json`` is reused, so an interrupted
comparison continues where it stopped with the same command.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsqueeze.config import ConfigError, anchor_paths, load_toml, resolve_config

FEDERATION_KEYS = ("dataset", "partition", "dirichlet-alpha", "shards-per-client", "num-clients")
"""Keys every compared config must share: the data and how it is split among clients."""

Runner = Callable[[Mapping[str, Any], Path], Mapping[str, Any]]


@dataclass(frozen=True)
class Method:
    """One compared config."""

    name: str
    label: str
    config: dict[str, Any]


def load_methods(paths: Sequence[str | Path], same_federation: bool = True) -> list[Method]:
    """Read and validate every config before anything runs (raises ConfigError)."""
    if not paths:
        raise ConfigError("compare needs at least one CONFIG.toml")
    methods: list[Method] = []
    for path in map(Path, paths):
        raw = anchor_paths(load_toml(path))  # paths relative to the cwd, recorded absolute
        label = str(raw.pop("label", path.stem))
        raw.pop("out-dir", None)
        try:
            config = resolve_config(raw)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        if any(m.name == path.stem for m in methods):
            raise ConfigError(f"two configs are named {path.stem!r}; rename one")
        methods.append(Method(path.stem, label, dict(config)))
    if same_federation:
        first = methods[0]
        for m in methods[1:]:
            differ = [k for k in FEDERATION_KEYS if m.config[k] != first.config[k]]
            if differ:
                raise ConfigError(
                    f"{m.name} and {first.name} are different federations ({', '.join(differ)} "
                    "differ); compare runs methods on one federation"
                )
    return methods


def seeds_of(method: Method, n_seeds: int) -> list[int]:
    """The seeds a method runs with: its config's ``seed`` and the ``n_seeds - 1`` after it."""
    return [int(method.config["seed"]) + i for i in range(n_seeds)]


def run_path(out: Path, method: Method, seed: int) -> Path:
    return out / method.name / f"seed{seed}"


def run_all(
    methods: Sequence[Method],
    n_seeds: int,
    out: Path,
    runner: Runner,
    log: Callable[[str], None] = print,
) -> None:
    """Run every method with every seed (reusing finished run directories): all methods with
    their first seed, then all with their second, ... so a stopped comparison has whole seeds."""
    for i in range(n_seeds):
        for method in methods:
            seed = seeds_of(method, n_seeds)[i]
            run_dir = run_path(out, method, seed)
            if (run_dir / "summary.json").is_file():
                log(f"== {method.name} seed {seed}: done before, reused")
                continue
            if run_dir.exists():
                shutil.rmtree(run_dir)  # an interrupted run: start it again
            run_dir.mkdir(parents=True)
            config = {**method.config, "seed": seed, "out-dir": str(run_dir)}
            log(f"== {method.name} seed {seed}: {method.label}")
            summary = runner(config, run_dir)
            log(
                f"   final acc {summary['final_accuracy']:.4f}  "
                f"uplink {summary['total_uplink_bytes'] / 1e6:.3f} MB"
            )


def load_run(run_dir: Path) -> dict[str, Any]:
    """A finished run directory's summary and per-round rows."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return {"summary": summary, "rounds": rows}


def collect(methods: Sequence[Method], n_seeds: int, out: Path) -> list[dict[str, Any]]:
    """Every method's runs, read back from their run directories."""
    return [
        {
            "name": m.name,
            "label": m.label,
            "runs": [load_run(run_path(out, m, s)) for s in seeds_of(m, n_seeds)],
        }
        for m in methods
    ]


# ---------------------------------------------------------------------------- statistics


def cumulative_uplink(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    return np.cumsum([float(r["uplink_bytes"]) for r in rows])


def reach(rows: Sequence[Mapping[str, Any]], target: float) -> tuple[int, float] | None:
    """``(round, cumulative uplink bytes)`` when accuracy first reaches ``target``, or None."""
    for r, cum in zip(rows, cumulative_uplink(rows), strict=True):
        if float(r["accuracy"]) >= target:
            return int(r["round"]), float(cum)
    return None


def uplink_to_reach(rows: Sequence[Mapping[str, Any]], target: float) -> float | None:
    """Cumulative uplink bytes when accuracy first reaches ``target`` (None if never)."""
    hit = reach(rows, target)
    return None if hit is None else hit[1]


def bits_per_param(run: Mapping[str, Any]) -> float:
    """Uplink bits per parameter per client update that reached the server, over the run."""
    n = int(run["summary"]["num_parameters"])
    updates = sum(
        max(int(r.get("clients", 0)) + int(r.get("rejected_updates", 0)), 1) for r in run["rounds"]
    )
    return 8.0 * float(run["summary"]["total_uplink_bytes"]) / max(updates * n, 1)


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def method_stats(result: Mapping[str, Any], target: float) -> dict[str, Any]:
    """Summary statistics of one method over its seeds."""
    runs = result["runs"]
    finals = [float(r["summary"]["final_accuracy"]) for r in runs]
    hits = [h for r in runs if (h := reach(r["rounds"], target)) is not None]
    acc_mean, acc_sd = _mean_sd(finals)
    return {
        "label": result["label"],
        "seeds": len(runs),
        "final_acc_mean": acc_mean,
        "final_acc_sd": acc_sd,
        "uplink_mb": float(np.mean([r["summary"]["total_uplink_bytes"] for r in runs])) / 1e6,
        "bits_per_param": float(np.mean([bits_per_param(r) for r in runs])),
        "reached": len(hits),
        "mb_to_target": float(np.mean([h[1] for h in hits])) / 1e6 if hits else None,
        "rounds_to_target": float(np.mean([h[0] for h in hits])) if hits else None,
    }


def compare_stats(results: Sequence[Mapping[str, Any]], target_fraction: float) -> dict[str, Any]:
    """The target (``target_fraction`` of the first method's mean final accuracy) and every
    method's statistics against it."""
    base_final = np.mean([r["summary"]["final_accuracy"] for r in results[0]["runs"]])
    target = float(target_fraction * base_final)
    return {"target": target, "methods": [method_stats(r, target) for r in results]}


def table(stats: Mapping[str, Any], target_fraction: float) -> str:
    """The markdown comparison table."""
    methods = stats["methods"]
    base = methods[0]
    lines = [
        f"Target = {target_fraction:g} x {base['label']}'s mean final accuracy = "
        f"{stats['target']:.4f}. Mean over seeds; ± is the sd over seeds; to-target columns "
        "average the seeds that reached it (k/n when not all did).",
        "",
        "| method | seeds | final acc | uplink MB | bits/param | uplink MB to target "
        "| ratio to target | rounds to target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        n = m["seeds"]
        acc = f"{m['final_acc_mean']:.4f}" + (
            f" ± {m['final_acc_sd']:.4f}" if m["seeds"] > 1 else " (1 seed)"
        )
        partial = "" if m["reached"] == n else f" ({m['reached']}/{n})"
        if m["mb_to_target"] is None:
            mb = ratio = rounds = "not reached"
        else:
            mb = f"{m['mb_to_target']:.3f}{partial}"
            rounds = f"{m['rounds_to_target']:.1f}{partial}"
            ratio = (
                f"{base['mb_to_target'] / m['mb_to_target']:.1f}x"
                if base["mb_to_target"] is not None
                else "—"
            )
        lines.append(
            f"| {m['label']} | {n} | {acc} | {m['uplink_mb']:.3f} | {m['bits_per_param']:.3f} "
            f"| {mb} | {ratio} | {rounds} |"
        )
    return "\n".join(lines) + "\n"


def per_round_table(results: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of the mean test accuracy per round, one column per method."""
    curves = [_curve(r)[0] for r in results]
    lines = [
        "| round | " + " | ".join(r["label"] for r in results) + " |",
        "|---" * (len(results) + 1) + "|",
    ]
    for i in range(max(len(c) for c in curves)):
        cells = [f"{c[i]:.4f}" if i < len(c) else "" for c in curves]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _curve(result: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and sd of accuracy per round, and mean cumulative uplink MB (common rounds)."""
    runs = result["runs"]
    n = min(len(r["rounds"]) for r in runs)
    acc = np.array([[float(x["accuracy"]) for x in r["rounds"][:n]] for r in runs])
    up = np.array([cumulative_uplink(r["rounds"][:n]) / 1e6 for r in runs])
    sd = acc.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(n)
    return acc.mean(axis=0), sd, up.mean(axis=0)


def plot(results: Sequence[Mapping[str, Any]], out: Path) -> list[Path]:
    """``accuracy_vs_round.png`` and ``accuracy_vs_uplink.png`` in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, xlabel, log_x in (
        ("accuracy_vs_round.png", "round", False),
        ("accuracy_vs_uplink.png", "cumulative uplink MB (log scale)", True),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in results:
            mean, sd, up = _curve(r)
            x = up if log_x else np.arange(1, mean.size + 1)
            ax.plot(x, mean, marker=".", label=r["label"])
            ax.fill_between(x, mean - sd, mean + sd, alpha=0.15)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    return paths


def write_report(
    results: Sequence[Mapping[str, Any]], out: Path, target_fraction: float = 0.95
) -> str:
    """Write ``table.md``, ``results.json`` and the plots to ``out``; return the table text."""
    check_options(1, target_fraction)
    stats = compare_stats(results, target_fraction)
    text = (
        table(stats, target_fraction) + "\nMean accuracy per round:\n\n" + per_round_table(results)
    )
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"stats": stats, "results": results}, indent=1))
    plot(results, out)
    return text


def check_options(n_seeds: int, target_fraction: float) -> None:
    """Raise ConfigError for a seed count below 1 or a target outside (0, 1]."""
    if n_seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {n_seeds}")
    if not (math.isfinite(target_fraction) and 0 < target_fraction <= 1):
        raise ConfigError(f"--target must be in (0, 1], got {target_fraction}")


def compare(
    paths: Sequence[str | Path],
    n_seeds: int,
    out: Path,
    runner: Runner,
    target_fraction: float = 0.95,
    log: Callable[[str], None] = print,
) -> str:
    """Validate the configs, run them (``runner(config, run_dir)``), write the report."""
    check_options(n_seeds, target_fraction)
    methods = load_methods(paths)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    run_all(methods, n_seeds, out, runner, log)
    return write_report(collect(methods, n_seeds, out), out, target_fraction)


# ------------------------------------------------------------------------ sequential engine


def sequential_runner(config: Mapping[str, Any], run_dir: Path) -> Mapping[str, Any]:
    """Run one federation on an :class:`~fedsqueeze.inprocess.InProcessGrid` (no Ray)."""
    from fedsqueeze.client.app import build_client_app
    from fedsqueeze.server.rounds import run_federation
    from fedsqueeze.server.rundir import RunDir

    try:  # what a SuperLink sets for a ServerApp run (Messages read it)
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    except ImportError:  # older Flower: Messages need no task identity
        pass
    from fedsqueeze.inprocess import InProcessGrid

    grid = InProcessGrid(build_client_app(dict(config)), int(config["num-clients"]))
    return run_federation(grid, config, RunDir(run_dir), node_timeout=float(config["node-timeout"]))
