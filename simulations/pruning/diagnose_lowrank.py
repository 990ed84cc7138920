"""Diagnosis of the low-rank collapse (08-lowrank8): replay the factorized rounds directly.

    python simulations/pruning/diagnose_lowrank.py VARIANT [LR] [ROUNDS]

Trains the 08 config's federation (20 clients, FedAvg, 5 local epochs) for 4 dense rounds
with the clients' own training loop (no Flower: the point is the arithmetic, not the
messages; the round-4 model is cached in the temp dir), factorizes it at rank 8 and runs
ROUNDS (default 2) factorized rounds at client lr LR (default 0.05), printing each round's
mean training loss, three single clients' test accuracy and the global test accuracy.
VARIANT: ``factors`` (FedAvg of U and V, no scale: the old code), ``product`` (FedAvg of
the clients' products ``U @ V``, re-factorized), ``scaled`` (FedAvg of U and V with the
``c = 1 / sigma_max`` scale: the fix).
"""

from __future__ import annotations

import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fedsqueeze.client.training import (  # noqa: E402
    evaluate,
    load_numpy_state,
    make_generator,
    state_to_numpy,
    train_local,
)
from fedsqueeze.config import load_toml, resolve_config  # noqa: E402
from fedsqueeze.federation import (  # noqa: E402
    client_train_data,
    dataset_for,
    initial_arrays,
    new_model,
)
from fedsqueeze.models import lowrank as lr_core  # noqa: E402

Arrays = dict[str, np.ndarray]


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "factors"
    lr = float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    torch.set_num_threads(1)
    raw = load_toml(ROOT / "simulations" / "pruning" / "08-lowrank8.toml")
    raw.pop("label")
    cfg = resolve_config(raw)
    ds, n = dataset_for(cfg), int(cfg["num-clients"])
    data = [client_train_data(cfg, i, n) for i in range(n)]

    def model(ranks: dict[str, int] | None, scales: dict[str, float] | None) -> torch.nn.Module:
        m = new_model(cfg)
        return lr_core.factorize_model(m, ranks, scales) if ranks else m

    def acc(arrays: Arrays, ranks=None, scales=None) -> float:  # type: ignore[no-untyped-def]
        m = model(ranks, scales)
        load_numpy_state(m, arrays)
        return evaluate(m, ds.x_test, ds.y_test)[1]

    def local(arrays: Arrays, rnd: int, pid: int, ranks=None, scales=None, rate=0.05):  # type: ignore[no-untyped-def]
        m = model(ranks, scales)
        load_numpy_state(m, arrays)
        x, y = data[pid]
        loss = train_local(
            m, x, y, epochs=5, batch_size=16, lr=rate, momentum=0.9,
            generator=make_generator(0, rnd, pid),
        )  # fmt: skip
        return state_to_numpy(m), len(x), loss

    def avg(rs: list) -> Arrays:  # type: ignore[type-arg]
        tot = sum(k for _, k, _ in rs)
        return {
            key: (sum(a[key].astype(np.float64) * k for a, k, _ in rs) / tot).astype(np.float32)
            for key in rs[0][0]
        }

    cache = Path(tempfile.gettempdir()) / "fedsqueeze-diagnose-lowrank-round4.pkl"
    if cache.exists():
        g = pickle.loads(cache.read_bytes())
    else:
        g = initial_arrays(cfg)
        for rnd in range(1, 5):
            g = avg([local(g, rnd, p) for p in range(n)])
            print("dense round", rnd, "accuracy", acc(g), flush=True)
        cache.write_bytes(pickle.dumps(g))
    ranks = lr_core.choose_ranks(g, 8)
    scales = lr_core.choose_scales(g, ranks) if variant == "scaled" else None
    f = lr_core.factorize(g, ranks, scales)
    print("round 4 accuracy", acc(g), "truncated to rank 8", acc(f, ranks, scales))
    for rnd in range(5, 5 + rounds):
        rs = [local(f, rnd, p, ranks, scales, lr) for p in range(n)]
        single = [acc(a, ranks, scales) for a, _, _ in rs[:3]]
        if variant == "product":
            dense = avg([(lr_core.expand(a, ranks), k, loss) for a, k, loss in rs])
            f = lr_core.factorize(dense, ranks)
        else:
            f = avg(rs)
            dense = lr_core.expand(f, ranks, scales)
        print(
            f"{variant} lr {lr} round {rnd}: train loss {np.mean([r[2] for r in rs]):.3f}, "
            f"single clients {np.round(single, 3)}, global {acc(dense):.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
