"""Count sketch (Charikar et al. 2002) and FetchSGD's server-side unsketching (numpy only).

FetchSGD (Rothchild et al., ICML 2020) compresses each client's update ``x`` (length d) into a
``rows x cols`` table ``S(x)``: row ``r`` adds ``s_r(i) * x_i`` to cell ``h_r(i)``, with
bucket hashes ``h_r`` and ±1 signs ``s_r`` every party derives from one shared seed. ``S`` is
linear — ``S(a) + S(b) == S(a + b)`` — so secure aggregation can sum the clients' tables and
the server learns only ``S(sum of updates)``. The sketch keeps no client state, so clients
that skip rounds lose nothing.

The server (:class:`SketchAccumulator`) keeps momentum ``u`` and error ``e`` *in sketch space*
(linearity again: a sketch of a sum is the sum of sketches)::

    u <- momentum * u + S(mean update)
    e <- e + u
    est_i = median_r s_r(i) * e[r, h_r(i)]            (count-sketch estimate of coordinate i)
    step  = the k coordinates of largest |est|, with their estimated values (times a scale)
    e, u <- 0 on the cells S(step) touches             (FetchSGD's error reset, momentum masking)

and applies the k-sparse ``step`` to the global model. What it does not apply stays in ``e``
and is recovered once it is heavy enough. This is FetchSGD's one-round variant: the values
come from the sketch itself (no second round trip to ask clients for exact values).
Subtracting ``S(step)`` from ``e`` instead of clearing the cells would keep the mass of
light coordinates that share a cell with an applied one, but where an estimate is off it
leaves ``cell - estimate`` in the other rows; on digits/``mlp`` that diverged within a few
rounds, clearing did not.

Step scale (why ``sketch(0.02)`` diverged): with one row, the estimate of every coordinate
in cell c is ``s(i) * e_c``, so applying a whole cell copies its value onto each of the
``m = d / cols`` coordinates hashed there. That step is unbiased (``E[S^T S x] = x``) and lies
in the ``F d``-dimensional span of the sketch's cells, but it is ``m`` times the minimum-norm
step consistent with the sketch (``s(i) e_c / m``, the projection onto that span). On a
quadratic with curvature ``lam`` and a client update ``x = -eta g``, a step ``G`` times the
projection gains ``G F eta |g|^2`` to first order and costs ``G^2 F lam eta^2 |g|^2 / 2``:
it is stable while ``G eta lam < 2`` — a bound on the gain ``G`` that does not depend on F.
The unbiased step has ``G = m = 1 / F``, so shrinking the sketch eventually breaks it: on
digits/``mlp`` ``F = 0.05`` (G = 20) matched fp32 and ``F = 0.02`` (G = 50) diverged. The
server therefore scales the step by ``min(1, MAX_GAIN * cells / d)``: unchanged where the
unbiased gain is at most :data:`MAX_GAIN` (``F >= 0.05``, all configurations measured before),
capped at :data:`MAX_GAIN` below it.

The hashes are fixed for a run: errors accumulated over rounds only add up if every round is
sketched with the same ``h`` and ``s``. They are public (derived from the run seed): they hide
nothing and need not; what secure aggregation protects is the clients' tables.

Hashes use only the raw output of NumPy's PCG64 bit generator (stable across NumPy versions,
like :func:`~fedsqueeze.compression.sampling.random_k_indices`), so clients and server running
different NumPy versions still build the same sketch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedsqueeze.compression.errors import CodecError, PayloadError

__all__ = [
    "DEFAULT_K_PER_CELL",
    "DEFAULT_ROWS",
    "MAX_GAIN",
    "CountSketch",
    "SketchAccumulator",
    "default_k",
    "sketch_shape",
]

DEFAULT_ROWS = 1
"""Rows of a sketch unless told otherwise. FetchSGD uses 5 (a median over rows makes
heavy-hitter estimates robust); on digits/``mlp`` at ``sketch(0.05)`` 1, 3 and 5 rows learned
alike once ``k`` was large, and one row has the most columns (simulations/README.md)."""

DEFAULT_K_PER_CELL = 8
"""Coordinates applied per round unless told otherwise: this many per cell (capped at d).
Small ``k`` (a column's worth, FetchSGD's regime for huge sketches) barely learned on
digits/``mlp``; 4–8 per cell and ``k = d`` all matched fp32 (simulations/README.md)."""

MAX_GAIN = 20.0
"""Largest multiple of the minimum-norm (projection) step the server applies (see the module
docstring): ``1 / F`` for the unbiased step at ``F = 0.05``, which matched fp32 on digits/``mlp``
where ``F = 0.02`` (50) diverged. At ``F = 0.02`` there (one seed, 20 rounds) gain 10 reached
0.82, 20 0.93, 30 0.89, 50 0.10. The stable gain depends on the model's curvature, not on F:
on the ~10x wider ``mlp-wide`` gain 50 at ``F = 0.02`` learned, and faster than 20, while
gain 100 at ``F = 0.01`` ended 7 pp below 20 (simulations/README.md). ``sketch(F, gain=G)``
raises the cap where it is known to be safe."""

_MAX_CELLS = 1 << 28


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
        raise CodecError(f"{name} must be an int >= {lo}, got {value!r}")
    return int(value)


def sketch_shape(dim: int, amount: float | int, rows: int = DEFAULT_ROWS) -> tuple[int, int]:
    """``(rows, cols)`` of a sketch of ``amount`` cells in all: a fraction F of ``dim`` (F·d
    cells) or a count; at least one column per row, ``rows`` capped so that each row has
    at least one column."""
    dim = _check_int("dim", dim, 1)
    rows = _check_int("rows", rows, 1)
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise CodecError(f"sketch size must be a fraction or a count, got {amount!r}")
    cells = int(amount) if isinstance(amount, int) else round(float(amount) * dim)
    if cells < 1:
        raise CodecError(f"sketch size {amount!r} of {dim} parameters leaves no cell")
    return rows, max(1, cells // rows)


def default_k(dim: int, rows: int, cols: int) -> int:
    """``min(dim, DEFAULT_K_PER_CELL * rows * cols)``."""
    return min(int(dim), DEFAULT_K_PER_CELL * int(rows) * int(cols))


class CountSketch:
    """The shared linear map ``x -> S(x)`` of a ``dim``-long vector into ``rows x cols`` cells.

    Parameters
    ----------
    dim
        Length d of the sketched vectors.
    rows, cols
        Table shape; ``rows * cols`` numbers travel instead of ``dim``.
    seed
        Seed of the bucket hashes and signs (non-negative int; the same on every party).
    """

    def __init__(self, dim: int, rows: int, cols: int, seed: int) -> None:
        self.dim = _check_int("dim", dim, 1)
        self.rows = _check_int("rows", rows, 1)
        self.cols = _check_int("cols", cols, 1)
        self.seed = _check_int("seed", seed, 0)
        if self.rows * self.cols > _MAX_CELLS or self.rows * self.dim > _MAX_CELLS:
            raise CodecError(f"sketch of {self.rows} x {self.cols} cells for d={dim} is too big")
        raw = np.random.PCG64(self.seed).random_raw(self.rows * self.dim)
        raw = raw.reshape(self.rows, self.dim)
        # Bit 0 is the sign, the other 63 bits the bucket: the modulo bias is cols / 2^63.
        self.signs = (raw & np.uint64(1)).astype(np.int8) * 2 - 1
        buckets = ((raw >> np.uint64(1)) % np.uint64(self.cols)).astype(np.int64)
        #: flat cell index of coordinate i in row r: ``r * cols + h_r(i)``
        self.cells = buckets + (np.arange(self.rows, dtype=np.int64) * self.cols)[:, None]

    @property
    def key(self) -> tuple[int, int, int, int]:
        """``(dim, rows, cols, seed)``: equal keys, equal sketches."""
        return self.dim, self.rows, self.cols, self.seed

    @property
    def size(self) -> int:
        """Number of cells, ``rows * cols``."""
        return self.rows * self.cols

    def _vector(self, x: np.ndarray, length: int, what: str) -> np.ndarray:
        a = np.asarray(x)
        if a.dtype.kind not in "fiu" or a.shape != (length,):
            raise PayloadError(
                f"{what} must be a real vector of length {length}, got {a.dtype}{a.shape}"
            )
        a = a.astype(np.float64, copy=False)
        if not np.all(np.isfinite(a)):
            raise PayloadError(f"{what} has non-finite values")
        return a

    def sketch(self, x: np.ndarray) -> np.ndarray:
        """``S(x)`` as a flat float64 vector of ``rows * cols`` cells (row after row)."""
        x = self._vector(x, self.dim, "sketched vector")
        weights = (self.signs * x).ravel()
        return np.bincount(self.cells.ravel(), weights=weights, minlength=self.size)

    def estimate(self, table: np.ndarray) -> np.ndarray:
        """Count-sketch estimate of every coordinate: the median over rows of
        ``s_r(i) * table[r, h_r(i)]`` (float64, length ``dim``)."""
        table = self._vector(table, self.size, "sketch table")
        per_row = table[self.cells] * self.signs
        est: np.ndarray = np.median(per_row, axis=0) if self.rows > 1 else per_row[0]
        return est

    def heavy(self, table: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` coordinates of largest estimated magnitude: ``(sorted positions, values)``."""
        k = min(_check_int("k", k, 0), self.dim)
        est = self.estimate(table)
        if k == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        idx = np.sort(np.argpartition(-np.abs(est), k - 1)[:k]).astype(np.int64)
        return idx, est[idx]


class SketchAccumulator:
    """FetchSGD's server: momentum and error kept in sketch space (see the module docstring).

    Parameters
    ----------
    sketch
        The run's :class:`CountSketch`.
    k
        Coordinates applied per round.
    momentum
        Server momentum ``rho`` in ``u <- rho u + S``; 0 = none (the sketched mean update goes
        straight into the error). FedAvg updates already carry the clients' learning rate:
        momentum ``rho`` multiplies the long-run step by ``1 / (1 - rho)``.
    max_gain
        Cap on the step's multiple of the minimum-norm step: the estimates are scaled by
        :attr:`scale` ``= min(1, max_gain * cells / d)`` (see the module docstring).
    """

    def __init__(
        self, sketch: CountSketch, k: int, momentum: float = 0.0, max_gain: float = MAX_GAIN
    ) -> None:
        if not (math.isfinite(momentum) and 0.0 <= momentum < 1.0):
            raise CodecError(f"sketch momentum must be in [0, 1), got {momentum}")
        if not (math.isfinite(max_gain) and max_gain >= 1.0):
            raise CodecError(f"sketch max_gain must be finite and >= 1, got {max_gain}")
        self.sketch = sketch
        self.k = min(_check_int("k", k, 1), sketch.dim)
        self.momentum = float(momentum)
        #: factor on the estimated values applied: 1 (the unbiased step) unless the sketch is
        #: so small that the unbiased step is more than ``max_gain`` projections long
        self.scale = min(1.0, float(max_gain) * sketch.size / sketch.dim)
        self.velocity = np.zeros(sketch.size)
        self.error = np.zeros(sketch.size)

    def step(self, mean_table: np.ndarray) -> np.ndarray:
        """The k-sparse update (float64, length ``dim``) to apply for this round's mean sketch.

        Raises :class:`PayloadError` (state untouched) for a table of the wrong shape or with
        non-finite values.
        """
        table = self.sketch._vector(mean_table, self.sketch.size, "mean sketch")
        velocity = self.momentum * self.velocity + table if self.momentum else table
        error = self.error + velocity
        idx, values = self.sketch.heavy(error, self.k)
        update = np.zeros(self.sketch.dim)
        update[idx] = values * self.scale
        applied = self.sketch.sketch(update)
        touched = applied != 0
        self.error = np.where(touched, 0.0, error)
        self.velocity = np.where(touched, 0.0, velocity) if self.momentum else velocity
        return update

    def state(self) -> dict[str, np.ndarray]:
        return {"sketch_velocity": self.velocity.copy(), "sketch_error": self.error.copy()}

    def restore(self, state: dict[str, np.ndarray]) -> None:
        for key, attr in (("sketch_velocity", "velocity"), ("sketch_error", "error")):
            value = np.asarray(state[key], dtype=np.float64)
            if value.shape != (self.sketch.size,):
                raise CodecError(f"{key} has shape {value.shape}, expected ({self.sketch.size},)")
            setattr(self, attr, value.copy())
