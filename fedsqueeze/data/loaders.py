"""Offline dataset loaders: ``digits``, ``mnist1d`` and user ``npz:PATH`` files.

Nothing here touches the network: ``digits`` ships with scikit-learn, ``mnist1d`` is
generated procedurally (``mnist1d.data.make_dataset``, never ``get_dataset``, which
downloads), and ``npz`` files are the user's own.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from fedsqueeze.data.core import Dataset, DatasetError

__all__ = ["DATASET_NAMES", "default_cache_dir", "load_dataset"]

#: Valid dataset specs, as shown in error messages.
DATASET_NAMES: tuple[str, ...] = ("digits", "mnist1d", "npz:PATH")

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0
# Bump when the cached mnist1d arrays change meaning, so stale caches are not reused.
_MNIST1D_CACHE_VERSION = 1


MAX_CLASSES = 10_000
"""Largest number of classes an ``npz:`` dataset may have: the model gets an output per
class up to the largest label, so one stray label of 10^9 would ask for 10^9 outputs."""


def default_cache_dir() -> Path:
    """Return the cache directory: ``$FEDSQUEEZE_CACHE`` or ``~/.cache/fedsqueeze``."""
    env = os.environ.get("FEDSQUEEZE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedsqueeze"


def load_dataset(spec: str, cache_dir: str | Path | None = None) -> Dataset:
    """Load a dataset by spec.

    Parameters
    ----------
    spec : str
        ``"digits"`` (scikit-learn's 8x8 digits, a fixed stratified 80/20 split),
        ``"mnist1d"`` (MNIST-1D, 4000 train / 1000 test, generated locally and cached),
        or ``"npz:PATH"`` (arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` and
        optionally ``client_train``).
    cache_dir : str or Path, optional
        Where generated data is cached; defaults to :func:`default_cache_dir`.

    Returns
    -------
    Dataset

    Raises
    ------
    DatasetError
        Unknown spec, or a missing / malformed ``npz`` file.
    """
    if not isinstance(spec, str):
        raise DatasetError(f"dataset spec must be a string, got {type(spec).__name__}")
    name = spec.strip()
    if name == "digits":
        return _load_digits()
    if name == "mnist1d":
        return _load_mnist1d(Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
    if name.startswith("npz:"):
        path = name[len("npz:") :].strip()
        if not path:
            raise DatasetError("dataset spec 'npz:' needs a file path, e.g. npz:data/my.npz")
        return _load_npz(Path(path).expanduser())
    raise DatasetError(f"unknown dataset {spec!r}; valid datasets: {', '.join(DATASET_NAMES)}")


# --------------------------------------------------------------------------- digits


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    # Pixel intensities are 0..16; scale to [0, 1] and add a channel axis for conv nets.
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = y.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=_DIGITS_TEST_FRACTION, stratify=y, random_state=_DIGITS_SPLIT_SEED
    )
    return Dataset(
        name="digits",
        x_train=np.ascontiguousarray(x_tr),
        y_train=np.ascontiguousarray(y_tr),
        x_test=np.ascontiguousarray(x_te),
        y_test=np.ascontiguousarray(y_te),
        client_train=None,
        num_classes=10,
        input_shape=(1, 8, 8),
    )


# --------------------------------------------------------------------------- mnist1d


def _mnist1d_args() -> tuple[Any, str]:
    """Return mnist1d's default generation args and a short digest identifying them."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args()
    as_dict = {k: v for k, v in get_dataset_args(as_dict=True).items() if k != "url"}
    blob = json.dumps([_MNIST1D_CACHE_VERSION, as_dict], sort_keys=True, default=str)
    return args, hashlib.sha256(blob.encode()).hexdigest()[:12]


def _generate_mnist1d(args: Any) -> dict[str, np.ndarray]:
    import mnist1d.data

    # make_dataset reseeds the *global* `random` and `np.random` generators; restore them
    # so that loading a dataset does not silently change the caller's random streams.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = mnist1d.data.make_dataset(args=args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x": np.asarray(raw["x"], dtype=np.float64),
        "y": np.asarray(raw["y"], dtype=np.int64),
        "x_test": np.asarray(raw["x_test"], dtype=np.float64),
        "y_test": np.asarray(raw["y_test"], dtype=np.int64),
    }


def _read_mnist1d_cache(path: Path) -> dict[str, np.ndarray] | None:
    """Return the cached arrays, or None if the cache is absent or unusable."""
    if not path.is_file():
        return None
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            return None
        with f:
            arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    ok = (
        arrays["x"].ndim == 2
        and arrays["x_test"].ndim == 2
        and arrays["x"].shape[1] == arrays["x_test"].shape[1]
        and arrays["y"].shape == (len(arrays["x"]),)
        and arrays["y_test"].shape == (len(arrays["x_test"]),)
    )
    return arrays if ok else None


def _write_mnist1d_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (temp file + rename): simulations may load concurrently."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        warnings.warn(f"could not cache mnist1d in {path.parent}: {exc}", stacklevel=3)


def _load_mnist1d(cache_dir: Path) -> Dataset:
    args, digest = _mnist1d_args()
    cache_path = cache_dir / f"mnist1d-{digest}.npz"
    arrays = _read_mnist1d_cache(cache_path)
    if arrays is None:
        arrays = _generate_mnist1d(args)
        _write_mnist1d_cache(cache_path, arrays)

    x_tr, x_te = arrays["x"], arrays["x_test"]
    # Per-position standardization with *train* statistics only (no test leakage).
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std = np.where(std < 1e-8, 1.0, std)
    x_tr = ((x_tr - mean) / std).astype(np.float32)[:, None, :]
    x_te = ((x_te - mean) / std).astype(np.float32)[:, None, :]
    y_tr, y_te = arrays["y"].astype(np.int64), arrays["y_test"].astype(np.int64)
    return Dataset(
        name="mnist1d",
        x_train=np.ascontiguousarray(x_tr),
        y_train=y_tr,
        x_test=np.ascontiguousarray(x_te),
        y_test=y_te,
        client_train=None,
        num_classes=int(max(y_tr.max(), y_te.max())) + 1,
        input_shape=tuple(int(d) for d in x_tr.shape[1:]),
    )


# --------------------------------------------------------------------------- npz


_REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _as_int_ids(arr: np.ndarray, key: str, where: str) -> np.ndarray:
    """Convert labels / client ids to int64, accepting integral-valued floats."""
    if arr.ndim != 1:
        raise DatasetError(f"{where}: {key} must be 1-D, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        unsigned = np.issubdtype(arr.dtype, np.unsignedinteger)
        if unsigned and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise DatasetError(f"{where}: {key} has values too large for int64")
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise DatasetError(f"{where}: {key} contains NaN or Inf")
        frac = arr != np.round(arr)
        if np.any(frac):
            bad = arr[np.argmax(frac)]
            raise DatasetError(f"{where}: {key} must hold integers, found {bad!r}")
        if arr.size and np.max(np.abs(arr)) > 2**53:
            raise DatasetError(f"{where}: {key} has values too large to be exact integers")
        return arr.astype(np.int64)
    raise DatasetError(f"{where}: {key} must hold integers, got dtype {arr.dtype}")


def _as_features(arr: np.ndarray, key: str, where: str) -> np.ndarray:
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise DatasetError(f"{where}: {key} must be numeric (int or float), got dtype {arr.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise DatasetError(
            f"{where}: {key} contains non-finite values (NaN/Inf or too large for float32)"
        )
    return np.ascontiguousarray(out)


def read_npz(
    path: Path, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    """The ``required`` and present ``optional`` arrays of the ``.npz`` at ``path``, without
    unpickling anything; any unreadable archive or missing array is one :class:`DatasetError`
    line starting with ``where``."""
    raw: dict[str, np.ndarray] = {}
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DatasetError(f"{where}: not a valid .npz archive (it is a single .npy array)")
        with npz:
            missing = [k for k in required if k not in npz.files]
            if missing:
                raise DatasetError(
                    f"{where}: missing array(s) {', '.join(missing)} "
                    f"(found: {', '.join(sorted(npz.files)) or 'none'})"
                )
            for key in (*required, *optional):
                if key in npz.files:
                    raw[key] = npz[key]
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, zlib.error) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DatasetError(f"{where}: not a valid .npz archive ({reason})") from exc
    return raw


def _load_npz(path: Path) -> Dataset:
    where = f"dataset file {path}"
    if not path.exists():
        raise DatasetError(f"{where}: file not found")
    if not path.is_file():
        raise DatasetError(f"{where}: not a regular file")

    raw = read_npz(path, where, _REQUIRED_KEYS, ("client_train",))

    x_tr, x_te = raw["x_train"], raw["x_test"]
    if x_tr.ndim < 2:
        raise DatasetError(
            f"{where}: x_train must have shape (N, features...), got shape {x_tr.shape}"
        )
    if x_te.ndim != x_tr.ndim or x_te.shape[1:] != x_tr.shape[1:]:
        raise DatasetError(
            f"{where}: x_test sample shape {x_te.shape[1:]} differs from "
            f"x_train sample shape {x_tr.shape[1:]}"
        )
    if any(d == 0 for d in x_tr.shape[1:]):
        raise DatasetError(f"{where}: samples have an empty dimension, shape {x_tr.shape}")
    for xk, yk in (("x_train", "y_train"), ("x_test", "y_test")):
        if raw[yk].ndim != 1:
            raise DatasetError(f"{where}: {yk} must be 1-D, got shape {raw[yk].shape}")
        if len(raw[xk]) != len(raw[yk]):
            raise DatasetError(
                f"{where}: {xk} has {len(raw[xk])} samples but {yk} has {len(raw[yk])} labels"
            )
        if len(raw[xk]) == 0:
            raise DatasetError(f"{where}: {xk} is empty")

    x_train = _as_features(x_tr, "x_train", where)
    x_test = _as_features(x_te, "x_test", where)
    y_train = _as_int_ids(raw["y_train"], "y_train", where)
    y_test = _as_int_ids(raw["y_test"], "y_test", where)
    for key, y in (("y_train", y_train), ("y_test", y_test)):
        if y.min() < 0:
            raise DatasetError(f"{where}: {key} has negative label {int(y.min())}")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if num_classes < 2:
        raise DatasetError(f"{where}: labels contain a single class; need at least 2")
    if num_classes > MAX_CLASSES:
        raise DatasetError(
            f"{where}: largest label is {num_classes - 1}; labels must be 0..K-1 with "
            f"K <= {MAX_CLASSES} (the model gets one output per class up to the largest label)"
        )

    client_train = None
    if "client_train" in raw:
        client_train = _as_int_ids(raw["client_train"], "client_train", where)
        if len(client_train) != len(y_train):
            raise DatasetError(
                f"{where}: client_train has {len(client_train)} ids but x_train has "
                f"{len(y_train)} samples"
            )

    return Dataset(
        name=f"npz:{path}",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        client_train=client_train,
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
    )
