"""Split a training set across simulated clients with flwr-datasets partitioners.

The partitioners run on a small local ``datasets.Dataset`` with two columns, ``label``
and ``idx`` (the row's index into ``Dataset.x_train``), plus ``client`` for the natural
split; nothing is fetched from the Hugging Face hub. What comes back is, per client, the
sorted training indices, so the features never leave numpy.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from typing import Any

import numpy as np

from fedsqueeze.data.core import Dataset, DatasetError

__all__ = ["PARTITION_SCHEMES", "partition_indices", "partition_stats"]

#: Valid values of the ``partition`` run-config key.
PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "shards", "natural")


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise DatasetError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise DatasetError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _indices_of(partitioner: Any, num_clients: int) -> list[np.ndarray]:
    parts = []
    for pid in range(num_clients):
        table = partitioner.load_partition(pid)
        parts.append(np.sort(np.asarray(table["idx"], dtype=np.int64)))
    return parts


def _table(columns: dict[str, np.ndarray]) -> Any:
    from datasets import Dataset as HFDataset

    return HFDataset.from_dict({k: np.asarray(v) for k, v in columns.items()})


def _min_dirichlet_size(num_samples: int, num_clients: int) -> int:
    """Smallest client size the Dirichlet sampler is asked to guarantee.

    flwr-datasets resamples (up to 10 retries, then raises) until every client holds at
    least ``min_partition_size`` samples; its default of 10 fails often when clients
    average only ~40 samples (100 clients on 4000 with alpha=0.5). A tenth of the mean
    client size, capped at 10 and at least 1, keeps clients non-empty and usable while
    almost always succeeding on the first draw.
    """
    return max(1, min(10, num_samples // (10 * num_clients)))


def partition_indices(
    ds: Dataset,
    scheme: str,
    num_clients: int,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    """Assign the training samples of ``ds`` to ``num_clients`` clients.

    Parameters
    ----------
    ds : Dataset
        The dataset whose training set is split.
    scheme : {"iid", "dirichlet", "shards", "natural"}
        ``iid``: a seeded shuffle cut into equal contiguous blocks (``IidPartitioner``).
        ``dirichlet``: per-class proportions drawn from Dir(alpha) (``DirichletPartitioner``,
        label skew; smaller alpha = more skew). ``shards``: the label-sorted data cut into
        shards, ``shards_per_client`` random shards per client (``ShardPartitioner``);
        when the sizes do not divide evenly the left-over shard goes to the first clients
        so that every sample is used. ``natural``: one client per distinct id in
        ``ds.client_train`` (``NaturalIdPartitioner``), ordered by id.
    num_clients : int
        Number of clients; for ``natural`` it must equal the number of distinct ids.
    seed : int
        Seed for the shuffle and the partitioner; equal seeds give equal partitions.
    alpha : float
        Dirichlet concentration (``dirichlet`` only).
    shards_per_client : int
        Shards per client (``shards`` only).

    Returns
    -------
    list of np.ndarray
        Per client, the sorted int64 indices into ``ds.x_train``. For ``iid``,
        ``dirichlet`` and ``shards`` the lists are disjoint and cover the training set.

    Raises
    ------
    DatasetError
        Unknown scheme, invalid numbers, ``natural`` without ids or with the wrong client
        count, or a split that would leave a client without samples.
    """
    if scheme not in PARTITION_SCHEMES:
        raise DatasetError(
            f"unknown partition scheme {scheme!r}; valid schemes: {', '.join(PARTITION_SCHEMES)}"
        )
    num_clients = _check_int(num_clients, "num_clients", 1)
    seed = _check_int(seed, "seed", 0)
    n = ds.num_train
    if num_clients > n:
        raise DatasetError(
            f"num_clients={num_clients} is more than the {n} training samples of "
            f"dataset {ds.name!r}"
        )

    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        ShardPartitioner,
    )

    if scheme == "natural":
        if ds.client_train is None:
            raise DatasetError(
                f"partition 'natural' needs client ids, but dataset {ds.name!r} has no "
                "client_train array"
            )
        num_ids = len(np.unique(ds.client_train))
        if num_clients != num_ids:
            raise DatasetError(
                f"partition 'natural': dataset {ds.name!r} has {num_ids} distinct client ids "
                f"in client_train, so num_clients must be {num_ids} (got {num_clients})"
            )
        partitioner = NaturalIdPartitioner(partition_by="client")
        partitioner.dataset = _table(
            {"label": ds.y_train, "idx": np.arange(n, dtype=np.int64), "client": ds.client_train}
        )
        # NaturalIdPartitioner draws a tqdm progress bar on stderr; keep the console clean.
        with contextlib.redirect_stderr(io.StringIO()):
            parts = _indices_of(partitioner, num_clients)
        return parts

    # Present the rows in a seeded random order so that the partition does not depend on
    # how the file happens to be sorted (IidPartitioner cuts contiguous blocks, Dirichlet
    # and shard partitioners take contiguous runs within a class).
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    table = _table({"label": ds.y_train[perm], "idx": perm})

    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_clients)
        partitioner.dataset = table
        parts = _indices_of(partitioner, num_clients)
        hint = "use fewer clients"
    elif scheme == "dirichlet":
        alpha_f = float(alpha)
        if not math.isfinite(alpha_f) or alpha_f <= 0:
            raise DatasetError(f"dirichlet alpha must be a finite number > 0, got {alpha!r}")
        min_size = _min_dirichlet_size(n, num_clients)
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=alpha_f,
            min_partition_size=min_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
        partitioner.dataset = table
        hint = f"increase dirichlet-alpha (now {alpha_f:g}) or use fewer clients"
        try:
            with warnings.catch_warnings():
                # Each resampling attempt warns; the final failure is reported below.
                warnings.filterwarnings("ignore", message="The specified min_partition_size")
                parts = _indices_of(partitioner, num_clients)
        except ValueError as exc:
            raise DatasetError(
                f"partition 'dirichlet' (alpha={alpha_f:g}) could not give each of "
                f"{num_clients} clients at least {min_size} of the {n} samples of dataset "
                f"{ds.name!r} in 11 draws; {hint}"
            ) from exc
    else:  # shards
        spc = _check_int(shards_per_client, "shards_per_client", 1)
        # floor(n / (clients * spc)) gives at least clients * spc shards (so no client is
        # empty); keep_incomplete_shard keeps the remainder, so every sample is assigned.
        shard_size = max(1, n // (num_clients * spc))
        partitioner = ShardPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            shard_size=shard_size,
            keep_incomplete_shard=True,
            shuffle=True,
            seed=seed,
        )
        partitioner.dataset = table
        hint = "use fewer clients or fewer shards-per-client"
        try:
            with warnings.catch_warnings():
                # datasets' sort passes a pyarrow option deprecated in pyarrow 25; not ours.
                warnings.filterwarnings(
                    "ignore", message=".*null_placement", category=FutureWarning
                )
                parts = _indices_of(partitioner, num_clients)
        except ValueError as exc:
            raise DatasetError(
                f"partition 'shards' ({spc} per client, size {shard_size}) cannot serve "
                f"{num_clients} clients from {n} samples of dataset {ds.name!r}; {hint}"
            ) from exc

    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise DatasetError(
            f"partition {scheme!r} left {len(empty)} of {num_clients} clients without samples "
            f"(first: client {empty[0]}) on dataset {ds.name!r}; {hint}"
        )
    return parts


def partition_stats(ds: Dataset, parts: list[np.ndarray]) -> list[dict[str, Any]]:
    """Summarize a partition: per client, sample count and per-class label counts.

    Returns
    -------
    list of dict
        ``[{"client": i, "num_samples": n_i, "label_counts": [c_0, ..., c_{C-1}]}, ...]``
        with plain Python ints (JSON-serializable).
    """
    n = ds.num_train
    stats = []
    for i, part in enumerate(parts):
        idx = np.asarray(part)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise DatasetError(f"partition of client {i} must be a 1-D integer index array")
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise DatasetError(
                f"partition of client {i} has indices outside 0..{n - 1} of dataset {ds.name!r}"
            )
        counts = np.bincount(ds.y_train[idx.astype(np.int64)], minlength=ds.num_classes)
        stats.append(
            {
                "client": i,
                "num_samples": int(idx.size),
                "label_counts": [int(c) for c in counts],
            }
        )
    return stats
