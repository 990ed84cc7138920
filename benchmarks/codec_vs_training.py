"""Codec time as a fraction of one client's local training time in a real round.

    python benchmarks/codec_vs_training.py [--dataset mnist1d --model cnn1d --clients 20]

Trains the model for one round on a typical client partition with the run defaults
(the same loop the ClientApp uses), then times encode (client) and decode (server) of
that round's real update for each codec. Prints a table and writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fedsqueeze.client.training import make_generator, state_to_numpy, train_local
from fedsqueeze.compression import parse_codec
from fedsqueeze.config import resolve_config
from fedsqueeze.federation import client_train_data, new_model

SPECS = [
    "fp16",
    "q8",
    "q4",
    "topk(0.01)+ef",
    "topk(0.01)+q4+ef",
    "randk(0.1)+q8",
    "topk(0.01)+ternary+ef",
    "q4(block=256)+zstd",
]


def _best_of(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--model", default="cnn1d")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--partition", default="dirichlet")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a 1-CPU simulated client
    cfg = resolve_config(
        {
            "dataset": args.dataset,
            "model": args.model,
            "num-clients": args.clients,
            "clients-per-round": args.clients,
            "partition": args.partition,
        }
    )
    sizes = [len(client_train_data(cfg, p, args.clients)[0]) for p in range(args.clients)]
    pid = int(np.argsort(sizes)[len(sizes) // 2])  # the median-sized client
    x, y = client_train_data(cfg, pid, args.clients)
    model = new_model(cfg, seed=0)
    start = state_to_numpy(model)

    def train() -> None:
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in start.items()})
        train_local(
            model,
            x,
            y,
            epochs=int(cfg["local-epochs"]),
            batch_size=int(cfg["batch-size"]),
            lr=float(cfg["lr"]),
            momentum=float(cfg["momentum"]),
            generator=make_generator(0, 1, pid),
        )

    train_s = _best_of(train, max(1, args.repeat // 2))
    delta = {k: state_to_numpy(model)[k] - start[k] for k in start}
    d = sum(v.size for v in delta.values())
    print(
        f"{args.dataset}/{args.model}: {d} parameters, client {pid} with {len(x)} samples, "
        f"{cfg['local-epochs']} local epochs: training {train_s * 1e3:.1f} ms"
    )
    rows = []
    print(f"{'codec':28s} {'bytes':>8s} {'enc ms':>8s} {'dec ms':>8s} {'(enc+dec)/train':>16s}")
    for spec in SPECS:
        codec = parse_codec(spec)
        enc = codec.encode(delta, seed=1, state=None)
        enc_s = _best_of(lambda c=codec: c.encode(delta, seed=1, state=None), args.repeat)
        dec_s = _best_of(lambda c=codec, p=enc.payload: c.decode(p, seed=1), args.repeat)
        frac = (enc_s + dec_s) / train_s
        rows.append(
            {
                "codec": spec,
                "bytes": len(enc.payload),
                "encode_s": enc_s,
                "decode_s": dec_s,
                "train_s": train_s,
                "fraction": frac,
            }
        )
        print(
            f"{spec:28s} {len(enc.payload):8d} {enc_s * 1e3:8.2f} {dec_s * 1e3:8.2f} "
            f"{100 * frac:15.2f}%"
        )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"parameters": d, "samples": len(x), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
