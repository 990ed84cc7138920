"""How much does accuracy move with the DP noise draw alone? An in-process replica.

    python simulations/privacy/noise_spread.py central 0-19
    python simulations/privacy/noise_spread.py distributed 0-19 [--epsilon 4] [--bits 16]

Replays the privacy suite's federation (``03-central-eps4.toml``: same client sampling,
the ClientApp's ``train_local`` with the same per-client generators, the same initial
model) in one process, without Ray or Flower messages, and aggregates with the real DP code:
central DP with ``ServerPrivacy``'s aggregator (its noise stream seeded by the given noise
seed instead of the run seed), distributed DP with ``DistributedDPClient.encode`` per client
and ``decode_sum`` on the modular sum (client randomness seeded by the noise seed). Only
the noise realisation changes between seeds, so the spread of "mean accuracy of the last 5
rounds" is the spread a single simulation row carries. With central DP and noise seed =
run seed it reproduces the Simulation Engine run's accuracies exactly.

Prints one JSON line per seed, then the mean and standard deviation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def _seeds(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    return out


def replay(config: dict[str, Any], noise_seed: int) -> list[float]:
    """Test accuracy after every round of one replica (see the module docstring)."""
    from fedsqueeze.client.secure import flatten, unflatten
    from fedsqueeze.client.training import (
        evaluate,
        load_numpy_state,
        make_generator,
        state_to_numpy,
        train_local,
    )
    from fedsqueeze.federation import client_train_data, dataset_for, new_model
    from fedsqueeze.privacy.distributed import (
        DistributedDPClient,
        center_mod,
        decode_sum,
        wrap_mod,
    )
    from fedsqueeze.server.privacy import ServerPrivacy
    from fedsqueeze.server.rounds import sample_partitions
    from fedsqueeze.server.secure import ROTATION_STREAM
    from fedsqueeze.server.strategy import round_seed

    seed, n, k = int(config["seed"]), int(config["num-clients"]), int(config["clients-per-round"])
    ds = dataset_for(config)
    privacy = ServerPrivacy(config)
    privacy.seed = noise_seed  # central: the noise stream; nothing else reads it here
    client_rng = np.random.default_rng([noise_seed, 12345])
    weights = state_to_numpy(new_model(config, seed=seed))
    dim = sum(a.size for a in weights.values())
    accuracies = []
    for rnd in range(1, int(config["num-rounds"]) + 1):
        deltas = []
        for pid in sample_partitions(seed, rnd, n, k):
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
            local = state_to_numpy(model)
            deltas.append({name: local[name] - weights[name] for name in weights})
        if privacy.mode == "central":
            mean = privacy._aggregate(rnd, deltas, [1] * k)
        else:
            params = privacy.distributed_params(dim, k)
            rot = round_seed(seed, rnd, ROTATION_STREAM)
            client = DistributedDPClient(params)
            total = sum(
                wrap_mod(client.encode(flatten(d), client_rng, rot), params.bits) for d in deltas
            )
            centred = center_mod(wrap_mod(np.asarray(total), params.bits), params.bits)
            mean = unflatten(decode_sum(centred, k, params, rot) / k, weights)
        weights = {name: (weights[name] + mean[name]).astype(np.float32) for name in weights}
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
