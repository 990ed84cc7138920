"""Cost of central DP's floating-point-safe noise against numpy's float Gaussian.

    python benchmarks/dp_sampler.py [--dims 100000 1000000] [--repeats 5] [--z 1.0]

For each dimension: the median time of :func:`fedsqueeze.privacy.discrete_gaussian_mechanism`
(round to the grid + exact discrete Gaussian per coordinate, Canonne, Kamath & Steinke 2020)
and of ``x + rng.normal(0, z, d)``, both with a PCG64 generator, and their ratio. Timings are
wall-clock on whatever else the machine is running: compare the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from fedsqueeze.privacy import discrete_gaussian_mechanism


def _median_s(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--z", type=float, default=1.0)
    args = parser.parse_args()
    rng = np.random.default_rng()
    print("| d | numpy normal (s) | grid discrete Gaussian (s) | ratio |")
    print("|---|---|---|---|")
    for d in args.dims:
        x = rng.normal(size=d)
        float_s = _median_s(lambda: x + rng.normal(0.0, args.z, d), args.repeats)  # noqa: B023
        grid_s = _median_s(
            lambda: discrete_gaussian_mechanism(x, args.z, 1.0, rng),  # noqa: B023
            args.repeats,
        )
        print(f"| {d} | {float_s:.4f} | {grid_s:.4f} | {grid_s / float_s:.1f} |")


if __name__ == "__main__":
    main()
