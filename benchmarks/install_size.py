"""Installed size of ``pip install fedsqueeze`` (the light device client) and of each extra.

Usage::

    python benchmarks/install_size.py [--extras base,server,simulation,edge,export,all]
                                      [--out FILE.json] [--keep DIR]

Builds fedsqueeze's wheel from this checkout, then installs it with its dependencies into a
fresh, empty ``pip install --target`` directory per variant (the package index and wheels
pip is configured with; bytecode compiled, as a normal install does) and reports
``du``-style sizes: the whole variant, torch's share (``torch`` plus any ``nvidia*`` /
``triton`` packages it pulled), and what the extra adds on top of the base install. On
x86 Linux torch must resolve to the CPU wheel (pip's find-links here; elsewhere pass
``--extra-index-url https://download.pytorch.org/whl/cpu`` through ``PIP_EXTRA_INDEX_URL``).

Also times ``import fedsqueeze.client.app`` (the ClientApp a SuperNode loads) against
``import flwr.simulation`` + the ServerApp (what a simulation imports), each in a fresh
interpreter with bytecode present, median of ``--repeats``: a ratio, since absolute times
depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TORCH_PARTS = ("torch", "nvidia", "triton", "functorch", "torchgen")


def tree_bytes(path: Path) -> int:
    """Bytes of the files below ``path`` (what ``du --apparent-size -b`` counts)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            p = Path(root, name)
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def build_wheel(out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(REPO)],
        check=True,
    )
    return next(out.glob("fedsqueeze-*.whl"))


def install(wheel: Path, extra: str, target: Path) -> None:
    spec = str(wheel) if extra == "base" else f"fedsqueeze[{extra}] @ {wheel.as_uri()}"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), spec],
        check=True,
    )


def sizes(target: Path) -> dict[str, float]:
    total = tree_bytes(target)
    torch = sum(
        tree_bytes(p)
        for p in target.iterdir()
        if p.is_dir() and p.name.split("-")[0].split(".")[0].startswith(TORCH_PARTS)
    )
    top = sorted(
        ((tree_bytes(p), p.name) for p in target.iterdir() if p.is_dir()), reverse=True
    )[:8]
    return {
        "total_mb": total / 1e6,
        "torch_mb": torch / 1e6,
        "without_torch_mb": (total - torch) / 1e6,
        "largest": {name: round(b / 1e6, 1) for b, name in top},
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--extras", default="base,server,simulation,edge,export,all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    parser.add_argument("--keep", help="install the variants under DIR and keep them")
    args = parser.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fsq-size-"))
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, object] = {"python": sys.version.split()[0], "variants": {}}
    try:
        wheel = build_wheel(root / "wheel")
        for extra in args.extras.split(","):
            target = root / extra
            shutil.rmtree(target, ignore_errors=True)
            t0 = time.monotonic()
            install(wheel, extra, target)
            row = sizes(target)
            row["install_s"] = round(time.monotonic() - t0, 1)
            result["variants"][extra] = row  # type: ignore[index]
            print(extra, json.dumps(row), flush=True)
        client = import_seconds("import fedsqueeze.client.app", args.repeats)
        sim = import_seconds(
            "import flwr.simulation, fedsqueeze.server.app, fedsqueeze.client.app", args.repeats
        )
        result["import_s"] = {"client": client, "simulation": sim, "ratio": client / sim}
        print("import", json.dumps(result["import_s"]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
