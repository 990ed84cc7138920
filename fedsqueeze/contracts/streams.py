"""Every random stream of a run, named in one place.

Two kinds of randomness, never mixed:

- **Reproducible** streams derive from the run ``seed`` and the round, so that a run (and a
  resumed run) repeats bit for bit: client sampling, codec and rotation seeds, the SecAgg+
  graph, the simulated drop-outs, local training order. Anyone who knows the run config can
  recompute them; nothing secret may depend on them.
- **Secret** randomness (a client's stochastic rounding and distributed-DP noise, SecAgg+
  keys and self-masks) is drawn from OS entropy where it is used and never appears here.

Central-DP noise and DP-SGD's batches are still drawn from reproducible streams
(:attr:`Stream.CENTRAL_DP_NOISE`, :func:`training_seed`); that is a known weakness
of the current code (the server, or anyone with the config, can replay them) which the
guarantees work replaces with secret, checkpointed generators.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """Tags that separate the reproducible streams of one ``(seed, round)``."""

    UPLINK_CODEC = 0
    """The uplink codec's shared per-round seed (random-k, stochastic quantization)."""
    DOWNLINK_CODEC = 1
    """The downlink codec's per-round seed."""
    SECURE_RANDK = 2
    """Shared positions of random-k under secure aggregation."""
    ROTATION = 3
    """Distributed DP's shared randomized Hadamard rotation."""
    SECAGG_GRAPH = 4
    """The SecAgg+ communication graph's relabelling."""
    CLIENT_SAMPLING = 0xC11E
    """Which partitions train in a round."""
    EVAL_SAMPLING = 0xE7A1
    """Which partitions evaluate in a round (federated evaluation)."""
    SIMULATED_DROPOUT = 0xD809
    """Which sampled clients a test tells to fail, and at which stage."""
    CENTRAL_DP_NOISE = 0xD9
    """Central-DP Gaussian noise (reproducible today: see the module docstring)."""


def round_seed(seed: int, server_round: int, stream: Stream) -> int:
    """A 31-bit seed shared by every party of round ``server_round`` for ``stream``."""
    entropy = [int(seed), int(server_round), int(stream), 0x5EED]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] >> 1)


def round_rng(seed: int, server_round: int, stream: Stream) -> np.random.Generator:
    """A numpy generator for ``stream`` in round ``server_round``."""
    return np.random.default_rng([int(seed), int(server_round), int(stream)])


def training_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The seed of a client's local training order (and of DP-SGD's batches and noise)."""
    return int(
        np.random.SeedSequence([int(seed), int(server_round), int(partition_id)]).generate_state(1)[
            0
        ]
    )
