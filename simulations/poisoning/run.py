"""One hostile client out of ten: does it take over the model?

    python simulations/poisoning/run.py [--seeds 3] [--rounds 5] [--set key=value ...]
    python simulations/poisoning/run.py --set partition=dirichlet --set dirichlet-alpha=0.5

Runs the real ClientApp (training, mods) and the server's round loop and strategy chain
(``run_federation``) over the in-process grid the tests use (``fedsqueeze/inprocess.py``: every
message goes to the ClientApp in this process; no Ray), on digits / mlp with 10 clients, all
sampled every round. Client 0 carries an outermost mod that rewrites its train reply:

- ``norm``: its update flipped and scaled by 1000 (a finite update of huge norm);
- ``weight``: an all-zero model claiming ``num-examples = 10**12``.

Each attack runs with the default bounds (``max-update-norm`` and the round-relative
``update-norm-factor``), the huge-norm one also with only the absolute bound and with no bound;
the claimed weight is always capped at the largest partition. Prints a markdown table of final
test accuracy, mean ± sd over the seeds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

ATTACKS = ("none", "norm", "weight")


def hostile_mod(attack: str) -> Any:
    import numpy as np
    from flwr.app import Message

    from fedsqueeze.contracts.records import from_record, to_record

    def mod(msg: Message, context: Any, call_next: Any) -> Message:
        reply = call_next(msg, context)
        if (
            attack == "none"
            or int(context.node_config["partition-id"]) != 0
            or msg.metadata.message_type != "train"
            or reply.has_error()
        ):
            return reply
        sent = from_record(msg.content["arrays"])
        local = from_record(reply.content["arrays"])
        if attack == "norm":
            bad = {k: (sent[k] - 1000.0 * (local[k] - sent[k])).astype(np.float32) for k in sent}
        else:
            bad = {k: np.zeros_like(v) for k, v in sent.items()}
            reply.content["metrics"]["num-examples"] = 10**12
        reply.content["arrays"] = to_record(bad)
        return reply

    return mod


def run(config: dict[str, Any], attack: str) -> float:
    from flwr.supercore.task_identity import TaskIdentity

    from fedsqueeze.client.app import build_client_app
    from fedsqueeze.inprocess import InProcessGrid
    from fedsqueeze.server.rounds import run_federation
    from fedsqueeze.server.rundir import RunDir

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    app = build_client_app(config, extra_mods=[hostile_mod(attack)])
    grid = InProcessGrid(app, int(config["num-clients"]))
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_federation(grid, config, RunDir(Path(tmp) / "run"), node_timeout=5)
    return float(summary["final_accuracy"])


def main() -> None:
    import logging

    from fedsqueeze.config import DEFAULTS, resolve_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--only", action="append", default=[], metavar="ATTACK:NORM:FACTOR", help="e.g. norm:0:0"
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    base = {"dataset": "digits", "model": "mlp", "num-clients": 10, "clients-per-round": 10}
    base["num-rounds"] = args.rounds
    base.update(dict(kv.split("=", 1) for kv in args.set))
    resolved = resolve_config(base)
    bound, factor = resolved["max-update-norm"], resolved["update-norm-factor"]
    rows = [
        ("none", bound, factor),
        ("norm", bound, factor),
        ("weight", bound, factor),
        ("norm", bound, 0.0),
        ("norm", 0.0, 0.0),
    ]
    if args.only:
        rows = [(a, float(n), float(f)) for a, n, f in (row.split(":") for row in args.only)]
    part = str(resolved["partition"])
    if part == "dirichlet":
        part += f" (alpha {resolved['dirichlet-alpha']:g})"
    print(
        f"digits / mlp, 10 clients, partition {part}, {args.rounds} rounds, "
        f"seeds 0..{args.seeds - 1}; defaults "
        f"max-update-norm = {DEFAULTS['max-update-norm']}, "
        f"update-norm-factor = {DEFAULTS['update-norm-factor']}"
    )
    print("| attack (client 0 of 10) | max-update-norm | update-norm-factor | final accuracy |")
    print("|---|---|---|---|")
    for attack, norm, fac in rows:
        bounds = {"max-update-norm": norm, "update-norm-factor": fac}
        accs = [run(resolve_config(base, {"seed": s, **bounds}), attack) for s in range(args.seeds)]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(
            f"| {attack} | {norm:g} | {fac:g} | {statistics.mean(accs):.3f} ± {sd:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
