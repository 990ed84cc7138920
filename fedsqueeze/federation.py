"""What a federation is made of: its dataset, its client partitions and its model.

Shared by the ClientApp and the ServerApp so that every process derives the same
partitions and the same model architecture from the same run config.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsqueeze.data import Dataset, load_dataset, partition_indices, partition_stats

if TYPE_CHECKING:
    import torch


@functools.lru_cache(maxsize=4)
def _dataset(spec: str) -> Dataset:
    return load_dataset(spec)


def dataset_for(config: Mapping[str, Any]) -> Dataset:
    """The run's dataset (cached per process: every client in a Ray worker reuses it)."""
    return _dataset(str(config["dataset"]))


@functools.lru_cache(maxsize=8)
def _partitions(
    spec: str, scheme: str, num_clients: int, seed: int, alpha: float, shards: int
) -> tuple[np.ndarray, ...]:
    parts = partition_indices(
        _dataset(spec), scheme, num_clients, seed, alpha=alpha, shards_per_client=shards
    )
    return tuple(parts)


def partitions_for(config: Mapping[str, Any], num_clients: int | None = None) -> list[np.ndarray]:
    """Training-set indices of every client, deterministic in the run config."""
    n = int(config["num-clients"]) if num_clients is None else int(num_clients)
    return list(
        _partitions(
            str(config["dataset"]),
            str(config["partition"]),
            n,
            int(config["seed"]),
            float(config["dirichlet-alpha"]),
            int(config["shards-per-client"]),
        )
    )


def client_train_data(
    config: Mapping[str, Any], partition_id: int, num_partitions: int
) -> tuple[np.ndarray, np.ndarray]:
    """The training samples of client ``partition_id`` out of ``num_partitions``."""
    ds = dataset_for(config)
    idx = partitions_for(config, num_partitions)[partition_id]
    return ds.x_train[idx], ds.y_train[idx]


def client_eval_data(
    config: Mapping[str, Any], partition_id: int, num_partitions: int
) -> tuple[np.ndarray, np.ndarray]:
    """A client's share of the test split, for federated evaluation (interleaved slice)."""
    ds = dataset_for(config)
    return ds.x_test[partition_id::num_partitions], ds.y_test[partition_id::num_partitions]


def model_name(config: Mapping[str, Any], partition_id: int | None = None) -> str:
    """The registry model a partition trains: ``model``, or its ``client-models`` share."""
    spec = str(config.get("client-models", ""))
    if not spec or partition_id is None:
        return str(config["model"])
    from fedsqueeze.contracts.architectures import assign_architectures

    names = assign_architectures(spec, int(config["num-clients"]), int(config["seed"]))
    return names[partition_id]


def new_model(
    config: Mapping[str, Any], seed: int | None = None, partition_id: int | None = None
) -> torch.nn.Module:
    """A freshly initialized model for the run's dataset (seeded when ``seed`` is given):
    ``model``, or with ``partition_id`` the architecture ``client-models`` gives it."""
    from fedsqueeze.models import build_model  # torch: only where a model is built

    ds = dataset_for(config)
    name = model_name(config, partition_id)
    return build_model(name, ds.input_shape, ds.num_classes, seed=seed)


def devices_bring_data(config: Mapping[str, Any]) -> bool:
    """``client-data = "device"``: every node trains on its own file (node config
    ``data-path``); the run's ``dataset`` is only the server's test data."""
    return str(config.get("client-data", "partition")) == "device"


def client_stats(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-client sample and label counts of the partitions (``clients.json``); empty when
    devices bring their own data, which the server never sees."""
    if devices_bring_data(config):
        return []
    return partition_stats(dataset_for(config), partitions_for(config))


def initial_arrays(config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The federation's starting weights: ``init-model`` (checked against the run's model,
    :func:`fedsqueeze.models.retrain.load_init_model`) or a fresh model from ``seed``."""
    from fedsqueeze.models.retrain import load_init_model
    from fedsqueeze.models.weights import state_to_numpy

    fresh = state_to_numpy(new_model(config, seed=int(config["seed"])))
    path = str(config.get("init-model", "") or "")
    return load_init_model(path, fresh) if path else fresh
