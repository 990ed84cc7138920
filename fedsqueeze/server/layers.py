"""Server side of retraining: announce the model's shape, and train only some tensors.

:class:`TrainLayers` is the outermost wrapper of fedsqueeze's chain (``build_chain``) when
``train-layers`` is not ``"all"`` or ``client-data = "device"``:

- every train and evaluate message's config carries the model's input shape and number of
  classes (``model-input-shape``, ``model-num-classes``), so a device with its own data
  (node config ``data-path``) builds the model without the run's dataset;
- with ``train-layers`` other than ``"all"`` it hands the wrapped chain only the trained
  tensors of the global model — so compression, clipping, DP noise and SecAgg masking act
  on them alone — adds the frozen rest to each train message
  (:data:`~fedsqueeze.models.retrain.FROZEN_KEY`, counted in the downlink bytes) and puts
  the aggregate of the trained tensors back into the full model; the frozen tensors never
  change. Clients need ``layers_mod`` (``fedsqueeze.client.layers``).

Evaluation messages carry the full model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsqueeze.contracts.records import RecordNames, from_record, to_record
from fedsqueeze.models.retrain import FROZEN_KEY, encode_arrays, model_train_layers, spec_config
from fedsqueeze.server.compose import DelegatingStrategy

log = logging.getLogger(__name__)


class TrainLayers(DelegatingStrategy):
    """Wrap ``inner`` so that only ``trained`` tensors are trained (None: all of them)."""

    def __init__(
        self,
        inner: Strategy,
        input_shape: Sequence[int],
        num_classes: int,
        trained: Sequence[str] | None = None,
    ) -> None:
        self.inner = inner
        self.spec = spec_config(input_shape, num_classes)
        self.trained = list(trained) if trained is not None else None
        self.names = RecordNames.of(inner)
        self._full: dict[str, np.ndarray] = {}

    def _config(self, config: ConfigRecord) -> ConfigRecord:
        return ConfigRecord({**dict(config), **self.spec})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.trained is None:
            return self.inner.configure_train(server_round, arrays, self._config(config), grid)
        full = from_record(arrays)
        missing = [k for k in self.trained if k not in full]
        if missing:
            raise ValueError(f"train-layers: the global model has no {missing[0]!r}")
        self._full = full
        trained = to_record({k: full[k] for k in self.trained})
        messages = list(
            self.inner.configure_train(server_round, trained, self._config(config), grid)
        )
        frozen = ConfigRecord(
            {"payload": encode_arrays({k: v for k, v in full.items() if k not in self.trained})}
        )
        for msg in messages:
            msg.content[FROZEN_KEY] = frozen
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        agg, metrics = self.inner.aggregate_train(server_round, replies)
        if agg is None or self.trained is None:
            return agg, metrics
        new = from_record(agg)
        merged = {k: (new[k] if k in self.trained else v) for k, v in self._full.items()}
        return to_record(merged), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, self._config(config), grid)

    def summary(self) -> None:
        which = "all" if self.trained is None else ", ".join(self.trained)
        log.info("TrainLayers(trained: %s)", which)
        self.inner.summary()


def with_train_layers(inner: Strategy, config: Mapping[str, Any]) -> Strategy:
    """``inner`` wrapped when the run restricts ``train-layers`` or its devices bring their
    own data (``client-data = "device"``), else ``inner`` itself. Checks ``train-layers`` and
    ``init-model`` against the model, so a wrong one fails before the run starts."""
    from fedsqueeze.federation import dataset_for, devices_bring_data, initial_arrays, new_model

    ds = dataset_for(config)
    model = new_model(config)
    initial_arrays(config)  # validates init-model against the model
    trained = model_train_layers(model, str(config.get("train-layers", "all")))
    everything = trained == list(model.state_dict())
    if everything and not devices_bring_data(config):
        return inner
    return TrainLayers(inner, ds.input_shape, ds.num_classes, None if everything else trained)
