"""The in-memory dataset record shared by loaders, partitioners and clients."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Dataset", "DatasetError"]


class DatasetError(ValueError):
    """A dataset spec, dataset file or partitioning request is invalid.

    The message is a single line that names the problem and, where there is one, the file.
    """


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset held in memory as numpy arrays.

    Attributes
    ----------
    name : str
        The spec it was loaded from (``"digits"``, ``"mnist1d"``, ``"npz:PATH"``).
    x_train, x_test : np.ndarray
        float32 features, shape ``(N, *input_shape)``.
    y_train, y_test : np.ndarray
        int64 labels in ``0..num_classes-1``, shape ``(N,)``.
    client_train : np.ndarray or None
        int64 natural client id per training sample (for the ``natural`` partition).
    num_classes : int
        Number of classes ``C``.
    input_shape : tuple of int
        Shape of one sample (without the batch dimension).

    Notes
    -----
    The dataclass is frozen (fields cannot be rebound) and compares by identity
    (``eq=False``): element-wise array equality has no single truth value. The arrays
    themselves are left writable so that ``torch.from_numpy`` can wrap them without a copy
    or a warning; callers must not modify them in place.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    client_train: np.ndarray | None
    num_classes: int
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        # A backstop for datasets built by hand; loaders validate with friendlier messages.
        where = f"dataset {self.name!r}"
        for key in ("x_train", "x_test"):
            arr = getattr(self, key)
            if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
                raise DatasetError(f"{where}: {key} must be a float32 numpy array")
            if tuple(arr.shape[1:]) != tuple(self.input_shape):
                raise DatasetError(
                    f"{where}: {key} has sample shape {tuple(arr.shape[1:])}, "
                    f"expected input_shape {tuple(self.input_shape)}"
                )
        for key in ("y_train", "y_test"):
            arr = getattr(self, key)
            if not isinstance(arr, np.ndarray) or arr.dtype != np.int64 or arr.ndim != 1:
                raise DatasetError(f"{where}: {key} must be a 1-D int64 numpy array")
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise DatasetError(f"{where}: features and labels have different lengths")
        if self.client_train is not None and (
            not isinstance(self.client_train, np.ndarray)
            or self.client_train.dtype != np.int64
            or self.client_train.shape != self.y_train.shape
        ):
            raise DatasetError(
                f"{where}: client_train must be an int64 array with one id per training sample"
            )
        if self.num_classes < 1:
            raise DatasetError(f"{where}: num_classes must be >= 1, got {self.num_classes}")

    @property
    def num_train(self) -> int:
        """Number of training samples."""
        return len(self.y_train)

    @property
    def num_test(self) -> int:
        """Number of test samples."""
        return len(self.y_test)
