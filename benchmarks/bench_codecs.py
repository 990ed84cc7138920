"""Codec micro-benchmark: throughput, payload size and index-coding efficiency.

Usage::

    python benchmarks/bench_codecs.py [--sizes 1000000 10000000] [--out FILE.json]

For each codec spec and update size (a random Gaussian update split over a few tensors)
this measures encode and decode wall time (best of ``--repeat``), millions of coordinates
per second, payload bytes and bits per parameter. For sparsifying codecs with coded
positions it also reports the index-stream bits per kept coordinate against the bound
``log2 C(d, k) / k``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import numpy as np

from fedsqueeze.compression import encode_positions, log2_binomial, parse_codec

SPECS = [
    "none",
    "zstd",
    "fp16",
    "bf16",
    "q8",
    "q4",
    "q4(block=256)",
    "q4+zstd",
    "qsgd4",
    "sign",
    "topk(0.01)",
    "topk(0.01)+q4",
    "topk(0.01)+q4+ef",
    "topk_pt(0.01)+q8",
    "topk(0.001)+ternary",
    "randk(0.01)+q8",
    "thresh(2.576)+fp16",
    "q2+ef21",
]


def make_update(d: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A Gaussian update of ``d`` parameters in four tensors (50/30/15/5 % of them)."""
    rng = np.random.default_rng(seed)
    sizes = [d // 2, (3 * d) // 10, (15 * d) // 100]
    sizes.append(d - sum(sizes))
    update = {}
    for i, n in enumerate(sizes):
        cols = 100 if n % 100 == 0 else 1
        update[f"layer{i}.weight"] = rng.standard_normal((n // cols, cols), dtype=np.float32)
    return update


def bench(spec: str, update: dict[str, np.ndarray], repeat: int) -> dict[str, Any]:
    codec = parse_codec(spec)
    d = sum(a.size for a in update.values())
    seed = 12345
    enc_times, dec_times = [], []
    state = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        enc = codec.encode(update, seed=seed, state=state)
        t1 = time.perf_counter()
        dec = codec.decode(enc.payload, seed=seed)
        t2 = time.perf_counter()
        enc_times.append(t1 - t0)
        dec_times.append(t2 - t1)
    n_bytes = len(enc.payload)
    row: dict[str, Any] = {
        "spec": codec.spec,
        "d": d,
        "encode_s": min(enc_times),
        "decode_s": min(dec_times),
        "encode_Mcoord_s": d / min(enc_times) / 1e6,
        "decode_Mcoord_s": d / min(dec_times) / 1e6,
        "bytes": n_bytes,
        "bits_per_param": 8 * n_bytes / d,
    }
    if codec.sparsifier is not None and codec.sparsifier.sends_positions:
        flat = np.concatenate([a.reshape(-1) for a in dec.arrays.values()])
        positions = np.flatnonzero(flat)
        k = positions.size
        index_bits = 8 * len(encode_positions(positions, d))
        row.update(
            k=k,
            index_bits_per_kept=index_bits / k,
            bound_bits_per_kept=log2_binomial(d, k) / k,
            index_over_bound=index_bits / log2_binomial(d, k),
            total_bits_per_kept=8 * n_bytes / k,
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--specs", nargs="+", default=SPECS)
    parser.add_argument("--repeat", type=int, default=3, help="best-of repeats (1 above 5M)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    rows = []
    header = (
        f"{'spec':22s} {'d':>9s} {'enc s':>7s} {'dec s':>7s} {'enc M/s':>8s} {'dec M/s':>8s}"
        f" {'bytes':>10s} {'bits/par':>8s} {'idx b/k':>8s} {'bound':>7s} {'ratio':>6s}"
    )
    print(header)
    print("-" * len(header))
    for d in args.sizes:
        update = make_update(d)
        repeat = 1 if d > 5_000_000 else args.repeat
        for spec in args.specs:
            row = bench(spec, update, repeat)
            rows.append(row)
            idx = (
                f" {row['index_bits_per_kept']:8.3f} {row['bound_bits_per_kept']:7.3f}"
                f" {row['index_over_bound']:6.3f}"
                if "k" in row
                else ""
            )
            print(
                f"{row['spec']:22s} {d:9d} {row['encode_s']:7.3f} {row['decode_s']:7.3f}"
                f" {row['encode_Mcoord_s']:8.1f} {row['decode_Mcoord_s']:8.1f}"
                f" {row['bytes']:10d} {row['bits_per_param']:8.4f}{idx}",
                flush=True,
            )
    if args.out:
        meta = {
            "numpy": np.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        }
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "results": rows}, fh, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
