"""How much does accuracy move with the DP noise draw alone? An in-process replica.

    python simulations/privacy/noise_spread.py central 0-19
    python simulations/privacy/noise_spread.py distributed 0-19 [--epsilon 4] [--bits 16]

Replays the privacy suite's federation (``03-central-eps4.toml``: same client sampling,
the ClientApp's ``train_local`` with the same per-client generators, the same initial
model) in one process, without Ray or a Flower runtime, and aggregates with the real
strategy chain of the run config (``build_chain``): central DP through
``CompressedStrategy(CentralDP(FedAvg))`` with the ``CentralDP`` wrapper's noise stream
seeded by the given noise seed instead of the run seed; distributed DP with the
``DistributedDP`` wrapper's summable encoding per client (client randomness seeded by the
noise seed), the modular sum, and the wrapper's ``aggregate_secure_sum`` — what
``SecAggStrategy`` does once the masks cancel. Only the noise realisation changes between
seeds, so the spread of "mean accuracy of the last 5 rounds" is the spread a single
simulation row carries. With central DP and noise seed = run seed it reproduces the
Simulation Engine run's accuracies exactly.

Prints one JSON line per seed, then the mean and standard deviation.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


class _Nodes:
    """The only Grid method Flower's FedAvg.configure_train needs: the round's nodes."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def quiet_flower() -> None:
    """Flower messages built outside a running app need a task identity; FedAvg logs every
    round."""
    from flwr.supercore.task_identity import TaskIdentity

    logging.getLogger("flwr").setLevel(logging.WARNING)
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1


def train_sampled(
    config: dict[str, Any], weights: dict[str, np.ndarray], rnd: int
) -> tuple[list[int], dict[int, dict[str, np.ndarray]], dict[int, int]]:
    """One round's local training, as the ClientApp does it: the round's sampled clients
    (node id = partition id + 1, replies in order), each client's trained weights and its
    number of examples."""
    from fedsqueeze.client.training import make_generator, train_local
    from fedsqueeze.federation import client_train_data, new_model
    from fedsqueeze.models.weights import load_numpy_state, state_to_numpy
    from fedsqueeze.server.rounds import sample_partitions

    seed, n, k = int(config["seed"]), int(config["num-clients"]), int(config["clients-per-round"])
    sampled = sample_partitions(seed, rnd, n, k)
    nodes = [pid + 1 for pid in sampled]
    locals_, sizes = {}, {}
    for pid, node in zip(sampled, nodes, strict=True):
        x, y = client_train_data(config, pid, n)
        model = new_model(config)
        load_numpy_state(model, weights)
        train_local(
            model, x, y,
            epochs=int(config["local-epochs"]), batch_size=int(config["batch-size"]),
            lr=float(config["lr"]), momentum=float(config["momentum"]),
            weight_decay=float(config["weight-decay"]), proximal_mu=0.0,
            generator=make_generator(seed, rnd, pid),
        )  # fmt: skip
        locals_[node], sizes[node] = state_to_numpy(model), len(x)
    return nodes, locals_, sizes


def _seeds(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    return out


def replay(config: dict[str, Any], noise_seed: int) -> list[float]:
    """Test accuracy after every round of one replica (see the module docstring)."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from fedsqueeze.contracts.records import flatten, from_record, to_record, unflatten
    from fedsqueeze.contracts.streams import Stream, round_seed
    from fedsqueeze.federation import dataset_for, new_model
    from fedsqueeze.models.weights import evaluate, load_numpy_state, state_to_numpy
    from fedsqueeze.secagg.field import from_field, to_field
    from fedsqueeze.server.dp import CentralDP, DistributedDP
    from fedsqueeze.server.hooks import strategy_chain
    from fedsqueeze.server.strategies import build_chain

    quiet_flower()
    seed, k = int(config["seed"]), int(config["clients-per-round"])
    ds = dataset_for(config)
    chain = build_chain(config)
    privacy = next(s for s in strategy_chain(chain) if isinstance(s, CentralDP | DistributedDP))
    if isinstance(privacy, CentralDP):
        privacy.noise_seed = noise_seed  # the noise stream; nothing else reads it
    client_rng = np.random.default_rng([noise_seed, 12345])
    weights = state_to_numpy(new_model(config, seed=seed))
    dim = int(flatten(weights).size)
    accuracies = []
    for rnd in range(1, int(config["num-rounds"]) + 1):
        nodes, locals_, sizes = train_sampled(config, weights, rnd)
        if isinstance(privacy, CentralDP):
            # The whole chain, as the server loop runs it: replies carry the trained weights.
            messages = chain.configure_train(rnd, to_record(weights), ConfigRecord(), _Nodes(nodes))
            by_node = {m.metadata.dst_node_id: m for m in messages}
            if not by_node:
                break  # the privacy budget refuses the round
            replies = [
                Message(
                    RecordDict(
                        {
                            "arrays": to_record(locals_[node]),
                            "metrics": MetricRecord({"num-examples": sizes[node]}),
                        }
                    ),
                    reply_to=by_node[node],
                )
                for node in nodes
            ]
            agg, _ = chain.aggregate_train(rnd, replies)
        else:
            # What SecAggStrategy hands DistributedDP once the masks cancel.
            messages = list(
                privacy.configure_train(rnd, to_record(weights), ConfigRecord(), _Nodes(nodes))
            )
            if not messages:
                break
            enc = privacy.summable_encoding(
                dim=dim,
                num_clients=k,
                bits=int(config["secagg-bits"]),
                scale=float(config["secagg-scale"]),
                rotation_seed=round_seed(seed, rnd, Stream.ROTATION),
            )
            mask = np.uint64((1 << enc.bits) - 1)
            field_sum = np.zeros(enc.vector_len, dtype=np.uint64)
            for node in nodes:
                ints = enc.encode(flatten(locals_[node]) - flatten(weights), 1, client_rng)
                field_sum = (field_sum + to_field(ints, enc.bits, wrap=True)) & mask
            total, _ = enc.decode_sum(from_field(field_sum, enc.bits), k)
            template = Message(RecordDict(), reply_to=messages[0])
            agg, _ = privacy.aggregate_secure_sum(rnd, unflatten(total, weights), k, template, {})
        if agg is not None:
            weights = from_record(agg)
        model = new_model(config)
        load_numpy_state(model, weights)
        accuracies.append(float(evaluate(model, ds.x_test, ds.y_test)[1]))
    return accuracies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["central", "distributed"])
    parser.add_argument("seeds", help="noise seeds, e.g. 0-19 or 0,3,5")
    parser.add_argument("--epsilon", type=float, default=4.0)
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--run-seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    import torch

    from fedsqueeze.config import load_toml, resolve_config

    torch.set_num_threads(1)
    raw = load_toml(HERE / "03-central-eps4.toml")
    raw.pop("label", None)
    raw.update({"dp": args.mode, "dp-epsilon": args.epsilon, "seed": args.run_seed})
    if args.mode == "distributed":
        raw.update({"secagg": True, "dp-bits": args.bits})
    config = resolve_config(raw)
    last5 = []
    for noise_seed in _seeds(args.seeds):
        t0 = time.perf_counter()
        acc = replay(config, noise_seed)
        last5.append(sum(acc[-5:]) / 5)
        row = {"mode": args.mode, "epsilon": args.epsilon, "run_seed": args.run_seed,
               "noise_seed": noise_seed, "mean_last5": round(last5[-1], 4),
               "final": round(acc[-1], 4), "s": round(time.perf_counter() - t0, 1)}  # fmt: skip
        print(json.dumps(row), flush=True)
    if len(last5) > 1:
        print(f"{args.mode}: {len(last5)} seeds, mean of last 5 = {statistics.mean(last5):.4f} "
              f"± {statistics.stdev(last5):.4f} (sd)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
