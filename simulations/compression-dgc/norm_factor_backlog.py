"""What returning the influence bound's cut to error-feedback clients would do (a scalar model).

``update-norm-factor = 1`` scales every update above its round's median norm down to the
median, so about half the updates of a round are shrunk. The proposed fix for error-feedback
codecs is to tell each shrunk client its factor so that its residual keeps the cut part and
sends it later. This model follows only the norms: client ``i`` wants to move the model by
``a_i`` every round (clients differ persistently, e.g. by the size of their data), sends its
backlog plus ``a_i``, the server applies at most the round's median of what was sent, and the
client either forgets the cut (today) or keeps it as backlog (the fix).

    python simulations/compression-dgc/norm_factor_backlog.py

The median bound caps every above-median client whatever it sent, so keeping the cut hardly
raises what is applied while the backlog of the larger clients grows by the same amount every
round: the mass is not lost to error feedback's bookkeeping but to the bound itself.
"""

from __future__ import annotations

import numpy as np


def simulate(
    wanted: np.ndarray, rounds: int, keep_cut: bool, factor: float = 1.0
) -> tuple[float, np.ndarray]:
    """Applied share of the wanted movement after ``rounds``, and each client's backlog
    (the bound is ``factor`` times the round's median sent norm)."""
    backlog = np.zeros_like(wanted)
    applied = np.zeros_like(wanted)
    for _ in range(rounds):
        sent = backlog + wanted if keep_cut else wanted
        step = np.minimum(sent, factor * np.median(sent))
        applied += step
        if keep_cut:
            backlog = sent - step
    return float(applied.sum() / (rounds * wanted.sum())), backlog


def main() -> None:
    rounds = 60
    print("| update norms | factor | cut part | applied / wanted | largest backlog (rounds) |")
    print("|---|---|---|---|---|")
    for sigma in (0.25, 0.5, 1.0):
        wanted = np.random.default_rng(0).lognormal(0.0, sigma, 20)
        for factor, keep_cut in ((1.0, False), (1.0, True), (2.0, False), (2.0, True)):
            share, backlog = simulate(wanted, rounds, keep_cut, factor)
            print(
                f"| 20 clients, lognormal sd {sigma} | {factor:g} "
                f"| {'kept' if keep_cut else 'forgotten'} | {share:.3f} "
                f"| {float((backlog / wanted).max()):.1f} |"
            )


if __name__ == "__main__":
    main()
