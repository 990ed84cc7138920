"""Deep Gradient Compression's fixes (Lin et al., ICLR 2018), carried over to federated rounds.

Pure numpy. DGC sends one sparse gradient per step; a federated client sends one sparse
update per round, so here the round's update (the client's weights minus the model it was
sent) plays the part of DGC's gradient, and "an iteration" is a round:

- **local clipping** (:func:`clip_l2`): the update is scaled down to an L2 bound *before* it
  enters the accumulators, so one exploding round cannot be replayed by error feedback for
  many rounds after;
- **momentum correction** (:func:`encode_update`): a client keeps a velocity
  ``u <- m*u + update`` and error feedback accumulates ``u`` instead of the raw update, so a
  coordinate that waits many rounds in the residual is sent with the momentum it would have
  had in dense training;
- **momentum-factor masking**: the velocity of every coordinate just sent is cleared, so a
  sent coordinate does not keep pushing in the stale direction through momentum;
- **sparsity warm-up** (:func:`warmup_density`, :func:`warmup_codec`): the first rounds send
  a denser update, the density decaying exponentially to the codec's target, while the model
  changes fastest;
- **error accumulation on the server** (:class:`ServerAccumulator`): the server applies only
  the largest coordinates of its own accumulated step and keeps the rest. The server takes
  part in every round, so this error never goes stale the way a client's residual does when
  the client is not sampled again for many rounds.

The client-side fixes act only on codecs with error feedback (``ef``): without an
accumulator there is nothing to correct. Warm-up acts on ``topk``, ``topk_pt`` and ``randk``
given as a fraction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsqueeze.compression.codec import Codec, Encoded, _flatten
from fedsqueeze.compression.errors import CodecError
from fedsqueeze.compression.stages import ErrorFeedback, RandomK, TopK, TopKPerTensor

VELOCITY_KEY = "dgc.velocity"
"""Client state key of the momentum-correction velocity (next to ``ef.residual``)."""

_WARMUP_SPARSIFIERS = (TopK, TopKPerTensor, RandomK)


@dataclass(frozen=True)
class DGCOptions:
    """The client-side DGC fixes, as the server asks for them each round.

    Parameters
    ----------
    momentum
        Momentum-correction factor ``m`` (0: off, the residual accumulates raw updates).
    masking
        Momentum-factor masking: clear the velocity of the coordinates just sent.
    clip
        L2 bound on a round's update before it is accumulated (0: off).
    """

    momentum: float = 0.0
    masking: bool = True
    clip: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.momentum) and 0.0 <= self.momentum < 1.0):
            raise CodecError(f"dgc momentum must be in [0, 1), got {self.momentum!r}")
        if not (math.isfinite(self.clip) and self.clip >= 0.0):
            raise CodecError(f"dgc clip must be finite and >= 0, got {self.clip!r}")

    RECORD_KEYS = ("dgc-momentum", "dgc-masking", "dgc-clip")

    def to_record(self) -> dict[str, float | bool]:
        """The options as record values (the keys of :attr:`RECORD_KEYS`)."""
        return {"dgc-momentum": self.momentum, "dgc-masking": self.masking, "dgc-clip": self.clip}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> DGCOptions:
        """Options from a record; absent keys keep the (off) defaults. Raises CodecError."""
        try:
            return cls(
                momentum=float(record.get("dgc-momentum", 0.0)),
                masking=bool(record.get("dgc-masking", True)),
                clip=float(record.get("dgc-clip", 0.0)),
            )
        except (TypeError, ValueError) as err:
            raise CodecError(f"bad dgc options: {err}") from None


def clip_l2(flat: np.ndarray, bound: float) -> np.ndarray:
    """``flat`` scaled down to L2 norm ``bound`` (unchanged if within it, or ``bound == 0``)."""
    if bound <= 0:
        return flat
    norm = float(np.linalg.norm(flat.astype(np.float64)))
    if norm <= bound:
        return flat
    return (flat * np.float32(bound / norm)).astype(np.float32)


def encode_update(
    codec: Codec,
    update: Mapping[str, np.ndarray],
    options: DGCOptions,
    *,
    seed: int | None = None,
    state: Mapping[str, np.ndarray] | None = None,
    rng: np.random.Generator | None = None,
    layout: str = "full",
) -> Encoded:
    """:meth:`Codec.encode` with the client-side DGC fixes.

    With an ``ef`` codec: the update is clipped to ``options.clip``; with momentum the
    velocity ``u <- m*u + update`` is what error feedback accumulates (``sent + residual =
    u + old residual``); with masking the velocity is then cleared at the sent positions.
    The returned state holds the residual and the velocity. Without ``ef`` this is plain
    :meth:`Codec.encode`.
    """
    if not isinstance(codec.feedback, ErrorFeedback):
        return codec.encode(update, seed=seed, state=state, rng=rng, layout=layout)
    table, flat = _flatten(update)
    g = clip_l2(flat, options.clip)
    if options.momentum > 0:
        velocity = _velocity(state, table.d)
        g = (np.float32(options.momentum) * velocity + g).astype(np.float32)
        if not np.all(np.isfinite(g)):
            raise CodecError("momentum-corrected update overflows float32")
    offsets = table.offsets
    arrays = {
        name: g[offsets[i] : offsets[i + 1]].reshape(shape)
        for i, (name, shape) in enumerate(zip(table.names, table.shapes, strict=True))
    }
    residual = {k: v for k, v in (state or {}).items() if k != VELOCITY_KEY}
    encoded = codec.encode(arrays, seed=seed, state=residual or None, rng=rng, layout=layout)
    if options.momentum > 0:
        velocity = g.copy()
        if options.masking:
            velocity[slice(None) if encoded.positions is None else encoded.positions] = 0.0
        encoded.state[VELOCITY_KEY] = velocity
    return encoded


def _velocity(state: Mapping[str, np.ndarray] | None, d: int) -> np.ndarray:
    if not state or VELOCITY_KEY not in state:
        return np.zeros(d, dtype=np.float32)
    u = np.asarray(state[VELOCITY_KEY])
    if u.shape != (d,) or u.dtype != np.float32:
        raise CodecError(f"client state {VELOCITY_KEY!r} is {u.dtype}{u.shape}, expected ({d},)")
    return u


# ---------------------------------------------------------------------------- warm-up


def warmup_density(server_round: int, target: float, rounds: int, start: float) -> float:
    """Density of round ``server_round`` (1-based): ``start`` in round 1, decaying
    exponentially (by the same factor each round) to ``target`` in round ``rounds + 1``,
    ``target`` from then on. No warm-up when ``rounds == 0`` or ``start <= target``."""
    if not (0 < target <= 1 and 0 < start <= 1):
        raise CodecError(f"densities must be in (0, 1], got target {target}, start {start}")
    if rounds <= 0 or start <= target or server_round > rounds:
        return target
    r = max(server_round, 1)
    return float(start * (target / start) ** ((r - 1) / rounds))


def warmup_codec(codec: Codec, server_round: int, rounds: int, start: float) -> Codec:
    """``codec`` with its sparsifier's fraction replaced by :func:`warmup_density` of the
    round (3 significant digits, never below the target). Codecs without a fractional
    ``topk``/``topk_pt``/``randk`` stage, and rounds after the warm-up, are returned as is."""
    sparsifier = codec.sparsifier
    if not isinstance(sparsifier, _WARMUP_SPARSIFIERS) or not isinstance(sparsifier.amount, float):
        return codec
    target = sparsifier.amount
    density = warmup_density(server_round, target, rounds, start)
    density = min(1.0, max(target, float(f"{density:.3g}")))
    if density == target:
        return codec
    rest = [s for s in codec.stages if s is not sparsifier]
    return Codec([type(sparsifier)(density), *rest])


# ---------------------------------------------------------------- server-side accumulation


class ServerAccumulator:
    """DGC's accumulation run by the server on the aggregated update.

    Each round: ``u <- m*u + aggregate``; ``e <- e + u``; the applied step is the
    ``density`` largest-magnitude coordinates of ``e`` (all of it at density 1), removed from
    ``e``; with masking, ``u`` is cleared where a sparse step (``density < 1``) applied.
    ``m = 0`` and ``density = 1`` is plain FedAvg (the step is the aggregate); ``m > 0`` and
    ``density = 1`` is server momentum (FedAvgM with server learning rate 1): masking is
    for coordinates that waited in ``e`` while their velocity kept growing, and a dense step
    leaves none waiting (masking it would clear all of ``u`` and silently turn the momentum
    off). What is not applied stays in ``e`` and is applied in a later round: the server is
    in every round, so unlike a client's residual it never waits for a client to be sampled
    again. A sparse step also makes the next broadcast a sparse change of the model.
    """

    def __init__(self, momentum: float = 0.0, density: float = 1.0, masking: bool = True) -> None:
        if not (math.isfinite(momentum) and 0.0 <= momentum < 1.0):
            raise ValueError(f"server momentum must be in [0, 1), got {momentum!r}")
        if not (math.isfinite(density) and 0.0 < density <= 1.0):
            raise ValueError(f"server density must be in (0, 1], got {density!r}")
        self.momentum = float(momentum)
        self.density = float(density)
        self.masking = bool(masking)
        self.velocity: np.ndarray | None = None
        self.error: np.ndarray | None = None

    def step(self, aggregate: np.ndarray) -> np.ndarray:
        """The step to apply for this round's aggregated update (flat, float64)."""
        a = np.asarray(aggregate, dtype=np.float64)
        if self.error is None or self.error.shape != a.shape:
            self.velocity = np.zeros_like(a)
            self.error = np.zeros_like(a)
        assert self.velocity is not None
        u = self.momentum * self.velocity + a
        e = self.error + u
        if self.density >= 1.0:
            applied = e
            self.error = np.zeros_like(e)
            positions: slice | np.ndarray = slice(None)
        else:
            k = min(a.size, max(1, round(self.density * a.size)))
            positions = np.argpartition(np.abs(e), a.size - k)[a.size - k :]
            applied = np.zeros_like(e)
            applied[positions] = e[positions]
            e[positions] = 0.0
            self.error = e
        if self.masking and self.density < 1.0:
            u[positions] = 0.0
        self.velocity = u
        return applied

    def state(self) -> dict[str, Any]:
        if self.error is None or self.velocity is None:
            return {}
        return {"velocity": self.velocity, "error": self.error}

    def restore(self, state: Mapping[str, Any]) -> None:
        if "error" in state and "velocity" in state:
            self.error = np.asarray(state["error"], dtype=np.float64)
            self.velocity = np.asarray(state["velocity"], dtype=np.float64)
