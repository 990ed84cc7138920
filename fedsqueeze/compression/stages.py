"""Codec stages: encode/decode pairs that declare their properties.

Modelled on TF Model Optimization's ``tensor_encoding``: every stage says whether it is
``linear`` (decoding commutes with summing encoded updates, so a server could aggregate
before decoding), whether its output is integer and at which bit width, whether it needs
the shared per-round seed, and which state it keeps.

A chain has up to one stage of each role, applied in this order:

1. ``sparsify`` -- chooses positions of the flat update (all tensors concatenated in
   order): :class:`TopK`, :class:`TopKPerTensor`, :class:`RandomK`, :class:`Threshold`;
2. ``rotate`` -- :class:`Hadamard` (secure aggregation only: a shared-seed rotation that
   the secure sum commutes with, before an unbiased ``qB``);
3. ``quantize`` -- codes the kept values: :class:`Quantize`, :class:`QSGD`,
   :class:`Sign`, :class:`Ternary`, :class:`Float16`, :class:`BFloat16`,
   :class:`Float32` (the default: plain float32);
4. ``feedback`` -- wraps the whole lossy chain: :class:`ErrorFeedback`, :class:`EF21`;
5. ``lossless`` -- compresses the final bytes: :class:`Zstd`, :class:`Zlib`.
"""

from __future__ import annotations

import itertools
import math
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import zstandard

from fedsqueeze.compression._wire import Reader, Writer
from fedsqueeze.compression.bitpack import pack_bits, packed_size, unpack_bits
from fedsqueeze.compression.errors import CodecError, CodecSpecError, PayloadError
from fedsqueeze.compression.indexcode import decode_positions, encode_positions
from fedsqueeze.compression.sampling import random_k_indices, stochastic_round

Role = Literal["sparsify", "rotate", "quantize", "feedback", "lossless"]


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of the tensors of an update, in order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @property
    def sizes(self) -> np.ndarray:
        return np.array([math.prod(s) for s in self.shapes], dtype=np.int64)

    @property
    def offsets(self) -> np.ndarray:
        """Start of each tensor in the flat vector, plus the total ``d`` at the end."""
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    @property
    def d(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes))


def _fmt(x: float | int) -> str:
    return repr(x) if isinstance(x, float) else str(x)


class Stage(ABC):
    """One encode/decode pair of a codec chain, with its declared properties."""

    role: ClassVar[Role]
    name: ClassVar[str]
    linear: ClassVar[bool] = False
    needs_seed: ClassVar[bool] = False
    stateful_client: ClassVar[bool] = False
    stateful_server: ClassVar[bool] = False

    @property
    def spec(self) -> str:
        """Canonical spec-string token of this stage."""
        args = self._spec_args()
        return f"{self.name}({','.join(args)})" if args else self.name

    def _spec_args(self) -> list[str]:
        return []

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stage) and type(self) is type(other) and self.spec == other.spec

    def __hash__(self) -> int:
        return hash((type(self), self.spec))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"


# --------------------------------------------------------------------------- sparsifiers


def _check_amount(amount: float | int, stage: str) -> float | int:
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise CodecSpecError(f"{stage}: amount must be a fraction or a count, got {amount!r}")
    if isinstance(amount, int):
        if amount < 1:
            raise CodecSpecError(f"{stage}: count must be >= 1, got {amount}")
    elif not (0.0 < amount <= 1.0):
        raise CodecSpecError(f"{stage}: fraction must be in (0, 1], got {amount!r}")
    return amount


def resolve_k(amount: float | int, n: int) -> int:
    """Number of coordinates kept out of ``n``: a count is capped at ``n``; a fraction
    keeps ``round(F*n)`` but at least one coordinate of a non-empty vector."""
    if n == 0:
        return 0
    if isinstance(amount, int):
        return min(amount, n)
    return min(n, max(1, round(amount * n)))


class Sparsifier(Stage):
    """Chooses the positions (in the flat update) whose values are sent."""

    role: ClassVar[Role] = "sparsify"
    #: whether positions travel in the payload (random-k derives them from the seed)
    sends_positions: ClassVar[bool] = True

    @abstractmethod
    def select(self, v: np.ndarray, layout: Layout, seed: int | None) -> np.ndarray:
        """Sorted ``int64`` positions to keep."""

    def expected_counts(self, layout: Layout) -> np.ndarray | None:
        """Per-tensor counts a valid payload must have (``None`` if data-dependent)."""
        return None

    def write(self, positions: np.ndarray, layout: Layout, w: Writer) -> None:
        w.u64(positions.size)
        w.raw(encode_positions(positions, layout.d))

    def read(self, r: Reader, layout: Layout, seed: int | None, max_k: int) -> np.ndarray:
        """Read the positions; ``max_k`` bounds their number by the bytes left for values."""
        d = layout.d
        k = r.u64()
        if k > min(d, max_k):
            raise PayloadError(f"{self.spec}: {k} positions impossible for this payload")
        positions = decode_positions(r, d, k)
        counts = self.expected_counts(layout)
        if counts is not None:
            got = np.diff(np.searchsorted(positions, layout.offsets))
            if not np.array_equal(got, counts):
                raise PayloadError(f"{self.spec}: payload keeps the wrong number of positions")
        return positions


class _AmountSparsifier(Sparsifier):
    def __init__(self, amount: float | int) -> None:
        self.amount = _check_amount(amount, self.name)

    def _spec_args(self) -> list[str]:
        return [_fmt(self.amount)]


def _top_positions(a: np.ndarray, k: int) -> np.ndarray:
    """Sorted positions of the ``k`` largest entries of ``a`` (ties broken arbitrarily)."""
    n = a.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(a, n - k)[n - k :]
    return np.sort(part).astype(np.int64)


class TopK(_AmountSparsifier):
    """``topk(F)``: the ``k`` largest magnitudes over all tensors together."""

    name = "topk"

    def select(self, v: np.ndarray, layout: Layout, seed: int | None) -> np.ndarray:
        return _top_positions(np.abs(v), resolve_k(self.amount, v.size))

    def expected_counts(self, layout: Layout) -> np.ndarray | None:
        return None  # split between tensors is data-dependent; the total is checked below

    def read(self, r: Reader, layout: Layout, seed: int | None, max_k: int) -> np.ndarray:
        positions = super().read(r, layout, seed, max_k)
        if positions.size != resolve_k(self.amount, layout.d):
            raise PayloadError(f"{self.spec}: payload keeps {positions.size} positions")
        return positions


class TopKPerTensor(_AmountSparsifier):
    """``topk_pt(F)``: the largest magnitudes of each tensor separately (``F`` per tensor)."""

    name = "topk_pt"

    def select(self, v: np.ndarray, layout: Layout, seed: int | None) -> np.ndarray:
        offsets = layout.offsets
        parts = [
            _top_positions(np.abs(v[lo:hi]), resolve_k(self.amount, int(hi - lo))) + lo
            for lo, hi in itertools.pairwise(offsets)
        ]
        return np.concatenate([np.zeros(0, dtype=np.int64), *parts])

    def expected_counts(self, layout: Layout) -> np.ndarray | None:
        return np.array([resolve_k(self.amount, int(n)) for n in layout.sizes], dtype=np.int64)


class RandomK(_AmountSparsifier):
    """``randk(F)``: ``k`` positions drawn from the shared round seed; no indices are sent.

    Values are sent unscaled (a contractive compressor, meant to be used with error
    feedback). Linear: clients with the same seed keep the same positions, so encoded
    updates can be summed position by position.
    """

    name = "randk"
    linear = True
    needs_seed = True
    sends_positions = False

    def select(self, v: np.ndarray, layout: Layout, seed: int | None) -> np.ndarray:
        if seed is None:
            raise CodecError("randk needs the shared round seed")
        return random_k_indices(v.size, resolve_k(self.amount, v.size), seed)

    def write(self, positions: np.ndarray, layout: Layout, w: Writer) -> None:
        return None

    def read(self, r: Reader, layout: Layout, seed: int | None, max_k: int) -> np.ndarray:
        if seed is None:
            raise CodecError("randk needs the shared round seed to decode")
        k = resolve_k(self.amount, layout.d)
        if k > max_k:
            raise PayloadError(f"{self.spec}: payload too short for {k} values")
        return random_k_indices(layout.d, k, seed)


class Sketch(_AmountSparsifier):
    """``sketch(F)`` or ``sketch(F, rows=R, k=K, momentum=M, gain=G)``: FetchSGD's count sketch.

    A secure-aggregation encoding (see :mod:`fedsqueeze.compression.sketch`): each client sends
    a ``R x (F d / R)`` count sketch of its update (``F d`` cells in all, F a fraction of d or a
    count of cells), secure aggregation sums the sketches, and the server keeps momentum ``M``
    and error in sketch space and applies the ``K`` heaviest coordinates per round, scaled so
    that the step is at most ``G`` times the minimum-norm step the sketch allows. Defaults:
    ``R`` = :data:`~fedsqueeze.compression.sketch.DEFAULT_ROWS`, ``K`` =
    :func:`~fedsqueeze.compression.sketch.default_k`, ``M`` = 0, ``G`` =
    :data:`~fedsqueeze.compression.sketch.MAX_GAIN`. Linear and stateless on
    clients. It has no per-client payload: a plain (non-secure) codec refuses to encode with it.
    """

    name = "sketch"
    linear = True
    needs_seed = True
    stateful_server = True

    def __init__(
        self,
        amount: float | int,
        rows: int | None = None,
        k: int | None = None,
        momentum: float | None = None,
        gain: float | None = None,
    ) -> None:
        super().__init__(amount)
        for what, value in (("rows", rows), ("k", k)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise CodecSpecError(f"sketch: {what} must be an integer >= 1, got {value!r}")
        if momentum is not None and not (
            isinstance(momentum, int | float)
            and not isinstance(momentum, bool)
            and 0.0 <= momentum < 1.0
        ):
            raise CodecSpecError(f"sketch: momentum must be in [0, 1), got {momentum!r}")
        if gain is not None and not (
            isinstance(gain, int | float)
            and not isinstance(gain, bool)
            and math.isfinite(gain)
            and gain >= 1.0
        ):
            raise CodecSpecError(f"sketch: gain must be a finite number >= 1, got {gain!r}")
        self.rows, self.k = rows, k
        self.momentum = None if momentum is None else float(momentum)
        self.gain = None if gain is None else float(gain)

    def _spec_args(self) -> list[str]:
        args = super()._spec_args()
        for key in ("rows", "k", "momentum", "gain"):
            value = getattr(self, key)
            if value is not None:
                args.append(f"{key}={_fmt(value)}")
        return args

    def select(self, v: np.ndarray, layout: Layout, seed: int | None) -> np.ndarray:
        raise CodecError(
            f"{self.spec} is a secure-aggregation encoding (the server unsketches the sum of "
            "all clients' sketches); use it with secagg = true"
        )

    def read(self, r: Reader, layout: Layout, seed: int | None, max_k: int) -> np.ndarray:
        return self.select(np.zeros(0), layout, seed)  # raises: there is no payload to read


class Threshold(Sparsifier):
    """``thresh(T)``: keep coordinates with ``|x| >= T``."""

    name = "thresh"

    def __init__(self, threshold: float) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise CodecSpecError(f"thresh: threshold must be a number, got {threshold!r}")
        if not (math.isfinite(threshold) and threshold >= 0):
            raise CodecSpecError(f"thresh: threshold must be finite and >= 0, got {threshold}")
        self.threshold = float(threshold)

    def _spec_args(self) -> list[str]:
        return [repr(self.threshold)]

    def select(self, v: np.ndarray, layout: Layout, seed: int | None) -> np.ndarray:
        return np.flatnonzero(np.abs(v) >= np.float32(self.threshold)).astype(np.int64)


# ------------------------------------------------------------------------------ rotation


class Hadamard(Stage):
    """``hadamard`` or ``hadamard(block=N)``: shared-seed block-wise randomized Hadamard
    rotation, followed by an unbiased ``qB`` in a field of ``B + ceil(log2 n)`` bits.

    A secure-aggregation encoding (:class:`~fedsqueeze.contracts.summable.HadamardQuantSum`):
    every client rotates its clipped update with the round's shared seed
    (:class:`~fedsqueeze.compression.hadamard.BlockHadamard`, blocks of ``N`` coordinates, a
    power of two; default :func:`~fedsqueeze.compression.hadamard.auto_block`, which pads only
    the last block), rounds each rotated coordinate without bias to ``2**B`` levels and the
    secure sum of ``n`` clients fits ``B + ceil(log2 n)`` bits; the server inverse-rotates the
    sum. Linear, stateless. It needs a ``qB`` after it and has no plain (non-secure) payload.
    """

    role: ClassVar[Role] = "rotate"
    name = "hadamard"
    linear = True
    needs_seed = True

    def __init__(self, block: int | None = None) -> None:
        if block is not None and (
            isinstance(block, bool)
            or not isinstance(block, int)
            or block < 1
            or block & (block - 1)
        ):
            raise CodecSpecError(f"hadamard: block must be a power of two, got {block!r}")
        self.block = block

    def _spec_args(self) -> list[str]:
        return [f"block={self.block}"] if self.block is not None else []


# ---------------------------------------------------------------------------- quantizers


def group_starts(
    counts: np.ndarray, mode: Literal["tensor", "global"], block: int | None
) -> np.ndarray:
    """Start offsets of the scaling groups of the kept values.

    ``counts`` holds the number of kept values of each tensor. Groups never cross a
    tensor boundary except in ``"global"`` mode; with ``block`` each tensor's values are
    cut into blocks of that many values. Empty groups are never produced, so the
    starts are strictly increasing and valid for ``numpy.ufunc.reduceat``.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    if mode == "global":
        return np.zeros(1, dtype=np.int64)
    seg_start: np.ndarray = (np.cumsum(counts) - counts)[counts > 0]
    seg_count = counts[counts > 0]
    if block is None:
        return seg_start
    n_blocks = -(-seg_count // block)
    first_block = np.cumsum(n_blocks) - n_blocks
    idx = np.arange(int(n_blocks.sum()), dtype=np.int64)
    within = idx - np.repeat(first_block, n_blocks)
    starts: np.ndarray = np.repeat(seg_start, n_blocks) + within * block
    return starts


def _lengths(starts: np.ndarray, total: int) -> np.ndarray:
    return np.diff(np.append(starts, total))


class ValueCoder(Stage):
    """Codes the kept values (float32 vector) into a byte section and back."""

    role: ClassVar[Role] = "quantize"
    integer_output: ClassVar[bool] = False
    #: bits per value on the wire
    bits: int = 32
    #: how values are grouped for scaling
    grouping: Literal["tensor", "global"] = "tensor"
    block: int | None = None

    @abstractmethod
    def encode(
        self, values: np.ndarray, starts: np.ndarray, w: Writer, rng: np.random.Generator
    ) -> None:
        """Append the coded ``values`` to ``w``; ``starts`` are the scaling groups."""

    @abstractmethod
    def decode(self, r: Reader, count: int, starts: np.ndarray) -> np.ndarray:
        """Read ``count`` values back as float32 (the same groups as at encode time)."""

    def max_section_size(self, count: int) -> int:
        """Upper bound of the section size, for bounding decompression."""
        return 8 * count + packed_size(count, self.bits) + 8


class Float32(ValueCoder):
    """``fp32``: plain float32 values (the default; lossless)."""

    name = "fp32"
    linear = True

    def encode(
        self, values: np.ndarray, starts: np.ndarray, w: Writer, rng: np.random.Generator
    ) -> None:
        w.f32_array(values)

    def decode(self, r: Reader, count: int, starts: np.ndarray) -> np.ndarray:
        return r.f32_array(count)


class Float16(ValueCoder):
    """``fp16``: IEEE half precision (round to nearest). Values beyond ±65504 are an error."""

    name = "fp16"
    bits = 16

    def encode(
        self, values: np.ndarray, starts: np.ndarray, w: Writer, rng: np.random.Generator
    ) -> None:
        with np.errstate(over="ignore"):
            half = values.astype("<f2")
        if not np.all(np.isfinite(half)):
            raise CodecError("fp16: update has values outside the float16 range (±65504)")
        w.raw(half.tobytes())

    def decode(self, r: Reader, count: int, starts: np.ndarray) -> np.ndarray:
        return np.frombuffer(r.take(2 * count), dtype="<f2").astype(np.float32)


class BFloat16(ValueCoder):
    """``bf16``: bfloat16 (float32 with the low 16 mantissa bits rounded to nearest even)."""

    name = "bf16"
    bits = 16

    def encode(
        self, values: np.ndarray, starts: np.ndarray, w: Writer, rng: np.random.Generator
    ) -> None:
        u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounded = (u + (((u >> 16) & 1) + np.uint32(0x7FFF))) >> 16
        top = rounded.astype("<u2")
        if np.any((top & 0x7F80) == 0x7F80):
            raise CodecError("bf16: update has values outside the bfloat16 range")
        w.raw(top.tobytes())

    def decode(self, r: Reader, count: int, starts: np.ndarray) -> np.ndarray:
        top = r.u16_array(count).astype(np.uint32)
        return (top << 16).view(np.float32)


def _check_bits(bits: int, name: str, lo: int = 1, hi: int = 16) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise CodecSpecError(f"{name}: bits must be an integer in {lo}..{hi}, got {bits!r}")
    return bits


def _check_block(block: int | None, name: str) -> int | None:
    if block is None:
        return None
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise CodecSpecError(f"{name}: block must be an integer >= 1, got {block!r}")
    return block


class _Scaled(ValueCoder):
    """Shared plumbing of quantizers with per-group float32 parameters."""

    integer_output = True
    n_params: ClassVar[int] = 1

    def _spec_args(self) -> list[str]:
        return [f"block={self.block}"] if self.block is not None else []

    def max_section_size(self, count: int) -> int:
        return 4 * self.n_params * count + packed_size(count, self.bits) + 8

    def _read_params(self, r: Reader, starts: np.ndarray) -> np.ndarray:
        params = r.f32_array(self.n_params * starts.size).reshape(starts.size, self.n_params)
        if not np.all(np.isfinite(params)):
            raise PayloadError(f"{self.spec}: non-finite scale in payload")
        return params

    def _read_codes(self, r: Reader, count: int) -> np.ndarray:
        return unpack_bits(r.take(packed_size(count, self.bits)), self.bits, count)


class Quantize(_Scaled):
    """``qB``: unbiased stochastic uniform quantization to ``2**B`` levels.

    Each group (a tensor, or a block of ``block`` values) is mapped onto the levels
    ``lo + j*(hi-lo)/(2**B-1)`` between its min and max, rounding up or down at random
    with the probabilities that make the result unbiased.
    """

    n_params = 2

    def __init__(self, bits: int, block: int | None = None) -> None:
        self.bits = _check_bits(bits, "qB")
        self.block = _check_block(block, "qB")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"q{self.bits}"

    def encode(
        self, values: np.ndarray, starts: np.ndarray, w: Writer, rng: np.random.Generator
    ) -> None:
        if values.size == 0:
            return
        levels = (1 << self.bits) - 1
        lo = np.minimum.reduceat(values, starts)
        hi = np.maximum.reduceat(values, starts)
        with np.errstate(over="ignore", invalid="ignore"):
            step = (hi - lo) / np.float32(levels)
            if not np.all(np.isfinite(step)):
                raise CodecError(f"{self.spec}: value range too large for float32")
            inv = np.divide(1, step, out=np.zeros_like(step), where=step > 0)
        lengths = _lengths(starts, values.size)
        t = (values - np.repeat(lo, lengths)) * np.repeat(inv, lengths)
        q = np.clip(stochastic_round(t, rng), 0, levels)
        w.f32_array(np.stack([lo, hi], axis=1))
        w.raw(pack_bits(q, self.bits))

    def decode(self, r: Reader, count: int, starts: np.ndarray) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=np.float32)
        params = self._read_params(r, starts)
        lo, hi = params[:, 0], params[:, 1]
        if np.any(hi < lo):
            raise PayloadError(f"{self.spec}: group maximum below its minimum")
        q = self._read_codes(r, count).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            step = (hi - lo) / np.float32((1 << self.bits) - 1)
            lengths = _lengths(starts, count)
            values: np.ndarray = np.repeat(lo, lengths) + q * np.repeat(step, lengths)
            return values


class QSGD(_Scaled):
    """``qsgdB``: QSGD (Alistarh et al., 2017) with ``s = 2**B - 1`` levels.

    Per group: the L2 norm, then ``|x|/norm * s`` stochastically rounded to an integer
    level in ``0..s`` and the sign bit, packed together at ``B + 1`` bits. Unbiased.
    """

    n_params = 1

    def __init__(self, bits: int, block: int | None = None) -> None:
        self.level_bits = _check_bits(bits, "qsgdB")
        self.bits = self.level_bits + 1
        self.block = _check_block(block, "qsgdB")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"qsgd{self.level_bits}"

    def encode(
        self, values: np.ndarray, starts: np.ndarray, w: Writer, rng: np.random.Generator
    ) -> None:
        if values.size == 0:
            return
        s = (1 << self.level_bits) - 1
        sq = values.astype(np.float64)
        np.square(sq, out=sq)
        norm = np.sqrt(np.add.reduceat(sq, starts)).astype(np.float32)
        del sq
        if not np.all(np.isfinite(norm)):
            raise CodecError(f"{self.spec}: update norm overflows float32")
        scale = np.divide(np.float32(s), norm, out=np.zeros_like(norm), where=norm > 0)
        t = np.abs(values) * np.repeat(scale, _lengths(starts, values.size))
        level = np.clip(stochastic_round(t, rng), 0, s)
        code = (level << 1) | (values < 0)
        w.f32_array(norm)
        w.raw(pack_bits(code, self.bits))

    def decode(self, r: Reader, count: int, starts: np.ndarray) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=np.float32)
        norm = self._read_params(r, starts)[:, 0]
        if np.any(norm < 0):
            raise PayloadError(f"{self.spec}: negative norm")
        code = self._read_codes(r, count)
        s = np.float32((1 << self.level_bits) - 1)
        level = (code >> np.uint64(1)).astype(np.float32)
        sign = np.where(code & np.uint64(1), np.float32(-1), np.float32(1))
        with np.errstate(over="ignore", invalid="ignore"):
            return sign * np.repeat(norm / s, _lengths(starts, count)) * level


class Sign(_Scaled):
    """``sign``: one bit per value, scaled by the group's mean magnitude (biased;
    pair it with error feedback, as in EF-SignSGD)."""

    name = "sign"
    bits = 1

    def __init__(self, block: int | None = None) -> None:
        self.block = _check_block(block, "sign")

    def encode(
        self, values: np.ndarray, starts: np.ndarray, w: Writer, rng: np.random.Generator
    ) -> None:
        if values.size == 0:
            return
        lengths = _lengths(starts, values.size)
        mean_abs = (np.add.reduceat(np.abs(values).astype(np.float64), starts) / lengths).astype(
            np.float32
        )
        w.f32_array(mean_abs)
        w.raw(pack_bits(values < 0, 1))

    def decode(self, r: Reader, count: int, starts: np.ndarray) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=np.float32)
        scale = self._read_params(r, starts)[:, 0]
        if np.any(scale < 0):
            raise PayloadError(f"{self.spec}: negative scale")
        negative = self._read_codes(r, count).astype(bool)
        mags = np.repeat(scale, _lengths(starts, count))
        return np.where(negative, -mags, mags)


class Ternary(Sign):
    """``ternary``: Sparse Ternary Compression (Sattler et al., 2019).

    After a sparsifier, every kept value becomes ``±mu`` with ``mu`` the mean magnitude
    of all kept values (one ``mu`` for the whole update); dropped values are 0.
    """

    name = "ternary"
    grouping = "global"

    def __init__(self) -> None:
        self.block = None


# ------------------------------------------------------------------------ error feedback


class Feedback(Stage):
    """Error feedback wraps the whole lossy chain (see :class:`~.Codec`)."""

    role: ClassVar[Role] = "feedback"
    stateful_client = True
    state_key: ClassVar[str]


class ErrorFeedback(Feedback):
    """``ef``: classic error feedback (Seide et al. 2014; Karimireddy et al. 2019).

    The client compresses ``delta + e`` and keeps ``e <- (delta + e) - sent``; the server
    side is unchanged, so the stage is linear.
    """

    name = "ef"
    linear = True
    state_key = "ef.residual"


class EF21(Feedback):
    """``ef21``: EF21 (Richtárik et al., 2021).

    The client keeps ``g``, sends ``c = C(delta - g)`` and sets ``g <- g + c``; the server
    keeps the same ``g`` for that client and reconstructs ``g + c``. Not linear: the
    server needs each client's own ``g``.
    """

    name = "ef21"
    stateful_server = True
    state_key = "ef21.g"


# ----------------------------------------------------------------------------- lossless


class Lossless(Stage):
    """Compresses the final body bytes."""

    role: ClassVar[Role] = "lossless"
    linear = True
    default_level: ClassVar[int]
    min_level: ClassVar[int]
    max_level: ClassVar[int]

    def __init__(self, level: int | None = None) -> None:
        level = self.default_level if level is None else level
        if isinstance(level, bool) or not isinstance(level, int):
            raise CodecSpecError(f"{self.name}: level must be an integer, got {level!r}")
        if not self.min_level <= level <= self.max_level:
            raise CodecSpecError(
                f"{self.name}: level must be in {self.min_level}..{self.max_level}, got {level}"
            )
        self.level = level

    def _spec_args(self) -> list[str]:
        return [] if self.level == self.default_level else [str(self.level)]

    @abstractmethod
    def compress(self, data: bytes) -> bytes: ...

    @abstractmethod
    def decompress(self, data: bytes | memoryview, size: int) -> bytes:
        """Decompress to exactly ``size`` bytes, never producing more."""


class Zstd(Lossless):
    """``zstd(level)``: Zstandard (default level 3)."""

    name = "zstd"
    default_level = 3
    min_level = 1
    max_level = 22

    def compress(self, data: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=self.level).compress(data)

    def decompress(self, data: bytes | memoryview, size: int) -> bytes:
        try:
            with zstandard.ZstdDecompressor().stream_reader(bytes(data)) as reader:
                out = reader.read(size + 1)
                # stream_reader.read may return less than asked before the end.
                chunks = [out]
                got = len(out)
                while got <= size:
                    more = reader.read(size + 1 - got)
                    if not more:
                        break
                    chunks.append(more)
                    got += len(more)
        except zstandard.ZstdError as exc:
            raise PayloadError(f"zstd: corrupt body ({exc})") from exc
        result = b"".join(chunks)
        if len(result) != size:
            raise PayloadError(f"zstd: body decompresses to {len(result)}+ bytes, not {size}")
        return result


class Zlib(Lossless):
    """``zlib(level)``: DEFLATE via the standard library (default level 6)."""

    name = "zlib"
    default_level = 6
    min_level = 0
    max_level = 9

    def compress(self, data: bytes) -> bytes:
        return zlib.compress(data, self.level)

    def decompress(self, data: bytes | memoryview, size: int) -> bytes:
        dec = zlib.decompressobj()
        try:
            out = dec.decompress(bytes(data), size + 1)
        except zlib.error as exc:
            raise PayloadError(f"zlib: corrupt body ({exc})") from exc
        if len(out) != size or not dec.eof or dec.unconsumed_tail or dec.unused_data:
            raise PayloadError("zlib: body does not decompress to the declared size")
        return out
