"""Installed size of ``pip install fedsqueeze`` (the light device client) and of each extra.

Usage::

    python benchmarks/install_size.py [--extras base,server,simulation,edge,export,all]
                                      [--repeats 3] [--out FILE.json]

For each variant, the distributions it needs are resolved from this checkout's
``pyproject.toml`` and the installed distributions' ``Requires-Dist`` (markers evaluated),
in the environment this runs in (``make setup`` installs every extra); a variant's size is
the sum of the files those distributions installed (their RECORDs), plus fedsqueeze's own
package files. Reported: the whole variant, torch's share (``torch`` and any
``nvidia-*``/``triton``) and what an extra adds to the base install. The sizes are those of
the versions installed here (CPU torch on x86 Linux); a fresh
``pip install --target DIR fedsqueeze-*.whl`` of the base install gave the same within 0.3 %.

Also times ``import fedsqueeze.client.app`` (the ClientApp a SuperNode loads) against
``import flwr.simulation`` + the ServerApp (what a simulation imports), each in a fresh
interpreter with bytecode present, median of ``--repeats``: a ratio, since absolute times
depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TORCH_DISTS = ("torch", "triton")
"""Distributions counted as torch's share (plus every ``nvidia-*``)."""


def _canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def env_closure(extra: str) -> set[str]:
    """Distributions a variant needs, from the current environment's installed metadata
    (``Requires-Dist`` with markers evaluated), fedsqueeze's own from this checkout."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    todo: list[tuple[Requirement, str]] = [(Requirement(r), "") for r in project["dependencies"]]
    extras = {extra} if extra != "base" else set()
    while extras:  # self-referencing extras (fedsqueeze[server] inside simulation)
        name = extras.pop()
        for r in project["optional-dependencies"][name]:
            req = Requirement(r)
            if _canon(req.name) == "fedsqueeze":
                extras |= set(req.extras)
            else:
                todo.append((req, ""))
    seen: set[str] = set()
    while todo:
        req, _ = todo.pop()
        name = _canon(req.name)
        if name in seen:
            continue
        seen.add(name)
        dist = metadata.distribution(req.name)
        for raw in dist.requires or []:
            sub = Requirement(raw)
            for e in ["", *sorted(req.extras)]:
                if sub.marker is None or sub.marker.evaluate({"extra": e}):
                    todo.append((sub, e))
                    break
    return seen


def env_dist_bytes(names: set[str]) -> dict[str, int]:
    """Bytes on disk of installed distributions (files their RECORDs list)."""
    from importlib import metadata

    sizes = {}
    for name in names:
        dist = metadata.distribution(name)
        total = 0
        for f in dist.files or []:
            path = Path(str(dist.locate_file(f)))
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        sizes[name] = total
    return sizes


def is_torch(name: str) -> bool:
    return name in TORCH_DISTS or name.startswith("nvidia-")


def import_seconds(code: str, repeats: int) -> float:
    """Median wall seconds of ``code`` in a fresh interpreter (after one warm-up run)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), FLWR_TELEMETRY_ENABLED="0")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    prog = f"import time; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"
    runs = []
    for i in range(repeats + 1):
        out = subprocess.run(
            [sys.executable, "-c", prog], env=env, capture_output=True, text=True, check=True
        )
        if i:
            runs.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(runs)


def report(variants: dict[str, set[str]], sizes: dict[str, int]) -> dict[str, object]:
    """Per variant: total, torch's share, what it adds to the base install."""
    out: dict[str, object] = {}
    base = variants.get("base", set())
    for extra, dists in variants.items():
        total = sum(sizes[d] for d in dists)
        torch = sum(sizes[d] for d in dists if is_torch(d))
        added = sorted(dists - base)
        row = {
            "total_mb": round(total / 1e6, 1),
            "torch_mb": round(torch / 1e6, 1),
            "without_torch_mb": round((total - torch) / 1e6, 1),
            "added_to_base_mb": round(sum(sizes[d] for d in added) / 1e6, 1),
            "distributions": len(dists),
            "largest_added": {
                d: round(sizes[d] / 1e6, 1) for d in sorted(added, key=lambda d: -sizes[d])[:6]
            },
        }
        out[extra] = row
        print(extra, json.dumps(row), flush=True)
    return out


def from_env(args: argparse.Namespace) -> None:
    variants = {extra: env_closure(extra) for extra in args.extras.split(",")}
    names = set().union(*variants.values()) - {"fedsqueeze"}
    sizes = env_dist_bytes(names)
    # fedsqueeze itself (an editable install here): its package files in this checkout.
    sizes["fedsqueeze"] = sum(p.stat().st_size for p in (REPO / "fedsqueeze").rglob("*.py"))
    for dists in variants.values():
        dists.add("fedsqueeze")
    result: dict[str, object] = {"python": sys.version.split()[0]}
    result["variants"] = report(variants, sizes)
    client = import_seconds("import fedsqueeze.client.app", args.repeats)
    sim = import_seconds(
        "import flwr.simulation, fedsqueeze.server.app, fedsqueeze.client.app", args.repeats
    )
    result["import_s"] = {"client": client, "simulation": sim, "ratio": client / sim}
    print("import", json.dumps(result["import_s"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--extras", default="base,server,simulation,edge,export,all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    from_env(parser.parse_args())


if __name__ == "__main__":
    main()
