"""Every random stream of a run, named in one place.

Two kinds of randomness, never mixed:

- **Reproducible** streams derive from the run ``seed`` and the round, so that a run (and a
  resumed run) repeats bit for bit: client sampling *without DP*, codec and rotation seeds
  (and a client's stochastic rounding in the plain uplink codec, :func:`rounding_rng`),
  the SecAgg+ graph, the simulated drop-outs, local training order without DP. Anyone who
  knows the run config can recompute them; nothing secret may depend on them.
- **Secret** randomness is never derivable from the run config:

  - on the server, :class:`SecretStreams` — a 256-bit key drawn once from OS entropy
    (``secrets``) from which each round's generator for a :class:`Secret` purpose is
    derived (central-DP noise and adaptive-clipping count noise, client sampling under
    central or distributed DP). The key is the wrapper's checkpoint state, so it lives only
    in the server's owner-only checkpoint and a resumed run repeats the same draws;
  - on a client, drawn from OS entropy where it is used: stochastic rounding under secure
    aggregation and distributed-DP noise, SecAgg+ keys and self-masks, DP-SGD's noise and
    Poisson batches
    (:func:`secret_seed` seeds a fresh torch generator every round).

Who can recompute what: the reproducible streams, everyone with ``config.toml`` (clients
receive the run config, and ``summary.json`` repeats it). The server's secret streams, only
whoever can read ``checkpoint.npz`` (the server's operator). A client's secret randomness,
only that client.
"""

from __future__ import annotations

import hashlib
import secrets
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
    SKETCH = 5
    """The count sketch's hashes under secure aggregation (drawn at round 0: one per run)."""
    CLIENT_SAMPLING = 0xC11E
    """Which partitions train in a round, without DP (under DP: :attr:`Secret.CLIENT_SAMPLING`)."""
    EVAL_SAMPLING = 0xE7A1
    """Which partitions evaluate in a round (federated evaluation)."""
    SIMULATED_DROPOUT = 0xD809
    """Which sampled clients a test tells to fail, and at which stage."""
    CENTRAL_DP_NOISE = 0xD9
    """Only for :class:`SecretStreams` built from an explicit, public seed (experiments that
    replay a run's noise on purpose); fedsqueeze's own app never does that."""


class Secret(IntEnum):
    """Purposes of the server's secret per-round generators (:class:`SecretStreams`)."""

    CENTRAL_DP_NOISE = 0xD9
    """Central DP's Gaussian noise, then adaptive clipping's count noise (one stream)."""
    CLIENT_SAMPLING = 0xC11E
    """Which partitions train in a round under central or distributed DP."""


class SecretStreams:
    """Per-round numpy generators derived from a secret key.

    ``rng(round, purpose)`` seeds a PCG64 from ``SHA-256(key ‖ round ‖ purpose)``: outputs of
    one round's generator say nothing about another round's, and nothing about the key; the
    same key and round give the same draws, which is what makes a resumed run (and a round
    re-run after a crash) release exactly what the uninterrupted run would — never a second,
    independently noised copy of the same round.

    Parameters
    ----------
    key
        32 secret bytes; None draws them from OS entropy (``secrets.token_bytes``).
    """

    def __init__(self, key: bytes | None = None) -> None:
        self.key = secrets.token_bytes(32) if key is None else bytes(key)
        if len(self.key) < 16:
            raise ValueError("a secret stream key needs at least 16 bytes")

    @classmethod
    def from_public_seed(cls, seed: int) -> SecretStreams:
        """Streams anyone who knows ``seed`` can recompute: for experiments only."""
        return cls(hashlib.sha256(b"public:%d:%d" % (int(seed), Stream.CENTRAL_DP_NOISE)).digest())

    def rng(self, server_round: int, purpose: Secret) -> np.random.Generator:
        """The generator of ``purpose`` in round ``server_round``."""
        digest = hashlib.sha256(self.key + b"|%d|%d" % (int(server_round), int(purpose))).digest()
        return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))

    def state(self) -> bytes:
        """What the private checkpoint keeps (the key)."""
        return self.key

    @classmethod
    def restore(cls, state: bytes) -> SecretStreams:
        return cls(state)


def secret_seed(bits: int = 64) -> int:
    """A seed from OS entropy (for a client's fresh per-round torch generator)."""
    return secrets.randbits(bits)


def round_seed(seed: int, server_round: int, stream: Stream) -> int:
    """A 31-bit seed shared by every party of round ``server_round`` for ``stream``."""
    entropy = [int(seed), int(server_round), int(stream), 0x5EED]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] >> 1)


def round_rng(seed: int, server_round: int, stream: Stream) -> np.random.Generator:
    """A numpy generator for ``stream`` in round ``server_round``."""
    return np.random.default_rng([int(seed), int(server_round), int(stream)])


def rounding_rng(codec_seed: int, client: int) -> np.random.Generator:
    """A client's stochastic rounding for the plain (not secure-aggregation) uplink codec:
    reproducible from the round's codec seed and the client's partition id. No guarantee
    depends on it — the server sees the quantized update itself — so a run repeats by seed."""
    return np.random.default_rng([int(codec_seed), int(client), int(Stream.UPLINK_CODEC)])


def training_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The seed of a client's local training order without DP (DP-SGD's is secret)."""
    return int(
        np.random.SeedSequence([int(seed), int(server_round), int(partition_id)]).generate_state(1)[
            0
        ]
    )
