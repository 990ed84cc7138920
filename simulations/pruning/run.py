"""Pruned federations against the dense one, side by side: accuracy, sparsity, model and bytes.

    python simulations/pruning/run.py [SUITE ...] [--only NAME ...] [--set key=value ...]
        [--results FILE] [--keep-runs DIR] [--redo]

Runs every ``*.toml`` of the suite directories (default: ``simulations/pruning``) through
fedsqueeze's round loop (``run_federation``: the same strategy chain, client mods and
ClientApp as ``fedsqueeze simulate``) over an in-process grid — each message is delivered to
the ClientApp in this process rather than through Ray, which on a shared 2-core machine
spends most of a round starting and scheduling 20 actors. Bytes are unaffected: they are the
protobuf sizes of the same Flower messages (``CountingGrid``). Writes
``simulations/results/<suite>/results.json`` (after each config, so an interrupted runner
restarted with the same arguments skips the configs it finished; ``--redo`` runs them again)
and prints the table of ``report.py``. ``--keep-runs DIR`` keeps each run directory as
``DIR/<suite>/<config>`` (checkpoint included), for ``fedsqueeze export`` of its final model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_config(path: Path, overrides: dict[str, str], keep: Path | None = None) -> dict:
    from flwr.supercore.task_identity import TaskIdentity

    from fedsqueeze.client.app import build_client_app
    from fedsqueeze.config import load_toml, resolve_config
    from fedsqueeze.inprocess import InProcessGrid
    from fedsqueeze.server.rounds import run_federation
    from fedsqueeze.server.rundir import RunDir

    # Flower needs a task identity to build messages outside its engines.
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1
    raw = load_toml(path)
    label = str(raw.pop("label", path.stem))
    raw.update(overrides)
    cfg = resolve_config(raw)
    if keep is not None:
        # an unfinished run of an interrupted runner is started again from nothing
        shutil.rmtree(keep, ignore_errors=True)
        keep.parent.mkdir(parents=True, exist_ok=True)
    out = keep or Path(tempfile.mkdtemp(prefix=f"prune-{path.stem}-"))
    try:
        grid = InProcessGrid(build_client_app(cfg), int(cfg["num-clients"]))
        summary = run_federation(grid, cfg, RunDir(out), node_timeout=60)
        rows = RunDir(out).read_metrics()
    finally:
        if keep is None:
            shutil.rmtree(out, ignore_errors=True)
    return {"name": path.stem, "label": label, "summary": summary, "rounds": rows}


def main(argv: list[str] | None = None) -> int:
    import logging

    from report import table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suites", nargs="*", default=["pruning"])
    parser.add_argument("--set", nargs="*", default=[], help="key=value overriding every config")
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument(
        "--results", default="results.json", help="file name (two runners in parallel: two files)"
    )
    parser.add_argument("--keep-runs", default="", help="keep run directories under this one")
    parser.add_argument("--redo", action="store_true", help="run configs already in --results")
    args = parser.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    import torch

    # One thread, as the Simulation Engine gives each client one CPU: on a shared machine
    # torch's intra-op threads otherwise spin against each other (rounds several times slower here).
    torch.set_num_threads(1)
    for suite in args.suites:
        configs = sorted((ROOT / "simulations" / suite).glob("*.toml"))
        results_path = ROOT / "simulations" / "results" / suite / args.results
        results_path.parent.mkdir(parents=True, exist_ok=True)
        done = json.loads(results_path.read_text()) if results_path.exists() else []
        by_name = {r["name"]: r for r in done}
        # --only also sets the order (run what matters most first on a busy machine)
        todo = [p for name in args.only for p in configs if p.stem == name] or configs
        for path in todo:
            if path.stem in by_name and not args.redo:
                print(f"== {suite}/{path.stem}: done, skipped", flush=True)
                continue
            print(f"== {suite}/{path.stem}", flush=True)
            keep = Path(args.keep_runs) / suite / path.stem if args.keep_runs else None
            overrides = dict(kv.split("=", 1) for kv in args.set)
            by_name[path.stem] = run_config(path, overrides, keep)
            s = by_name[path.stem]["summary"]
            print(f"   final acc {s['final_accuracy']:.4f}", flush=True)
            results = [by_name[p.stem] for p in configs if p.stem in by_name]
            results_path.write_text(json.dumps(results, indent=1))
        print(table([by_name[p.stem] for p in configs if p.stem in by_name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
