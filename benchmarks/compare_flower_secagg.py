"""fedsqueeze SecAgg+ against Flower's legacy SecAgg+ on the same federation, one command.

    .venv/bin/python benchmarks/compare_flower_secagg.py [--rounds 3] [--clients 10] \
        [--long-rounds 20]

Both run in Flower's Simulation Engine (``run_simulation``) on digits / mlp, every client
every round, the same partitions, model, local training, graph degree and threshold:

- Flower: ``NumPyClient`` + ``secaggplus_mod``; ``DefaultWorkflow(fit_workflow=
  SecAggPlusWorkflow(...))`` with a ``LegacyContext`` and legacy FedAvg.
- fedsqueeze: ``fedsqueeze simulate`` with ``secagg = true``.

Measured, all from the runs themselves:

- uplink bytes per client per round: the serialized size of every reply's RecordDict
  (both run through :class:`~fedsqueeze.server.grid.CountingGrid`);
- client masking time: time of the masking stage(s) minus the training inside them
  (timing mods around the secure mod and around the training, written to a file);
- server unmasking time: from the arrival of the unmask replies to the unmasked sum;
- final accuracy on the digits test split.

Dropouts (20%) make the same clients fail at the same stages in both systems
(``fedsqueeze.server.secure.simulated_dropouts`` on partition ids).

Random-k at 10% moves a tenth of the coordinates per round, so with error feedback it
needs more rounds than dense to reach the same accuracy; ``--long-rounds N`` (0 = off)
adds a second table: fedsqueeze dense against random-k 10% + ef over N rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
_TMP = Path(tempfile.mkdtemp(prefix="fsq-bench-"))
for _var in ("FLWR_HOME", "RAY_TMPDIR"):
    os.environ.setdefault(_var, str(_TMP / _var.lower()))
    Path(os.environ[_var]).mkdir(parents=True, exist_ok=True)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from flwr.app import Context, Message  # noqa: E402

from fedsqueeze.contracts.records import serialized_size  # noqa: E402
from fedsqueeze.contracts.secure_wire import CHECK, MASK, SECAGG_KEY, SETUP, SHARE, UNMASK  # noqa: E402
from fedsqueeze.server.grid import CountingGrid  # noqa: E402
from fedsqueeze.server.secure import simulated_dropouts  # noqa: E402

FLOWER_STAGES = {
    "setup": (SETUP,),
    "share_keys": (SHARE,),
    "collect_masked_vectors": (MASK,),
    # Flower has no consistency check: a client that fails there fails at unmasking.
    "unmask": (CHECK, UNMASK),
}


def _log(path: str, **row: Any) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _read(path: str) -> list[dict[str, Any]]:
    p = Path(path)
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


# ------------------------------------------------------------------------------ Flower


def run_flower(cfg: dict[str, Any], drop: float, timing_file: str) -> dict[str, Any]:
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.simulation import run_simulation

    from fedsqueeze.client.training import (
        evaluate,
        load_numpy_state,
        make_generator,
        state_to_numpy,
        train_local,
    )
    from fedsqueeze.federation import client_train_data, dataset_for, new_model

    n, rounds, seed = int(cfg["num-clients"]), int(cfg["num-rounds"]), int(cfg["seed"])
    names = list(state_to_numpy(new_model(cfg, seed=seed)))
    k = int(cfg["secagg-neighbours"])
    t = int(cfg["secagg-threshold"])

    class Client(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
            x, y = client_train_data(cfg, self.pid, n)
            model = new_model(cfg)
            load_numpy_state(model, dict(zip(names, parameters, strict=True)))
            train_local(
                model, x, y, epochs=int(cfg["local-epochs"]), batch_size=int(cfg["batch-size"]),
                lr=float(cfg["lr"]), momentum=float(cfg["momentum"]), weight_decay=0.0,
                proximal_mu=0.0, generator=make_generator(seed, 0, self.pid),
            )  # fmt: skip
            return list(state_to_numpy(model).values()), len(x), {}

    def client_fn(context: Context) -> Any:
        return Client(int(context.node_config["partition-id"])).to_client()

    def outer(msg: Message, context: Context, call_next: Any) -> Message:
        stage = ""
        if msg.metadata.message_type == "train":
            stage = str(msg.content.config_records[RECORD_KEY_CONFIGS]["stage"])
            pid = int(context.node_config["partition-id"])
            plan = simulated_dropouts(seed, int(msg.metadata.group_id), list(range(n)), drop)
            if plan.get(pid) in FLOWER_STAGES[stage]:
                raise RuntimeError(f"simulated dropout at {stage}")
        t0 = time.perf_counter()
        reply = call_next(msg, context)
        if stage:
            _log(timing_file, who="flower", stage=stage, s=time.perf_counter() - t0)
        return reply

    def inner(msg: Message, context: Context, call_next: Any) -> Message:
        t0 = time.perf_counter()
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train":
            _log(timing_file, who="flower", stage="train", s=time.perf_counter() - t0)
        return reply

    client_app = ClientApp(client_fn=client_fn, mods=[outer, secaggplus_mod, inner])
    ds = dataset_for(cfg)
    accs: list[float] = []
    result: dict[str, Any] = {}

    def evaluate_fn(rnd: int, params: list[np.ndarray], config: dict[str, Any]) -> Any:
        model = new_model(cfg)
        load_numpy_state(model, dict(zip(names, params, strict=True)))
        loss, acc = evaluate(model, ds.x_test, ds.y_test)
        accs.append(acc)
        return loss, {"accuracy": acc}

    class TimedGrid(CountingGrid):
        last_return = 0.0

        def send_and_receive(self, messages: Iterable[Message], *, timeout: Any = None) -> Any:
            replies = super().send_and_receive(messages, timeout=timeout)
            self.last_return = time.perf_counter()
            return replies

    class TimedSecAggPlus(SecAggPlusWorkflow):
        unmask_s: ClassVar[list[float]] = []

        def unmask_stage(self, grid: Any, context: Any, state: Any) -> bool:
            ok = super().unmask_stage(grid, context, state)
            self.unmask_s.append(time.perf_counter() - grid.last_return)
            return ok

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Context) -> None:
        timed = TimedGrid(grid)
        init = list(state_to_numpy(new_model(cfg, seed=seed)).values())
        strategy = FedAvg(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n,
            min_available_clients=n, initial_parameters=ndarrays_to_parameters(init),
            evaluate_fn=evaluate_fn,
        )  # fmt: skip
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        workflow = TimedSecAggPlus(num_shares=k + 1, reconstruction_threshold=t, timeout=600)
        t0 = time.perf_counter()
        DefaultWorkflow(fit_workflow=workflow)(timed, legacy)
        result.update(
            uplink=timed.uplink_bytes, downlink=timed.downlink_bytes,
            unmask_s=list(workflow.unmask_s), wall=time.perf_counter() - t0,
        )  # fmt: skip

    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=n,
        backend_config={
            "client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
        },
    )  # fmt: skip
    result["accuracy"] = accs[-1] if accs else float("nan")
    timings = [r for r in _read(timing_file) if r["who"] == "flower"]
    masked = [r["s"] for r in timings if r["stage"] == "collect_masked_vectors"]
    train = [r["s"] for r in timings if r["stage"] == "train"]
    result["client_mask_s"] = (sum(masked) - sum(train)) / max(len(masked), 1)
    return result


# -------------------------------------------------------------------------- fedsqueeze


def run_ours(cfg: dict[str, Any], timing_file: str, run_dir: Path) -> dict[str, Any]:
    import fedsqueeze.client.app as client_app_module
    from fedsqueeze.cli import simulate

    def outer(msg: Message, context: Context, call_next: Any) -> Message:
        t0 = time.perf_counter()
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train":
            record = msg.content.config_records.get(SECAGG_KEY)
            stage = "" if record is None else str(record.get("stage", ""))
            _log(
                timing_file, who="ours", stage=stage, s=time.perf_counter() - t0,
                up=serialized_size(reply.content), down=serialized_size(msg.content),
            )  # fmt: skip
        return reply

    def timed_handler(msg: Message, context: Context, call_next: Any) -> Message:
        t0 = time.perf_counter()
        reply = call_next(msg, context)  # innermost: times the train handler alone
        if msg.metadata.message_type == "train" and msg.content.array_records:
            _log(timing_file, who="ours", stage="train", s=time.perf_counter() - t0)
        return reply

    original, mods = client_app_module.build_client_app, client_app_module.MODS
    client_app_module.MODS = (*mods, timed_handler)  # build_client_app reads it when called
    client_app_module.build_client_app = lambda c, extra_mods=(): original(c, [outer])
    try:
        summary = simulate(cfg, run_dir, quiet=True)
    finally:
        client_app_module.MODS = mods
        client_app_module.build_client_app = original
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timings = [r for r in _read(timing_file) if r["who"] == "ours"]
    setup = sum(r["s"] for r in timings if r["stage"] == "setup")
    mask = [r["s"] for r in timings if r["stage"] == "mask"]
    train = sum(r["s"] for r in timings if r["stage"] == "train")
    check = [r for r in timings if r["stage"] == CHECK]
    return {
        # The consistency round: U3 down, the 64-byte signature up (its signatures forwarded
        # to each client ride in the unmask request, counted under unmask).
        "check_up": float(np.mean([r["up"] for r in check])) if check else float("nan"),
        "check_down": float(np.mean([r["down"] for r in check])) if check else float("nan"),
        "check_s": float(np.mean([r["s"] for r in check])) if check else float("nan"),
        "setup_up": float(np.mean([r["up"] for r in timings if r["stage"] == SETUP])),
        "uplink": sum(r["uplink_bytes"] for r in rows),
        "unmask_s": [r.get("secagg_unmask_s", float("nan")) for r in rows],
        "accuracy": summary["final_accuracy"],
        "client_mask_s": (setup - train + sum(mask)) / max(len(mask), 1),
        "bits": rows[-1]["secagg_bits"],
        "accuracies": [float(r["accuracy"]) for r in rows],
        "dropped": sum(r["dropped_clients"] for r in rows),
    }


def isolated(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a fresh interpreter running this script (``--job``): each run gets its
    own Ray and Flower state (one process running Flower's simulation and then ours has died
    silently on a loaded machine), and the script stays ``__main__`` there, as Ray needs to
    ship its mods to the workers."""
    with tempfile.TemporaryDirectory() as tmp:
        job, result = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        job.write_bytes(pickle.dumps((fn.__name__, args)))
        subprocess.run([sys.executable, __file__, "--job", str(job), str(result)], check=True)
        return pickle.loads(result.read_bytes())


def _run_job(job: str, result: str) -> None:
    name, args = pickle.loads(Path(job).read_bytes())
    Path(result).write_bytes(pickle.dumps(globals()[name](*args)))


# -------------------------------------------------------------------------------- main


def _long_table(base: dict[str, Any], args: Any, ref_up: float, work: Path) -> list[str]:
    """Dense against random-k 10% + ef over ``--long-rounds`` rounds (no dropouts)."""
    from fedsqueeze.config import resolve_config

    n, rounds = args.clients, args.long_rounds
    marks = sorted({r for r in (args.rounds, 5, 10, 15, 20, 30, rounds) if r <= rounds})
    lines = [
        "",
        f"Accuracy over {rounds} rounds (fedsqueeze only, 0% dropout, same federation; "
        f"`--long-rounds {rounds}`):",
        "",
        "| system | uplink B/client/round | vs Flower | "
        + " | ".join(f"acc. round {r}" for r in marks)
        + " |",
        "|---|---|---|" + "---|" * len(marks),
    ]
    for label, extra in (
        (f"fedsqueeze dense, {args.bits} bits", {}),
        (f"fedsqueeze random-k 10% + ef, {args.bits} bits", {"codec": "randk(0.1)+ef"}),
    ):
        c = resolve_config(base, extra, {"num-rounds": rounds})
        print(f"{label}, {rounds} rounds ...", flush=True)
        r = isolated(
            run_ours, c, str(work / f"long-{len(lines)}.jsonl"), work / f"long-{len(lines)}"
        )
        up = r["uplink"] / (n * rounds)
        accs = r["accuracies"]
        lines.append(
            f"| {label} | {up:,.0f} | {ref_up / up:.1f}x | "
            + " | ".join(f"{accs[m - 1]:.4f}" for m in marks)
            + " |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--neighbours", type=int, default=9)
    parser.add_argument("--bits", type=int, default=12)
    parser.add_argument("--long-rounds", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "simulations" / "secagg" / "table.md"))
    args = parser.parse_args()

    from fedsqueeze.config import resolve_config
    from fedsqueeze.federation import new_model

    n = args.clients
    k = args.neighbours
    base = {
        "dataset": "digits", "model": "mlp", "num-clients": n, "clients-per-round": n,
        "num-rounds": args.rounds, "local-epochs": 2, "lr": 0.05, "secagg": True,
        "secagg-neighbours": k, "secagg-threshold": (k + 1) // 2 + 1, "secagg-clip": 10.0,
        "secagg-bits": args.bits,
    }  # fmt: skip
    cfg = resolve_config(base)
    d = sum(p.numel() for p in new_model(cfg).parameters())
    work = Path(tempfile.mkdtemp(prefix="fsq-cmp-"))
    runs: list[tuple[str, float, dict[str, Any]]] = []
    for drop in (0.0, 0.2):
        tf = str(work / f"flower-{drop}.jsonl")
        print(f"Flower SecAgg+, dropout {drop:.0%} ...", flush=True)
        runs.append(("Flower SecAgg+ (int64)", drop, isolated(run_flower, cfg, drop, tf)))
    variants = [
        (f"fedsqueeze dense, {args.bits} bits", {}),
        (f"fedsqueeze random-k 10%, {args.bits} bits", {"codec": "randk(0.1)"}),
        (f"fedsqueeze random-k 10% + ef, {args.bits} bits", {"codec": "randk(0.1)+ef"}),
    ]
    for label, extra in variants:
        for drop in (0.0, 0.2):
            if extra and drop:
                continue
            c = resolve_config(base, extra, {"simulate-dropout": drop})
            tf = str(work / f"ours-{len(runs)}.jsonl")
            print(f"{label}, dropout {drop:.0%} ...", flush=True)
            runs.append((label, drop, isolated(run_ours, c, tf, work / f"run-{len(runs)}")))

    ref = next(r for name, drop, r in runs if name.startswith("Flower") and drop == 0)
    ref_up = ref["uplink"] / (n * args.rounds)
    lines = [
        f"digits / mlp ({d} parameters), {n} clients per round, {args.rounds} rounds, "
        f"SecAgg+ with {k} neighbours, threshold {(k + 1) // 2 + 1}; "
        f"`.venv/bin/python benchmarks/compare_flower_secagg.py --rounds {args.rounds} "
        f"--clients {n} --neighbours {k} --bits {args.bits}`",
        "",
        "| system | dropout | uplink B/client/round | vs Flower | client masking "
        "(x Flower) | server unmask (x Flower) | consistency check B up / down | "
        "final accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref_mask = ref["client_mask_s"]
    ref_unmask = float(np.mean(ref["unmask_s"]))
    for name, drop, r in runs:
        up = r["uplink"] / (n * args.rounds)
        unmask = float(np.mean(r["unmask_s"]))
        check = f"{r['check_up']:,.0f} / {r['check_down']:,.0f}" if "check_up" in r else "none"
        lines.append(
            f"| {name} | {drop:.0%} | {up:,.0f} | {ref_up / up:.1f}x | "
            f"{r['client_mask_s'] / ref_mask:.2f} | {unmask / ref_unmask:.2f} | {check} | "
            f"{r['accuracy']:.4f} |"
        )
    lines += [
        "",
        "Uplink counts every protocol reply (keys, encrypted shares, masked vector, "
        "unmasking shares, metrics), serialized as Flower does. Client masking = the "
        "masking stage(s) minus the local training inside them, mean per client and round. "
        "Server unmask = from the arrival of the unmask replies to the unmasked sum. Times "
        "are ratios to Flower's (0% dropout) in the same invocation; the machine was shared, "
        "so only ratios are meaningful. Consistency check = fedsqueeze's extra stage "
        "(Bonawitz et al.): mean serialized reply (signature) / request (survivor set) per "
        "client and round; each unmask request also carries t..k+1 forwarded 64-byte "
        "signatures, and the setup reply 32 bytes of signing key.",
    ]
    if args.long_rounds > 0:
        lines += _long_table(base, args, ref_up, work)
    table = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)
    print(table)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--job"]:
        _run_job(sys.argv[2], sys.argv[3])
    else:
        main()
