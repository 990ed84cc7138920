"""Fixed or fresh sketch hashes under distributed DP: an in-process replica (no Ray).

    python simulations/compression-ddp/hashes.py "sketch(64)" 16 fixed 0
    python simulations/compression-ddp/hashes.py "sketch(64)" 16 fresh 0,1,2

Replays the federation of ``11-ddp-eps4-b16.toml`` (digits / logreg, 100 clients, 20 a
round, 30 rounds, ε = 4) in one process, as ``simulations/privacy/noise_spread.py`` does:
the ClientApp's ``train_local``, the real strategy chain of the run config (``build_chain``:
``SecAggStrategy(DistributedDP(FedAvg))``), each client's sketch + distributed-DP encoding,
the modular sum and ``DistributedDP.aggregate_secure_sum`` — what ``SecAggStrategy`` does
once the masks cancel. ``fresh`` builds each round's encoding as ``SecAggStrategy`` does under
DP (that round's hashes); ``fixed`` uses the run's round-0 hashes every round (what the
sketch does without DP). Client noise comes from a generator seeded by the seed, so a line
is reproducible (the real runs draw it from OS entropy). Prints one JSON line per seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "privacy"))


def replay(config: dict[str, Any], noise_seed: int, fresh: bool) -> tuple[list[float], float]:
    """Test accuracy after every round, and the payload bits per parameter."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from noise_spread import _Nodes, quiet_flower, train_sampled

    from fedsqueeze.contracts.records import flatten, from_record, to_record, unflatten
    from fedsqueeze.contracts.streams import Stream, round_seed
    from fedsqueeze.contracts.summable import SketchSum
    from fedsqueeze.federation import dataset_for, new_model
    from fedsqueeze.models.weights import evaluate, load_numpy_state, state_to_numpy
    from fedsqueeze.secagg.field import from_field, to_field
    from fedsqueeze.server.dp import DistributedDP
    from fedsqueeze.server.hooks import strategy_chain
    from fedsqueeze.server.secure import SecAggStrategy
    from fedsqueeze.server.strategies import build_chain

    quiet_flower()
    seed, k = int(config["seed"]), int(config["clients-per-round"])
    ds = dataset_for(config)
    chain = build_chain(config)
    secure = next(s for s in strategy_chain(chain) if isinstance(s, SecAggStrategy))
    privacy = next(s for s in strategy_chain(chain) if isinstance(s, DistributedDP))
    assert secure.sketch is not None
    client_rng = np.random.default_rng([noise_seed, 12345])
    weights = state_to_numpy(new_model(config, seed=seed))
    dim = int(flatten(weights).size)
    accuracies, payload = [], 0.0
    for rnd in range(1, int(config["num-rounds"]) + 1):
        nodes, locals_, _ = train_sampled(config, weights, rnd)
        messages = list(
            privacy.configure_train(rnd, to_record(weights), ConfigRecord(), _Nodes(nodes))
        )
        if not messages:
            break
        enc = secure._encoding(dim, k, rnd)
        assert isinstance(enc, SketchSum)
        if not fresh:
            enc = dataclasses.replace(enc, seed=round_seed(seed, 0, Stream.SKETCH))
        payload = enc.vector_len * enc.bits / dim
        mask = np.uint64((1 << enc.bits) - 1)
        field_sum = np.zeros(enc.vector_len, dtype=np.uint64)
        for node in nodes:
            ints = enc.encode(flatten(locals_[node]) - flatten(weights), 1, client_rng)
            field_sum = (field_sum + to_field(ints, enc.bits, wrap=True)) & mask
        table, _ = enc.decode_sum(from_field(field_sum, enc.bits), k)
        # What SecAggStrategy does under DP: this round's estimate of every coordinate.
        total = secure._accumulator(enc, dim).step(table)
        template = Message(RecordDict(), reply_to=messages[0])
        agg, _ = privacy.aggregate_secure_sum(rnd, unflatten(total, weights), k, template, {})
        if agg is not None:
            weights = from_record(agg)
        model = new_model(config)
        load_numpy_state(model, weights)
        accuracies.append(float(evaluate(model, ds.x_test, ds.y_test)[1]))
    return accuracies, payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("codec", help='e.g. "sketch(64)"')
    parser.add_argument("bits", type=int)
    parser.add_argument("hashes", choices=["fixed", "fresh"])
    parser.add_argument("seeds", help="run seeds (= noise seeds), e.g. 0,1,2")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    import torch

    from fedsqueeze.config import load_toml, resolve_config

    torch.set_num_threads(1)
    raw = load_toml(HERE / "11-ddp-eps4-b16.toml")
    raw.pop("label", None)
    raw.update({"codec": args.codec, "dp-bits": args.bits})
    for seed in (int(s) for s in args.seeds.split(",")):
        raw["seed"] = seed
        t0 = time.perf_counter()
        acc, payload = replay(resolve_config(raw), seed, args.hashes == "fresh")
        row = {"codec": args.codec, "bits": args.bits, "hashes": args.hashes, "seed": seed,
               "payload_bits_per_param": round(payload, 3), "final": round(acc[-1], 4),
               "mean_last5": round(sum(acc[-5:]) / 5, 4),
               "s": round(time.perf_counter() - t0, 1)}  # fmt: skip
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
