"""Block-wise randomized Hadamard rotation with a shared seed (numpy only).

``x ↦ R x`` with ``R = diag(H_B D_1, ..., H_B D_m) / sqrt(B)``: the flat vector (length d) is
zero-padded to ``m = ceil(d / B)`` blocks of one power-of-two size ``B`` and every block is
rotated by its own seeded ±1 diagonal and the Walsh–Hadamard matrix. ``R`` is orthonormal on
the padded space (block-diagonal with orthonormal blocks), so it keeps every L2 norm exactly
and is linear: the rotation of a sum is the sum of the rotations, which is what secure
aggregation needs. After it, a coordinate of block j is sub-Gaussian with variance proxy
``‖x_j‖² / B ≤ ‖x‖² / B`` — the worst case (all the mass in one block) is what integer
ranges must be sized for, so they use ``B``, not ``d``.

Why blocks: a single rotation pads d to the next power of two, up to 2x more coordinates to
round, noise and send (17,226 parameters → 32,768). Equal blocks of size B pad only the last
block, by fewer than B coordinates; :func:`auto_block` picks the largest B whose padding is at
most 1/32 of d, and never below :data:`MIN_BLOCK` (so the worst-case spread stays ≥ 1/16 of
the norm per coordinate). Blocks of *different* power-of-two sizes could cover d exactly, but
their smallest block (down to 1 coordinate) would spread nothing: one block size keeps one
worst case.

``permute=True`` first shuffles the d coordinates with a permutation drawn from the same seed
(another stream of it), so that every block holds a uniform sample of the whole vector: a
block's norm is then about ``‖x‖ sqrt(B / d)`` whatever the layout (one layer's coordinates
no longer share a block), and a rotated coordinate is about N(0, ‖x‖² / padded_dim) — what
an encoding that sizes its integers for the typical vector rather than the worst case
(:class:`~fedsqueeze.contracts.summable.HadamardQuantSum`) relies on. Still orthonormal and
linear.
"""

from __future__ import annotations

import math

import numpy as np

from fedsqueeze.compression.errors import CodecError

__all__ = [
    "MIN_BLOCK",
    "BlockHadamard",
    "auto_block",
    "fwht",
    "next_power_of_two",
    "padded_length",
    "resolve_block",
]

MIN_BLOCK = 256
"""Smallest block :func:`auto_block` chooses (for d above it)."""

MAX_PADDING = 1 / 32
"""Padding :func:`auto_block` accepts, as a fraction of d."""


def next_power_of_two(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    if n < 1:
        raise CodecError(f"dimension must be >= 1, got {n}")
    return 1 << (int(n) - 1).bit_length()


def fwht(x: np.ndarray) -> np.ndarray:
    """Unnormalized fast Walsh–Hadamard transform along the last axis (length a power of 2).

    log2(n) butterfly stages, each one vectorized reshape: O(n log n) work, no Python loop
    over coordinates.
    """
    n = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(*lead, n).copy()
    h = 1
    while h < n:
        blocks = y.reshape(*lead, n // (2 * h), 2, h)
        a = blocks[..., 0, :]
        b = blocks[..., 1, :]
        y = np.stack((a + b, a - b), axis=-2).reshape(*lead, n)
        h *= 2
    return y


def padded_length(dim: int, block: int) -> int:
    """``ceil(dim / block) * block``."""
    return -(-int(dim) // int(block)) * int(block)


def auto_block(dim: int) -> int:
    """The block size for a ``dim``-long vector (see the module docstring).

    ``next_power_of_two(dim)`` (one block) when ``dim <= MIN_BLOCK``; otherwise the largest
    power of two ``B >= MIN_BLOCK`` that pads at most ``MAX_PADDING * dim`` coordinates, or,
    if none does, the ``B >= MIN_BLOCK`` that pads least (the largest on a tie).
    """
    full = next_power_of_two(dim)
    if dim <= MIN_BLOCK:
        return full
    candidates = []
    b = full
    while b >= MIN_BLOCK:
        candidates.append(b)
        b //= 2
    for b in candidates:  # largest first
        if padded_length(dim, b) - dim <= MAX_PADDING * dim:
            return b
    return min(candidates, key=lambda c: (padded_length(dim, c), -c))


def resolve_block(dim: int, block: int | None) -> int:
    """The block size a :class:`BlockHadamard` of ``dim`` with ``block`` uses (None/0 = auto;
    never more than ``next_power_of_two(dim)``)."""
    if block is None or block == 0:
        return auto_block(dim)
    block = _check_int("block", block, 1)
    if block & (block - 1):
        raise CodecError(f"block must be a power of two, got {block}")
    return min(block, next_power_of_two(dim))


def _check_int(name: str, value: int, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
        raise CodecError(f"{name} must be an int >= {lo}, got {value!r}")
    return int(value)


class BlockHadamard:
    """Orthonormal block-diagonal random rotation (see the module docstring).

    Parameters
    ----------
    dim
        Length d of the vectors to rotate.
    seed
        Seed of the ±1 diagonals (non-negative int; the same on every party).
    block
        Block size B, a power of two; ``None`` = :func:`auto_block`. ``block >=
        next_power_of_two(dim)`` is the classic single rotation padded to a power of two.
    permute
        Shuffle the coordinates (seeded) before blocking (see the module docstring).
    """

    def __init__(
        self, dim: int, seed: int, block: int | None = None, *, permute: bool = False
    ) -> None:
        self.dim = _check_int("dim", dim, 1)
        seed = _check_int("seed", seed, 0)
        self.block = resolve_block(self.dim, block)
        self.padded_dim = padded_length(self.dim, self.block)
        self.num_blocks = self.padded_dim // self.block
        rng = np.random.default_rng(seed)
        self.signs = rng.integers(0, 2, size=self.padded_dim, dtype=np.int8) * 2 - 1
        self._norm = 1.0 / math.sqrt(self.block)
        # A separate stream of the seed, so the signs are those of permute=False.
        self.permutation: np.ndarray | None = (
            np.random.default_rng([seed, 1]).permutation(self.dim) if permute else None
        )

    def _blocks(self, y: np.ndarray) -> np.ndarray:
        return y.reshape(*y.shape[:-1], self.num_blocks, self.block)

    def rotate(self, x: np.ndarray) -> np.ndarray:
        """Pad the last axis from ``dim`` to ``padded_dim`` and rotate; float64 result."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise CodecError(f"expected last axis of length {self.dim}, got shape {np.shape(x)}")
        padded = np.zeros((*x.shape[:-1], self.padded_dim), dtype=np.float64)
        padded[..., : self.dim] = x if self.permutation is None else x[..., self.permutation]
        out = fwht(self._blocks(padded * self.signs)) * self._norm
        return out.reshape(padded.shape)

    def unrotate(self, y: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`rotate` (per block D H y / sqrt(B)), cropped back to ``dim``."""
        y = np.asarray(y, dtype=np.float64)
        if y.ndim == 0 or y.shape[-1] != self.padded_dim:
            raise CodecError(
                f"expected last axis of length {self.padded_dim}, got shape {np.shape(y)}"
            )
        # H is symmetric with H @ H = B I, so (H D / sqrt(B))^-1 = D H / sqrt(B).
        out = (fwht(self._blocks(y)) * self._norm).reshape(y.shape) * self.signs
        if self.permutation is None:
            return out[..., : self.dim]
        x = np.empty((*y.shape[:-1], self.dim), dtype=np.float64)
        x[..., self.permutation] = out[..., : self.dim]
        return x
