"""Cost of the SecAgg+ core: client masking time, server aggregation/unmasking time, and
bytes of the masked vector per client against an int64 payload (d * 8 bytes).

For reference, the ``flwr PRG`` column times only the mask generation Flower's legacy
SecAgg+ would do for the same client (its ``pseudo_rand_gen``: numpy ``RandomState`` seeded
with 32 bits, int64 output) -- the same number of masks, summed in int64.

Dropouts are injected after key sharing and before the masked input (the costly case for
the server: it must reconstruct each dropped client's mask key and regenerate its pairwise
masks with every surviving neighbour).

    python benchmarks/bench_secagg.py --out runs/bench_secagg.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from itertools import product

import numpy as np

from fedsqueeze.secagg import SecAggClient, SecAggConfig, SecAggServer


def flower_mask_time(d: int, bits: int, num_masks: int) -> float | None:
    """Seconds Flower's legacy SecAgg+ mask generator needs for ``num_masks`` masks."""
    try:
        from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    except ImportError:  # pragma: no cover - flwr is a project dependency
        return None
    start = time.perf_counter()
    acc = np.zeros(d, dtype=np.int64)
    for i in range(num_masks):
        acc += pseudo_rand_gen(i.to_bytes(32, "little"), 2**bits, [(d,)])[0]
    return time.perf_counter() - start


def run_case(n: int, d: int, k: int, bits: int, dropout: float, seed: int) -> dict:
    t = SecAggConfig.min_secure_threshold(k)
    cfg = SecAggConfig(
        num_clients=n, neighbours=k, threshold=t, bits=bits, vector_len=d, round_seed=seed
    )
    ids = list(range(1, n + 1))
    rng = np.random.default_rng(seed)
    xs = {c: rng.integers(0, 2**bits, d, dtype=np.uint64) for c in ids}
    dropped = set(rng.choice(ids, size=round(dropout * n), replace=False).tolist())

    server = SecAggServer(cfg, ids)
    setup = server.setup()
    clients = {c: SecAggClient(c, setup[c]) for c in ids}
    out = server.collect_keys({c: clients[c].advertise_keys() for c in ids})
    out = server.collect_shares({c: clients[c].share_keys(out[c]) for c in ids})

    masked, mask_times = {}, []
    for c in ids:
        if c in dropped:
            continue
        start = time.perf_counter()
        masked[c] = clients[c].masked_input(out[c], xs[c])
        mask_times.append(time.perf_counter() - start)

    start = time.perf_counter()
    requests = server.collect_masked(masked)
    aggregate_s = time.perf_counter() - start
    checks = {c: clients[c].check_survivors(requests[c]) for c in requests}
    requests = server.collect_signatures(checks)  # the consistency check (Bonawitz et al.)
    answers = {c: clients[c].unmask(requests[c]) for c in requests}
    start = time.perf_counter()
    result = server.finish(answers)
    unmask_s = time.perf_counter() - start

    expected = np.zeros(d, dtype=np.uint64)
    for c in result.included:
        expected += xs[c]
    expected &= np.uint64(2**bits - 1)
    assert np.array_equal(result.total, expected), "secure sum differs from the plain sum"
    payload = len(next(iter(masked.values()))["masked"])
    flwr_s = flower_mask_time(d, bits, 1 + k)
    return {
        "n": n,
        "d": d,
        "k": k,
        "t": t,
        "bits": bits,
        "dropout": dropout,
        "dropped": len(dropped),
        "client_mask_s": float(np.mean(mask_times)),
        "server_aggregate_s": aggregate_s,
        "server_unmask_s": unmask_s,
        "flwr_prg_s": flwr_s,
        "masked_bytes": payload,
        "int64_bytes": d * 8,
        "ratio_vs_int64": payload / (d * 8),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--dims", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="median over this many runs")
    parser.add_argument("--out", type=str, default="", help="write the rows as JSON here")
    args = parser.parse_args()

    n = args.n
    rows = []
    header = (
        f"{'d':>9} {'k':>3} {'t':>3} {'b':>3} {'drop':>5} {'client mask':>12} "
        f"{'srv aggregate':>14} {'srv unmask':>11} {'bytes/client':>13} {'int64 bytes':>12} "
        f"{'ratio':>6} {'flwr PRG':>9}"
    )
    print(header)
    print("-" * len(header))
    timed = ("client_mask_s", "server_aggregate_s", "server_unmask_s", "flwr_prg_s")
    for d, k, bits, dropout in product(args.dims, [n - 1, 4], args.bits, args.dropouts):
        runs = [run_case(n, d, k, bits, dropout, args.seed + r) for r in range(args.repeat)]
        row = dict(runs[0])
        for key in timed:  # median over repeats: the machine is shared
            vals = [r[key] for r in runs if r[key] is not None]
            row[key] = float(np.median(vals)) if vals else None
        rows.append(row)
        flwr_ms = "n/a" if row["flwr_prg_s"] is None else f"{row['flwr_prg_s'] * 1e3:.1f}ms"
        print(
            f"{d:>9} {k:>3} {row['t']:>3} {bits:>3} {dropout:>5.0%} "
            f"{row['client_mask_s'] * 1e3:>10.1f}ms {row['server_aggregate_s'] * 1e3:>12.1f}ms "
            f"{row['server_unmask_s'] * 1e3:>9.1f}ms {row['masked_bytes']:>13} "
            f"{row['int64_bytes']:>12} {row['ratio_vs_int64']:>6.3f} {flwr_ms:>9}",
            flush=True,
        )
    if args.out:
        meta = {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "n": n,
            "repeat": args.repeat,
            "dropouts_at": "after key sharing, before masked input",
        }
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
