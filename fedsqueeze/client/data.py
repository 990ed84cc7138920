"""Where a client's data comes from: the one place that chooses between a partition of the
run's dataset (simulation, demo SuperNodes) and the device's own file (node config
``data-path``).

A :class:`DataSource` gives the handlers the training and test arrays and the model to
train; the handlers never ask which kind they hold. :func:`data_source` chooses:

- node config ``data-path`` set: :class:`DeviceFile`, the whole file
  (:func:`fedsqueeze.data.device.load_device_data`), validated against the model the server
  announces in the message (``model-input-shape``, ``model-num-classes``); the run's
  ``dataset`` is never loaded on the device;
- otherwise: :class:`Partition`, partition ``partition-id`` of ``num-partitions`` of the
  run's ``dataset`` (refused under ``client-data = "device"``, where the server expects
  every node to bring its own data).

A data problem is a :class:`~fedsqueeze.data.DatasetError` (one line); the ClientApp turns
it into an error reply (:func:`fedsqueeze.client.app.build_client_app`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedsqueeze.data import DatasetError
from fedsqueeze.data.device import DeviceData, load_device_data
from fedsqueeze.federation import client_eval_data, client_train_data, new_model
from fedsqueeze.models.retrain import read_spec

if TYPE_CHECKING:
    import torch

__all__ = ["DATA_PATH", "DataSource", "DeviceFile", "Partition", "data_source"]

DATA_PATH = "data-path"
"""Node-config key naming the device's own ``.npz`` file (an absolute path)."""

Arrays = tuple[np.ndarray, np.ndarray]


class DataSource(Protocol):
    """What a handler needs from a client's data."""

    def train_data(self) -> Arrays: ...

    def test_data(self) -> Arrays: ...

    def model(self) -> torch.nn.Module: ...


class Partition:
    """Partition ``pid`` of ``num_parts`` of the run's ``dataset`` (shared by every node)."""

    def __init__(self, cfg: Mapping[str, Any], pid: int, num_parts: int) -> None:
        self.cfg, self.pid, self.num_parts = cfg, pid, num_parts

    def train_data(self) -> Arrays:
        return client_train_data(self.cfg, self.pid, self.num_parts)

    def test_data(self) -> Arrays:
        return client_eval_data(self.cfg, self.pid, self.num_parts)

    def model(self) -> torch.nn.Module:
        return new_model(self.cfg, partition_id=self.pid)


@functools.lru_cache(maxsize=2)
def _device_file(path: str, mtime_ns: int, shape: tuple[int, ...], classes: int) -> DeviceData:
    return load_device_data(path, shape, classes)


class DeviceFile:
    """The whole of the device's own file, for the model the server announced."""

    def __init__(self, cfg: Mapping[str, Any], path: str, msg_config: Mapping[str, Any]) -> None:
        try:
            spec = read_spec(msg_config)
        except (ValueError, TypeError) as err:
            raise DatasetError(f"device data {path}: {err}") from None
        if spec is None:
            raise DatasetError(
                f"device data {path}: the server did not announce the model's input shape "
                "and classes: run with client-data = 'device'"
            )
        self.cfg, self.input_shape, self.num_classes = cfg, spec[0], spec[1]
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            mtime = -1  # load_device_data reports the problem
        self.data = _device_file(path, mtime, self.input_shape, self.num_classes)

    def train_data(self) -> Arrays:
        return self.data.x_train, self.data.y_train

    def test_data(self) -> Arrays:
        if self.data.x_test is None or self.data.y_test is None:
            raise DatasetError(
                f"device data {self.data.path}: no x_test/y_test for federated evaluation"
            )
        return self.data.x_test, self.data.y_test

    def model(self) -> torch.nn.Module:
        from fedsqueeze.models import build_model  # torch: only where a model is built

        return build_model(str(self.cfg["model"]), self.input_shape, self.num_classes)


def data_source(
    cfg: Mapping[str, Any],
    node_config: Mapping[str, Any],
    msg_config: Mapping[str, Any],
    partition: tuple[int, int],
) -> DataSource:
    """The client's data: its own file when the node config names one, else its partition."""
    path = str(node_config.get(DATA_PATH, "") or "").strip()
    if path:
        return DeviceFile(cfg, path, msg_config)
    if str(cfg.get("client-data", "partition")) == "device":
        raise DatasetError(
            "this node has no data-path, but the run expects every device to bring its own "
            "data (client-data = 'device'): start the SuperNode with "
            "--node-config 'data-path=/abs/path.npz ...'"
        )
    return Partition(cfg, *partition)
