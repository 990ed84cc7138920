"""Private retraining of a deployed model on devices whose data has drifted.

    python simulations/retrain/run.py [--seeds 3] [--out simulations/results/retrain]

Per seed:

1. *Deployment*: digits' training set is split in half. An MLP is trained centrally on the
   first half as it is (20 epochs of SGD) and saved as a ``model.pt`` (named tensors, the
   format a run directory holds): the deployed model.
2. *Drift*: 5 devices each hold their own ``.npz`` (node config ``data-path``) made from
   the second half with lower contrast, a brightness offset, Gaussian pixel noise, a
   one-pixel shift, and a changed class balance (class c kept with probability ∝ c + 1,
   then split with Dirichlet(1.0) label skew across devices). The server's own test data is
   the test split under the same drift and class balance; the server never sees a device's
   data (``client-data = "device"``).
3. *Retraining* from the deployed model (``init-model``; round 0 = its accuracy on the
   drifted test data, i.e. no retraining) for 3 rounds: non-private, and with local DP
   (DP-SGD on each device, ``dp = "local"``) at ε = 1, 4, 8 per device (δ = 1e-3 < 1/n),
   training only the last layer (``train-layers = "last"``), and all layers at ε = 8.

The federation runs the real ClientApp (mods, data-source, DP-SGD) and the real server
round loop and strategy chain, with the nodes in this process (the test suite's
``InProcessGrid``) instead of Ray: the claim is about accuracy, not the engine. Output:
``results.json`` and ``table.md`` (mean ± sd over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

DEVICES = 5
ROUNDS = 3
PRETRAIN_EPOCHS = 20
COMMON: dict[str, Any] = {
    "model": "mlp",
    "num-clients": DEVICES,
    "clients-per-round": DEVICES,
    "num-rounds": ROUNDS,
    "local-epochs": 1,
    "batch-size": 16,
    "lr": 0.05,
}
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("non-private, all layers", {}),
    ("non-private, last layer", {"train-layers": "last"}),
    *[
        (
            f"local DP ε={eps}, {which}",
            {
                "dp": "local",
                "dp-epsilon": eps,
                "dp-delta": 1e-3,
                "dp-clip": 1.0,
                "train-layers": layers,
            },
        )
        for eps, which, layers in (
            (1, "last layer", "last"),
            (4, "last layer", "last"),
            (8, "last layer", "last"),
            (8, "all layers", "all"),
        )
    ],
]


def drift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lower contrast, brighter, noisier, shifted one pixel right: the devices' new inputs."""
    out = 0.6 * x + 0.25 + rng.normal(0.0, 0.15, size=x.shape)
    out = np.roll(out, 1, axis=-1)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def rebalance(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices kept so that class c appears with weight ∝ c + 1 (a changed class balance)."""
    keep = rng.random(len(y)) < (y + 1) / 10.0
    return np.flatnonzero(keep)


def make_data(seed: int, work: Path) -> tuple[Path, Path, list[Path]]:
    """(deployment dataset, server's drifted test dataset, device files)."""
    from fedsqueeze.data import load_dataset

    ds = load_dataset("digits")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(ds.num_train)
    old, new = perm[: ds.num_train // 2], perm[ds.num_train // 2 :]
    deploy = work / "deploy.npz"
    np.savez(
        deploy, x_train=ds.x_train[old], y_train=ds.y_train[old], x_test=ds.x_test, y_test=ds.y_test
    )
    test_idx = rebalance(ds.y_test, rng)
    x_test, y_test = drift(ds.x_test[test_idx], rng), ds.y_test[test_idx]
    server = work / "server.npz"
    # The server's file needs a training split to load; with client-data = "device" it is
    # never used (its own drifted test data stands in).
    np.savez(server, x_train=x_test, y_train=y_test, x_test=x_test, y_test=y_test)
    kept = new[rebalance(ds.y_train[new], rng)]
    x_dev, y_dev = drift(ds.x_train[kept], rng), ds.y_train[kept]
    props = rng.dirichlet(np.ones(DEVICES), size=10)
    owner = np.array([rng.choice(DEVICES, p=props[c]) for c in y_dev])
    files = []
    for d in range(DEVICES):
        path = work / f"device{d}.npz"
        np.savez(path, x_train=x_dev[owner == d], y_train=y_dev[owner == d])
        files.append(path)
    return deploy, server, files


def pretrain(deploy: Path, seed: int, out: Path) -> None:
    """The deployed model: central SGD on the original distribution, saved as model.pt."""
    import torch

    from fedsqueeze.client.training import train_local
    from fedsqueeze.config import resolve_config
    from fedsqueeze.federation import dataset_for, new_model

    cfg = resolve_config(COMMON, {"dataset": f"npz:{deploy}", "seed": seed})
    ds, model = dataset_for(cfg), new_model(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    train_local(
        model,
        ds.x_train,
        ds.y_train,
        epochs=PRETRAIN_EPOCHS,
        batch_size=16,
        lr=0.05,
        momentum=0.9,
        generator=gen,
    )
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")


def federate(config: dict[str, Any], out: Path, node_configs: dict[int, dict[str, Any]]) -> Any:
    from fedsqueeze.client.app import build_client_app
    from fedsqueeze.config import resolve_config
    from fedsqueeze.inprocess import InProcessGrid
    from fedsqueeze.server.rounds import run_federation
    from fedsqueeze.server.rundir import RunDir

    cfg = resolve_config(COMMON, config)
    grid = InProcessGrid(build_client_app(cfg), DEVICES, node_configs)
    run_federation(grid, cfg, RunDir(out), node_timeout=60)
    return RunDir(out).read_metrics()


def run_seed(seed: int, out_root: Path) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix=f"retrain-{seed}-"))
    deploy, server, files = make_data(seed, work)
    base = out_root / f"seed{seed}" / "deployed"
    pretrain(deploy, seed, base)
    devices = {i: {"data-path": str(p)} for i, p in enumerate(files)}
    results = []
    for label, over in VARIANTS:
        name = label.replace(" ", "").replace(",", "-").replace("=", "").replace("ε", "eps")
        rows = federate(
            {
                "dataset": f"npz:{server}",
                "client-data": "device",
                "seed": seed,
                "init-model": str(base / "model.pt"),
                **over,
            },
            out_root / f"seed{seed}" / name,
            devices,
        )
        eps = [r.get("epsilon") for r in rows if r.get("epsilon") is not None]
        results.append(
            {
                "seed": seed,
                "variant": label,
                "no_retraining": rows[0]["accuracy"],
                "final": rows[-1]["accuracy"],
                "epsilon": max(eps) if eps else None,
                "uplink_bytes_per_round": rows[-1]["uplink_bytes"],
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


def table(results: list[dict[str, Any]]) -> str:
    def ms(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    seeds = sorted({r["seed"] for r in results})
    lines = [
        f"| retraining ({len(seeds)} seeds) | test accuracy on drifted data | ε reached | "
        "uplink / round |",
        "|---|---|---|---|",
    ]
    base = [next(r["no_retraining"] for r in results if r["seed"] == s) for s in seeds]
    lines.append(f"| none (deployed model, round 0) | {ms(base)} | – | 0 |")
    for label, _ in VARIANTS:
        rows = [r for r in results if r["variant"] == label]
        eps = [r["epsilon"] for r in rows if r["epsilon"] is not None]
        eps_text = f"{max(eps):.2f}" if eps else "∞ (no DP)"
        up = int(statistics.mean(r["uplink_bytes_per_round"] for r in rows))
        lines.append(f"| {label} | {ms([r['final'] for r in rows])} | {eps_text} | {up} B |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "simulations" / "results" / "retrain")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        results += run_seed(seed, args.out)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        (args.out / "table.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    from flwr.supercore.task_identity import TaskIdentity

    # Messages are built outside a Flower process here (as in the test suite).
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    import torch

    torch.set_num_threads(1)  # tiny models: threads only add contention on a shared machine
    main()
