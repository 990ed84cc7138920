"""Summable encodings: how a float update becomes an integer vector that secure aggregation
can sum, and how the server turns the sum back into floats.

The shape is TensorFlow Model Optimization's gather encoder: *encode* on the client →
secure sum in Z_{2^b} → *decode the sum* on the server. Every encoding is linear (the sum
of encodings decodes to the sum of the inputs, up to unbiased rounding), which is what
makes it usable under SecAgg+. One interface, one class per mode:

- :class:`ClippedSum` — clip to L2 norm ``clip``, scale, round without bias; the server gets
  the sum of the clipped updates (central DP adds its noise to that sum, and asks for
  conditional rounding so that one client's contribution has a known norm bound,
  :attr:`ClippedSum.l2_sensitivity`);
- :class:`WeightedSum` — the same weighted by ``min(n_i, weight_cap)``, with ``n_i`` appended
  as one more coordinate, so FedAvg's weights travel inside the mask;
- :class:`DistributedDPSum` — clip, shared-seed randomized Hadamard rotation, scale,
  conditional rounding and the client's share of Skellam / discrete-Gaussian noise;
- :class:`HadamardQuantSum` — clip, shared-seed block-wise Hadamard rotation, unbiased
  rounding to ``2**B`` levels per coordinate; the sum of ``n`` clients fits
  ``B + ceil(log2 n)`` bits (codec ``hadamard+qB``);

and two wrappers:

- :class:`RandomK` — only the shared-seed random-k positions are encoded (and masked, and
  sent); the server scatters the sum back;
- :class:`SketchSum` — FetchSGD's count sketch of the update is encoded instead (linear, so
  the secure sum is the sketch of the sum); the server unsketches it with its own state
  (:class:`~fedsqueeze.compression.sketch.SketchAccumulator`);
- :func:`encode_with_feedback` — client-local error feedback: what the integers mean in
  update units is subtracted from ``delta + residual``, the rest is carried.

The server describes the round's encoding to the clients with :meth:`to_fields`; a client
rebuilds it with :func:`encoding_from_fields`. Numpy only.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedsqueeze.compression import random_k_indices, stochastic_round
from fedsqueeze.compression.errors import CodecError
from fedsqueeze.compression.hadamard import BlockHadamard, resolve_block
from fedsqueeze.compression.sketch import DEFAULT_ROWS as DEFAULT_SKETCH_ROWS
from fedsqueeze.compression.sketch import CountSketch, sketch_shape
from fedsqueeze.compression.stages import Sketch, resolve_k
from fedsqueeze.privacy.distributed import (
    DistributedDPClient,
    DistributedDPParams,
    decode_sum,
    rounded_l2_sensitivity,
)
from fedsqueeze.privacy.errors import PrivacyError
from fedsqueeze.privacy.floor import PrivacyFloor
from fedsqueeze.secagg.field import MAX_BITS, required_bits

DEFAULT_BITS = 16
"""Field width when neither bits nor a scale is given."""


class EncodingError(ValueError):
    """An encoding cannot be built (overflow, bad parameters) or applied (wrong length)."""


def clip_flat(x: np.ndarray, clip: float) -> np.ndarray:
    """``x`` scaled to L2 norm at most ``clip``."""
    norm = float(np.linalg.norm(x))
    return x * (clip / norm) if norm > clip else x


class SummableEncoding(ABC):
    """Client ``encode`` → secure sum mod 2^``bits`` → server ``decode_sum``."""

    bits: int

    @property
    @abstractmethod
    def input_len(self) -> int:
        """Length of the flat float update a client encodes."""

    @property
    @abstractmethod
    def vector_len(self) -> int:
        """Length of the integer vector that is masked and summed."""

    @abstractmethod
    def encode(self, x: np.ndarray, weight: int, rng: np.random.Generator) -> np.ndarray:
        """Signed int64 vector of one client (``rng`` must be the client's private one)."""

    @abstractmethod
    def decode_sum(self, int_sum: np.ndarray, contributors: int) -> tuple[np.ndarray, float]:
        """Signed integer sum → ``(total, weight)``: the float sum of the (weighted, clipped)
        updates and the sum of their weights, so that ``total / weight`` is the mean."""

    def sent(self, ints: np.ndarray, weight: int) -> np.ndarray | None:
        """What one client's ``ints`` mean in update units (None: not separable, e.g. noised)."""
        return None

    @abstractmethod
    def to_fields(self) -> dict[str, Any]:
        """Flat description for the setup message (see :func:`encoding_from_fields`)."""

    def _check_len(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.input_len,):
            raise EncodingError(
                f"update has {x.size} parameters, the round's encoding expects {self.input_len}"
            )
        return x


_MAX_ROUNDING_ATTEMPTS = 1000


@dataclass(frozen=True)
class ClippedSum(SummableEncoding):
    """Unweighted: ``stochastic_round(scale * clip(x))``; the server gets the sum of clipped x.

    Rounding moves every coordinate by up to one unit, so a rounded contribution can be
    longer than ``clip`` — by up to ``sqrt(dim) / scale``. With ``beta > 0`` (central DP)
    the client rounds *conditionally* (Kairouz et al. 2021, as distributed DP does): it
    redraws the rounding until the integer vector's norm is within the bound of
    :func:`~fedsqueeze.privacy.distributed.rounded_l2_sensitivity`, so every contribution
    the server sums has norm at most :attr:`l2_sensitivity` (in update units), the value
    central DP calibrates its noise to. The bound holds for every contribution, not just
    with high probability: ``beta`` only sets how often a draw is redone.
    """

    dim: int
    clip: float
    scale: float
    bits: int
    num_clients: int
    beta: float = 0.0
    """Per-attempt failure probability of conditional rounding; 0 = unconditional."""

    def __post_init__(self) -> None:
        if not (self.beta == 0.0 or 0.0 < self.beta < 1.0):
            raise EncodingError(f"conditional-rounding beta must be 0 or in (0, 1): {self.beta}")

    @property
    def l2_sensitivity(self) -> float:
        """Largest L2 norm of one client's decoded contribution (before any weighting)."""
        beta = self.beta if self.beta > 0 else None
        return rounded_l2_sensitivity(self.dim, self.clip, self.scale, beta) / self.scale

    @property
    def input_len(self) -> int:
        return self.dim

    @property
    def vector_len(self) -> int:
        return self.dim

    @property
    def max_abs(self) -> int:
        """Largest |value| of one client's coordinate after rounding."""
        return math.ceil(self.scale * self.clip)

    def _ints(self, x: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
        scaled = clip_flat(x, self.clip) * (self.scale * factor)
        bound = math.ceil(self.scale * self.clip)
        max_sq = (self.l2_sensitivity * self.scale) ** 2 if self.beta > 0 else math.inf
        for _ in range(_MAX_ROUNDING_ATTEMPTS):
            # np.clip is a no-op unless float nudged an edge (and never lengthens the vector).
            ints: np.ndarray = np.clip(stochastic_round(scaled, rng), -bound, bound)
            wide = ints.astype(np.float64)
            if float(np.dot(wide, wide)) <= max_sq:
                return ints
        raise EncodingError(
            f"conditional rounding missed its norm bound {_MAX_ROUNDING_ATTEMPTS} times"
        )

    def encode(self, x: np.ndarray, weight: int, rng: np.random.Generator) -> np.ndarray:
        return self._ints(self._check_len(x), 1.0, rng)

    def decode_sum(self, int_sum: np.ndarray, contributors: int) -> tuple[np.ndarray, float]:
        return np.asarray(int_sum, dtype=np.int64).astype(np.float64) / self.scale, contributors

    def sent(self, ints: np.ndarray, weight: int) -> np.ndarray:
        return np.asarray(ints, dtype=np.float64) / self.scale

    def to_fields(self) -> dict[str, Any]:
        return {"kind": "sum", **asdict(self)}


@dataclass(frozen=True)
class WeightedSum(ClippedSum):
    """FedAvg inside the mask: ``stochastic_round(scale * w * clip(x))`` with
    ``w = min(n, weight_cap) / weight_cap <= 1``, then ``min(n, weight_cap)`` appended."""

    weight_cap: int = 1

    @property
    def vector_len(self) -> int:
        return self.dim + 1

    @property
    def max_abs(self) -> int:
        return max(super().max_abs, self.weight_cap)

    def _weight(self, weight: int) -> int:
        return max(0, min(int(weight), self.weight_cap))

    def encode(self, x: np.ndarray, weight: int, rng: np.random.Generator) -> np.ndarray:
        n = self._weight(weight)
        ints = self._ints(self._check_len(x), n / self.weight_cap, rng)
        return np.concatenate([ints, np.array([n], dtype=np.int64)])

    def decode_sum(self, int_sum: np.ndarray, contributors: int) -> tuple[np.ndarray, float]:
        s = np.asarray(int_sum, dtype=np.int64)
        total = s[:-1].astype(np.float64) / self.scale * self.weight_cap
        return total, float(s[-1])

    def sent(self, ints: np.ndarray, weight: int) -> np.ndarray:
        n = self._weight(weight)
        if n == 0:
            return np.zeros(self.dim)
        return np.asarray(ints[:-1], dtype=np.float64) / (self.scale * n / self.weight_cap)

    def to_fields(self) -> dict[str, Any]:
        return {**super().to_fields(), "kind": "weighted"}


def choose_integer_encoding(
    *,
    dim: int,
    num_clients: int,
    clip: float,
    bits: int = 0,
    scale: float = 0.0,
    weight_cap: int = 0,
    beta: float = 0.0,
) -> ClippedSum:
    """A :class:`ClippedSum` (``weight_cap = 0``) or :class:`WeightedSum` that cannot overflow.

    ``beta > 0`` asks for conditional rounding (central DP; see :class:`ClippedSum`).

    Given ``bits``: the largest scale that fits; given ``scale``: the bits it needs; neither:
    :data:`DEFAULT_BITS` (more if the weights need it).

    Raises
    ------
    EncodingError
        Both given and the sum of ``num_clients`` inputs would wrap around, or the weight
        coordinate alone does not fit the width.
    """
    if num_clients < 2:
        raise EncodingError(f"secure aggregation needs >= 2 clients per round, got {num_clients}")
    if not (math.isfinite(clip) and clip > 0):
        raise EncodingError(f"the clipping range must be > 0, got {clip}")
    if weight_cap < 0:
        raise EncodingError(f"weight cap must be >= 0, got {weight_cap}")
    cap = int(weight_cap)
    if scale > 0:
        coord = math.ceil(scale * clip)
        need = required_bits(num_clients, max(coord, cap))
        if bits == 0:
            bits = need
        elif need > bits:
            raise EncodingError(
                f"secagg overflow: {num_clients} clients x values up to {max(coord, cap)} "
                f"(scale {scale:g} x clip {clip:g}"
                + (f", weights up to {cap}" if cap else "")
                + f") need {need} bits, but secagg-bits = {bits}; raise secagg-bits or "
                "lower secagg-scale/secagg-clip"
            )
    else:
        if bits == 0:
            bits = max(DEFAULT_BITS, required_bits(num_clients, 2 * cap if cap else 2))
        per_client = ((1 << (bits - 1)) - 1) // num_clients
        if cap > per_client:
            raise EncodingError(
                f"secagg overflow: the weight coordinate (up to {cap} examples per client) of "
                f"{num_clients} clients needs {required_bits(num_clients, cap)} bits, but "
                f"secagg-bits = {bits}; raise secagg-bits"
            )
        if per_client < 1:
            raise EncodingError(
                f"secagg-bits = {bits} cannot hold the sum of {num_clients} clients' values; "
                f"use at least {required_bits(num_clients, 1)} bits"
            )
        # ceil(scale * clip) == per_client exactly (floating point cannot push it over).
        scale = per_client / clip * (1.0 - 1e-12)
    if bits > MAX_BITS:
        raise EncodingError(f"secagg needs {bits} bits, more than the {MAX_BITS} maximum")
    if cap:
        return WeightedSum(
            dim, float(clip), float(scale), int(bits), num_clients, float(beta), weight_cap=cap
        )
    return ClippedSum(dim, float(clip), float(scale), int(bits), num_clients, float(beta))


@dataclass(frozen=True)
class DistributedDPSum(SummableEncoding):
    """Distributed DP (Kairouz et al. 2021, Agarwal et al. 2021): every client clips,
    rotates with the round's shared seed, scales, rounds and adds its share of the noise."""

    params: DistributedDPParams
    rotation_seed: int

    @property
    def bits(self) -> int:  # type: ignore[override]
        return self.params.bits

    @property
    def input_len(self) -> int:
        return self.params.dim

    @property
    def vector_len(self) -> int:
        return self.params.padded_dim

    def encode(self, x: np.ndarray, weight: int, rng: np.random.Generator) -> np.ndarray:
        return DistributedDPClient(self.params).encode(self._check_len(x), rng, self.rotation_seed)

    def decode_sum(self, int_sum: np.ndarray, contributors: int) -> tuple[np.ndarray, float]:
        total = decode_sum(
            np.asarray(int_sum, dtype=np.int64), contributors, self.params, self.rotation_seed
        )
        return total, float(contributors)

    def to_fields(self) -> dict[str, Any]:
        return {"kind": "ddp", "rotation_seed": self.rotation_seed, **asdict(self.params)}


HADAMARD_SIGMAS = 3.0
"""Headroom of :class:`HadamardQuantSum`, in standard deviations of a rotated coordinate of
an update at the clip norm (module constant; see the class docstring for the choice)."""


@functools.lru_cache(maxsize=4)
def _rotation(dim: int, seed: int, block: int) -> BlockHadamard:
    return BlockHadamard(dim, seed, block, permute=True)


@dataclass(frozen=True)
class HadamardQuantSum(SummableEncoding):
    """``hadamard+qB``: rotate, then ``B`` bits per coordinate; a field of ``B + ceil(log2 n)``.

    A client clips its update to ``clip``, rotates it with the round's shared seed
    (:class:`~fedsqueeze.compression.hadamard.BlockHadamard` with ``permute=True``: seeded
    shuffle, blocks of ``block`` coordinates, only the last one padded), multiplies by
    :attr:`scale` (and, weighted, by ``w = min(n_i, weight_cap) / weight_cap``) and rounds
    every coordinate without bias to one of the ``2**B`` half-integer levels
    ``-(2**(B-1) - 1/2), ..., 2**(B-1) - 1/2`` (sent as the integers ``level - 1/2``, i.e. a
    B-bit two's-complement value). Weighted, ``w`` itself is appended, rounded without bias
    to the ``2**B`` levels of ``[0, 1]``. ``n`` clients' B-bit values sum to at most
    ``n * 2**(B-1)`` in magnitude: :attr:`bits` ``= B + ceil(log2 n)`` holds any sum of at most
    ``n`` inputs exactly — whatever the inputs, since each is clamped to its B-bit range before
    it is sent (a coordinate beyond the range is clamped, never wrapped).

    The scale: after the shuffle and rotation a coordinate of a vector x is about
    ``N(0, ‖x‖² / padded_dim)`` (each block holds a uniform sample of the coordinates), so at
    the clip norm its std is ``clip / sqrt(padded_dim)``. :attr:`scale` maps
    :data:`HADAMARD_SIGMAS` (3) of those stds onto the outermost level: an update at the clip
    has about 0.3% of its coordinates clamped (a slight shrink toward zero of those only); a
    shorter update none, at the price of coarser levels relative to it. Unbiased wherever
    nothing is clamped; the decoded sum is the sum of the clipped (weighted) inputs up to the
    rounding: at most ``sqrt(padded_dim) / scale`` in L2 norm per client (orthonormal
    rotation, each coordinate moved by less than one level), about half that in expectation.
    """

    dim: int
    clip: float
    levels_bits: int
    num_clients: int
    rotation_seed: int
    block: int = 0
    weight_cap: int = 0

    def __post_init__(self) -> None:
        for name, lo, hi in (
            ("dim", 1, None),
            ("num_clients", 2, None),
            ("rotation_seed", 0, None),
            ("levels_bits", 1, 16),
            ("weight_cap", 0, None),
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < lo
                or (hi is not None and value > hi)
            ):
                span = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
                raise EncodingError(f"hadamard: {name} must be an int {span}, got {value!r}")
        if not (isinstance(self.clip, int | float) and math.isfinite(self.clip) and self.clip > 0):
            raise EncodingError(f"hadamard: the clip must be a finite number > 0, got {self.clip}")
        try:
            object.__setattr__(self, "block", resolve_block(self.dim, self.block))
        except CodecError as err:
            raise EncodingError(f"hadamard: {err}") from None
        if self.bits > MAX_BITS:
            raise EncodingError(f"hadamard needs {self.bits} bits, more than {MAX_BITS}")

    @property
    def bits(self) -> int:  # type: ignore[override]
        """``B + ceil(log2 num_clients)``."""
        return self.levels_bits + (self.num_clients - 1).bit_length()

    @property
    def rotation(self) -> BlockHadamard:
        return _rotation(self.dim, self.rotation_seed, self.block)

    @property
    def padded_dim(self) -> int:
        return -(-self.dim // self.block) * self.block

    @property
    def half(self) -> int:
        """``2**(B-1)``: a client's integers lie in ``[-half, half - 1]``."""
        return 1 << (self.levels_bits - 1)

    @property
    def scale(self) -> float:
        """Integer levels per update unit (class docstring)."""
        return (self.half - 0.5) * math.sqrt(self.padded_dim) / (HADAMARD_SIGMAS * self.clip)

    @property
    def input_len(self) -> int:
        return self.dim

    @property
    def vector_len(self) -> int:
        return self.padded_dim + (1 if self.weight_cap else 0)

    def _fraction(self, weight: int) -> float:
        if not self.weight_cap:
            return 1.0
        return max(0, min(int(weight), self.weight_cap)) / self.weight_cap

    def _levels(self, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Unbiased rounding of ``y`` (clamped to ``±(half - 1/2)``) to ``level - 1/2``."""
        y = np.clip(y, 0.5 - self.half, self.half - 0.5) - 0.5
        out: np.ndarray = np.clip(stochastic_round(y, rng), -self.half, self.half - 1)
        return out

    def encode(self, x: np.ndarray, weight: int, rng: np.random.Generator) -> np.ndarray:
        x = self._check_len(x)
        if not np.all(np.isfinite(x)):
            raise EncodingError("update contains NaN or Inf")
        w = self._fraction(weight)
        ints = self._levels(self.rotation.rotate(clip_flat(x, self.clip)) * (self.scale * w), rng)
        if not self.weight_cap:
            return ints
        # w in [0, 1] onto the same 2**B levels: (2**B - 1) * w - (half - 1/2).
        levels = (2 * self.half - 1) * w - (self.half - 0.5)
        return np.concatenate([ints, self._levels(np.array([levels]), rng)])

    def _check_sum(self, int_sum: np.ndarray) -> np.ndarray:
        s = np.asarray(int_sum)
        if s.shape != (self.vector_len,) or s.dtype.kind not in "iu":
            raise EncodingError(
                f"hadamard: expected {self.vector_len} integers, got {s.dtype}{s.shape}"
            )
        return s.astype(np.int64)

    def decode_sum(self, int_sum: np.ndarray, contributors: int) -> tuple[np.ndarray, float]:
        s, m = self._check_sum(int_sum), int(contributors)
        # Each of the m inputs sent level - 1/2: add the m halves back.
        total = self.rotation.unrotate((s[: self.padded_dim] + 0.5 * m) / self.scale)
        if not self.weight_cap:
            return total, float(m)
        w_sum = (float(s[-1]) + m * self.half) / (2 * self.half - 1)
        return total * self.weight_cap, w_sum * self.weight_cap

    def sent(self, ints: np.ndarray, weight: int) -> np.ndarray:
        w = self._fraction(weight)
        if w == 0:
            return np.zeros(self.dim)
        s = self._check_sum(ints)[: self.padded_dim]
        return self.rotation.unrotate((s + 0.5) / self.scale) / w

    def outside_range(self, int_sum: np.ndarray, count: int) -> str:
        """Why ``int_sum`` is no sum of ``count`` honest inputs ("" if it could be one).

        Every honest coordinate lies in ``[-half, half - 1]`` and an honest input's levels
        (``ints + 1/2``) have norm at most ``scale * clip + sqrt(padded_dim)`` (clamping only
        shortens; rounding moves each coordinate by less than one level).
        """
        s = self._check_sum(int_sum)
        if s.size and (int(s.min()) < -count * self.half or int(s.max()) > count * (self.half - 1)):
            return (
                f"a coordinate sum is outside what {count} clients' {self.levels_bits}-bit "
                "values can reach"
            )
        vec = s[: self.padded_dim].astype(np.float64) + 0.5 * count
        reach = count * (self.scale * self.clip + math.sqrt(self.padded_dim))
        norm = float(np.linalg.norm(vec))
        if norm > reach:
            return (
                f"the sum's norm ({norm:.0f}) exceeds what {count} clients clipped to "
                f"{self.clip:g} can produce ({reach:.0f})"
            )
        return ""

    def to_fields(self) -> dict[str, Any]:
        return {"kind": "hadamard", **asdict(self)}


@dataclass(frozen=True)
class Projected(SummableEncoding):
    """A ``dim``-long update mapped linearly to a shorter vector that ``inner`` encodes (the
    same map for every client of a round, so the secure sum is the map of the sum)."""

    inner: SummableEncoding
    dim: int

    @property
    def bits(self) -> int:  # type: ignore[override]
        return self.inner.bits

    @property
    def input_len(self) -> int:
        return self.dim

    @property
    def vector_len(self) -> int:
        return self.inner.vector_len


@dataclass(frozen=True)
class RandomK(Projected):
    """Only ``k`` shared-seed random positions of a ``dim``-long update are encoded."""

    seed: int

    @property
    def positions(self) -> np.ndarray:
        return random_k_indices(self.dim, self.inner.input_len, self.seed)

    def _scatter(self, values: np.ndarray) -> np.ndarray:
        out = np.zeros(self.dim, dtype=np.float64)
        out[self.positions] = values
        return out

    def encode(self, x: np.ndarray, weight: int, rng: np.random.Generator) -> np.ndarray:
        return self.inner.encode(self._check_len(x)[self.positions], weight, rng)

    def decode_sum(self, int_sum: np.ndarray, contributors: int) -> tuple[np.ndarray, float]:
        total, weight = self.inner.decode_sum(int_sum, contributors)
        return self._scatter(total), weight

    def sent(self, ints: np.ndarray, weight: int) -> np.ndarray | None:
        inner = self.inner.sent(ints, weight)
        return None if inner is None else self._scatter(inner)

    def to_fields(self) -> dict[str, Any]:
        return {"randk_dim": self.dim, "randk_seed": self.seed, **self.inner.to_fields()}


def random_k(inner_for: Any, dim: int, amount: float | int, seed: int) -> SummableEncoding:
    """``inner_for(k)`` wrapped in :class:`RandomK`, or ``inner_for(dim)`` when ``k >= dim``."""
    k = resolve_k(amount, dim)
    if k >= dim:
        return inner_for(dim)  # type: ignore[no-any-return]
    return RandomK(inner_for(k), dim, seed)


@functools.lru_cache(maxsize=4)
def _count_sketch(dim: int, rows: int, cols: int, seed: int) -> CountSketch:
    return CountSketch(dim, rows, cols, seed)


@dataclass(frozen=True)
class SketchSum(Projected):
    """A ``rows x cols`` count sketch of the ``dim``-long update is encoded by ``inner``.

    The table is divided by ``sqrt(rows)`` before ``inner`` clips and rounds it: its norm is
    then about the update's (each row keeps the norm in expectation), so ``clip`` means what
    it means for a dense update. :meth:`decode_sum` returns the summed *table* (length
    ``rows * cols``, back in sketch units), not a ``dim``-long update: the server unsketches
    the mean table with a :class:`~fedsqueeze.compression.sketch.SketchAccumulator`, which
    keeps state across rounds. The hashes (``seed``) are the run's, the same every round.
    """

    rows: int
    cols: int
    seed: int

    @property
    def sketch(self) -> CountSketch:
        return _count_sketch(self.dim, self.rows, self.cols, self.seed)

    def encode(self, x: np.ndarray, weight: int, rng: np.random.Generator) -> np.ndarray:
        table = self.sketch.sketch(self._check_len(x)) / math.sqrt(self.rows)
        return self.inner.encode(table, weight, rng)

    def decode_sum(self, int_sum: np.ndarray, contributors: int) -> tuple[np.ndarray, float]:
        total, weight = self.inner.decode_sum(int_sum, contributors)
        return total * math.sqrt(self.rows), weight

    def to_fields(self) -> dict[str, Any]:
        return {
            "sketch_dim": self.dim,
            "sketch_rows": self.rows,
            "sketch_cols": self.cols,
            "sketch_seed": self.seed,
            **self.inner.to_fields(),
        }


def sketched(inner_for: Any, dim: int, stage: Sketch, seed: int) -> SketchSum:
    """``inner_for(rows * cols)`` wrapped in :class:`SketchSum` for the ``sketch(F)`` stage."""
    rows, cols = sketch_shape(dim, stage.amount, stage.rows or DEFAULT_SKETCH_ROWS)
    return SketchSum(inner_for(rows * cols), dim, rows, cols, seed)


def encoding_from_fields(fields: Mapping[str, Any]) -> SummableEncoding:
    """The encoding a server described with :meth:`SummableEncoding.to_fields`.

    Raises
    ------
    EncodingError
        Unknown kind or missing/invalid parameters.
    """
    f = dict(fields)
    try:
        kind = str(f.pop("kind"))
        randk = (int(f.pop("randk_dim")), int(f.pop("randk_seed"))) if "randk_dim" in f else None
        sketch = (
            tuple(int(f.pop(f"sketch_{key}")) for key in ("dim", "rows", "cols", "seed"))
            if "sketch_dim" in f
            else None
        )
        inner: SummableEncoding
        if kind == "sum":
            inner = ClippedSum(**f)
        elif kind == "weighted":
            inner = WeightedSum(**f)
        elif kind == "hadamard":
            inner = HadamardQuantSum(**f)
        elif kind == "ddp":
            rotation_seed = int(f.pop("rotation_seed"))
            inner = DistributedDPSum(DistributedDPParams(**f), rotation_seed)
        else:
            raise EncodingError(f"unknown summable encoding {kind!r}")
        if sketch is not None:
            if randk is not None:
                raise EncodingError("an encoding is either random-k or a sketch, not both")
            dim, rows, cols, seed = sketch
            if min(dim, rows, cols) < 1 or seed < 0 or inner.input_len != rows * cols:
                raise EncodingError(f"bad sketch description: {sketch}")
            encoding = SketchSum(inner, dim, rows, cols, seed)
            encoding.sketch  # noqa: B018  (builds the hashes: a bad size fails here, typed)
            return encoding
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, EncodingError):
            raise
        raise EncodingError(f"bad encoding description: {err}") from None
    return inner if randk is None else RandomK(inner, *randk)


def check_privacy_floor(
    encoding: SummableEncoding, node_config: Mapping[str, Any], min_contributors: int
) -> None:
    """Refuse an encoding that noises less than this device's floor (distributed DP).

    ``node_config`` is the client's own (its :class:`~fedsqueeze.privacy.floor.PrivacyFloor`
    keys); ``min_contributors`` the fewest clients whose noise shares the secure sum can
    hold (the SecAgg+ threshold). Encodings without client-side noise pass: under central
    DP the server is trusted with the noise. The SecAgg mod calls this before training.

    Raises
    ------
    EncodingError
        Below the floor, or the floor in the node config is malformed.
    """
    # Any projection (random-k, a sketch) hides its inner encoding: a server that wrapped a
    # weakly noised distributed-DP encoding in a sketch must not slip past the floor.
    inner = encoding.inner if isinstance(encoding, Projected) else encoding
    if not isinstance(inner, DistributedDPSum):
        return
    try:
        PrivacyFloor.from_node_config(node_config).check_distributed(inner.params, min_contributors)
    except PrivacyError as err:
        raise EncodingError(str(err)) from None


def encode_with_feedback(
    encoding: SummableEncoding,
    delta: np.ndarray,
    residual: np.ndarray,
    weight: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Error feedback under secure aggregation: ``(ints, residual after sending them)``.

    The client knows exactly what it contributes to the masked sum, so it carries the rest
    to its next round while the server side stays unchanged. With ``v = delta + residual``
    the encoding selects (random-k), clips *what is sent* (the overflow check and a DP
    sensitivity concern the sent vector only) and rounds; ``sent`` is what those integers
    mean in unweighted update units, and the new residual is ``v - sent``. Over any number of
    rounds ``sum(sent) + residual == sum(delta)`` (up to float32 storage of the residual).

    Raises
    ------
    EncodingError
        The encoding's output is not separable from noise (distributed DP).
    """
    d = encoding.input_len
    if residual.shape != (d,):
        raise EncodingError(f"residual has shape {residual.shape}, the model has {d} parameters")
    v = np.asarray(delta, dtype=np.float64) + np.asarray(residual, dtype=np.float64)
    ints = encoding.encode(v, weight, rng)
    sent = encoding.sent(ints, weight)
    if sent is None:
        raise EncodingError("error feedback needs an encoding whose output is not noised")
    return ints, v - sent
