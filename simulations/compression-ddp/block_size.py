"""Block size of distributed DP's Hadamard rotation: what it costs and what it buys.

    python simulations/compression-ddp/block_size.py            # the table in simulations/README.md
    python simulations/compression-ddp/block_size.py --trials 3  # quicker

No federation: the real client and server halves (``DistributedDPClient.encode``, the field
sum of secure aggregation, ``decode_sum``) on synthetic updates of three model sizes, at the
noise of ε = 4 under the worst-case budget of the DP table (z = 2.214, 20 clients a round).
Each client's update is a shared direction plus its own (cosine ~0.5 to the mean), norm = C.

Per block size B: the integers each client sends (``padded_dim``: only the last block is
padded), the scale γ the field width allows (:func:`choose_scale` keeps 4 sd of a summed
coordinate inside the field, and the worst case puts all of the sum's mass in one block, so
γ grows with √B), the sensitivity the rounding adds (Δ₂ / γC) and the noise multiplier an
accountant is then given (z_eff / z: below 1 means a larger ε for the same noise), and,
measured over trials, the error of the decoded mean against the true mean of the clipped
updates (relative L2) and how many coordinates wrapped around the field.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from fedsqueeze.compression.hadamard import auto_block, next_power_of_two
from fedsqueeze.privacy.distributed import DistributedDPClient, DistributedDPParams, decode_sum
from fedsqueeze.secagg.field import from_field, to_field

CLIP = 0.3
CLIENTS = 20
Z = 2.214  # ε = 4, δ = 1e-5, q = 0.2, 30 rounds, worst-case budget (simulations/README.md)
SIZES = {"digits/logreg": 650, "digits/mlp": 17_226, "mnist1d/cnn1d": 29_642}


def updates(dim: int, rng: np.random.Generator) -> np.ndarray:
    """``CLIENTS`` updates of norm CLIP, each half a shared direction and half its own."""
    shared = rng.normal(size=dim)
    own = rng.normal(size=(CLIENTS, dim))
    x = shared / np.linalg.norm(shared) + own / np.linalg.norm(own, axis=1, keepdims=True)
    return CLIP * x / np.linalg.norm(x, axis=1, keepdims=True)


def trial(params: DistributedDPParams, x: np.ndarray, seed: int) -> tuple[float, int]:
    """Relative error of the decoded mean, and the number of wrapped coordinates."""
    rng = np.random.default_rng(seed)
    client = DistributedDPClient(params)
    encoded = [client.encode(u, rng, rotation_seed=seed) for u in x]
    exact = np.sum(encoded, axis=0)
    half = 2 ** (params.bits - 1)
    wrapped = int(np.count_nonzero((exact < -half) | (exact >= half)))
    field_sum = np.zeros(params.padded_dim, dtype=np.uint64)
    for e in encoded:
        field_sum = (field_sum + to_field(e, params.bits, wrap=True)) % np.uint64(2**params.bits)
    mean = decode_sum(from_field(field_sum, params.bits), CLIENTS, params, seed) / CLIENTS
    truth = x.mean(axis=0)
    return float(np.linalg.norm(mean - truth) / np.linalg.norm(truth)), wrapped


def rows(trials: int) -> list[str]:
    out = [
        "| model (d) | bits | block B | integers sent | γ | Δ₂ / γC | z_eff / z | "
        "rel. error of the mean | wrapped coords / trial |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, dim in SIZES.items():
        blocks = sorted({16, 64, 256, 1024, 4096, auto_block(dim), next_power_of_two(dim)})
        blocks = [b for b in blocks if b <= next_power_of_two(dim)]
        x = updates(dim, np.random.default_rng(0))
        for bits in (12, 16):
            for block in blocks:
                p = DistributedDPParams.for_bits(dim, CLIP, bits, CLIENTS, Z, block=block)
                results = [trial(p, x, seed) for seed in range(trials)]
                err = np.array([r[0] for r in results])
                wraps = np.mean([r[1] for r in results])
                mark = " (auto)" if block == auto_block(dim) else ""
                out.append(
                    f"| {name} ({dim:,}) | {bits} | {block:,}{mark} | {p.padded_dim:,} | "
                    f"{p.scale:.1f} | {p.l2_sensitivity / (p.scale * CLIP):.3f} | "
                    f"{p.effective_noise_multiplier() / Z:.3f} | "
                    f"{err.mean():.3f} ± {err.std(ddof=1) if trials > 1 else 0:.3f} | "
                    f"{wraps:.1f} |"
                )
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args(argv)
    print(f"clip {CLIP}, {CLIENTS} clients, z {Z}, noise-only error of the mean "
          f"= z·C·sqrt(d)/n / |mean|; {args.trials} trials")  # fmt: skip
    print("\n".join(rows(args.trials)))
    print("noise floor (z·C·√d / n, relative to the true mean's norm):")
    for name, dim in SIZES.items():
        truth = np.linalg.norm(updates(dim, np.random.default_rng(0)).mean(axis=0))
        print(f"  {name}: {Z * CLIP * math.sqrt(dim) / CLIENTS / truth:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
