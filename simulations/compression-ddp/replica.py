"""Central DP or (sketched) distributed DP on any config: an in-process replica (no Flower run).

    python simulations/compression-ddp/replica.py CONFIG.toml [--set KEY=VALUE ...] --seeds 0,1,2

Runs ``simulations/privacy/noise_spread.py``'s replica for ``dp = "central"`` (and dense
``"distributed"``) and ``hashes.py``'s for ``codec = "sketch(C)"`` with distributed DP (the
round's hashes, as ``SecAggStrategy`` does under DP): the ClientApp's ``train_local``, the
run config's real strategy chain, seeded client noise (the real runs draw it from OS
entropy). For screening federations and models cheaply before a ``fedsqueeze compare`` run;
prints one JSON line per seed (run seed = noise seed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "privacy"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    import hashes
    import noise_spread
    import torch

    from fedsqueeze.config import load_toml, parse_set_option, resolve_config

    torch.set_num_threads(1)
    raw = load_toml(args.config)
    label = str(raw.pop("label", args.config.stem))
    for item in args.set:
        key, value = parse_set_option(item)
        raw[key] = value
    for seed in noise_spread._seeds(args.seeds):
        raw["seed"] = seed
        config = resolve_config(raw)
        t0 = time.perf_counter()
        if str(config["codec"]).startswith("sketch"):
            acc, _ = hashes.replay(config, seed, fresh=True)
        else:
            acc = noise_spread.replay(config, seed)
        row = {"config": label, "set": args.set, "seed": seed, "final": round(acc[-1], 4),
               "mean_last5": round(sum(acc[-5:]) / 5, 4),
               "curve": [round(a, 3) for a in acc[:: max(1, len(acc) // 6)]],
               "s": round(time.perf_counter() - t0, 1)}  # fmt: skip
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
