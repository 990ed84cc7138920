"""A device's own data file (node config ``data-path``), validated against the model.

A device that joins a federation with ``data-path=/abs/path.npz`` trains on the whole
file; nothing about it comes from the run's ``dataset`` (which then describes only the
server's test data). What a file may hold:

- ``x_train`` (required): shape ``(N, *input_shape)`` or ``(N, prod(input_shape))``
  (flattened samples are reshaped); any integer or floating dtype, converted to float32;
  every value finite (no NaN/Inf, nothing beyond float32's range); ``N >= 1``;
- ``y_train`` (required): shape ``(N,)``; an integer dtype, or floats that are whole
  numbers; every label in ``0..num_classes-1`` of the federation's model (a device may hold
  only some of the classes);
- ``x_test`` and ``y_test`` (optional, both or neither): the same rules; used only for
  federated evaluation (``fraction-evaluate > 0``);
- any other array is ignored. Pickled objects are refused (``allow_pickle=False``).

The input shape and the number of classes come from the server's train message (the
federation's model), not from the file: a file that does not fit the model is refused
before any training. Every problem is a :class:`~fedsqueeze.data.core.DatasetError` whose
message is one line naming the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsqueeze.data.core import DatasetError
from fedsqueeze.data.loaders import _as_features, _as_int_ids, read_npz

__all__ = ["DeviceData", "load_device_data"]


@dataclass(frozen=True, eq=False)
class DeviceData:
    """A device's validated arrays: float32 features, int64 labels (test split optional)."""

    path: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None


def _features(arr: np.ndarray, key: str, where: str, input_shape: tuple[int, ...]) -> np.ndarray:
    if arr.ndim < 1 or len(arr) == 0:
        raise DatasetError(f"{where}: {key} is empty")
    sample = tuple(int(d) for d in arr.shape[1:])
    if sample != input_shape:
        if sample == (math.prod(input_shape),):
            arr = arr.reshape(len(arr), *input_shape)
        else:
            raise DatasetError(
                f"{where}: {key} has samples of shape {sample}, but the federation's model "
                f"takes {input_shape} (or {math.prod(input_shape)} flat features)"
            )
    return _as_features(arr, key, where)


def _labels(arr: np.ndarray, key: str, where: str, n: int, num_classes: int) -> np.ndarray:
    if arr.ndim != 1 or len(arr) != n:
        raise DatasetError(f"{where}: {key} must have shape ({n},), got {arr.shape}")
    y = _as_int_ids(arr, key, where)
    bad = (y < 0) | (y >= num_classes)
    if np.any(bad):
        raise DatasetError(
            f"{where}: {key} has label {int(y[np.argmax(bad)])}; the federation's model has "
            f"{num_classes} classes (labels 0..{num_classes - 1})"
        )
    return y


def load_device_data(
    path: str | Path, input_shape: tuple[int, ...], num_classes: int
) -> DeviceData:
    """Load and validate a device's ``.npz`` file for a model of this input shape and classes.

    Raises
    ------
    DatasetError
        Missing or unreadable file, missing arrays, wrong shapes or dtypes, non-finite
        values, labels outside ``0..num_classes-1`` (one line, naming the file).
    """
    p = Path(path).expanduser()
    where = f"device data {p}"
    if not p.is_absolute():
        # A relative path resolves against whatever directory the SuperNode started in.
        raise DatasetError(f"{where}: data-path must be an absolute path")
    if not p.is_file():
        raise DatasetError(
            f"{where}: " + ("not a regular file" if p.exists() else "file not found")
        )
    input_shape = tuple(int(d) for d in input_shape)
    raw = read_npz(p, where, ("x_train", "y_train"), ("x_test", "y_test"))
    if ("x_test" in raw) != ("y_test" in raw):
        raise DatasetError(f"{where}: x_test and y_test must come together")

    x_train = _features(raw["x_train"], "x_train", where, input_shape)
    y_train = _labels(raw["y_train"], "y_train", where, len(x_train), num_classes)
    x_test = y_test = None
    if "x_test" in raw:
        x_test = _features(raw["x_test"], "x_test", where, input_shape)
        y_test = _labels(raw["y_test"], "y_test", where, len(x_test), num_classes)
    return DeviceData(str(p), x_train, y_train, x_test, y_test)
