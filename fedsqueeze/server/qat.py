"""Server side of quantization-aware training: ask clients for it, report the int8 model.

``QATStrategy(inner, model_fn, calib_x, test_x, test_y, start_round)`` wraps the rest of the
chain (outside ``PruningStrategy``, so it sees full tensors). It

1. adds ``fedsqueeze.qat`` (``{"scheme": "int8"}``) to every train message from
   ``start_round`` on — clients need ``qat_mod`` (``fedsqueeze.client.qat``);
2. after each round, builds the int8 model of the new global
   (:func:`fedsqueeze.models.qat.int8_model`: per-channel symmetric int8 weights, activation
   ranges calibrated on ``calib_x``), evaluates it on the test split and adds
   ``int8_accuracy``, ``int8_loss`` and ``model_bytes_int8`` to the round's metrics row next to
   the fp32 ``accuracy``; its activation scales are hook state (checkpointed), which
   ``fedsqueeze export --int8`` turns into the artifact.

What is federated: the fp32 weights only, under the model's own names and shapes. Weight
scales are a function of the weights (``max|w_c| / 127``), so they need no exchange.
Activation ranges are not exchanged either: they are statistics of each client's data —
averaging them under secure aggregation would give the server a data statistic outside the
clipped, noised update that DP accounts for, and a range over non-IID clients is a max, which
a secure sum cannot compute. The server calibrates them on its own calibration data (the
public transfer slice, else the first test samples — the data the export calibrates on), so
QAT composes with every codec, secure aggregation, DP mode and pruning without a change to
what travels (the round's ``fedsqueeze.qat`` record adds ~40 bytes per train message).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedsqueeze.contracts.records import from_record
from fedsqueeze.models.qat import QAT_KEY, calibrate, check_supported, int8_bytes, int8_model
from fedsqueeze.models.weights import evaluate, load_numpy_state
from fedsqueeze.server.compose import DelegatingStrategy
from fedsqueeze.server.hooks import RoundHook

log = logging.getLogger(__name__)


class QATStrategy(DelegatingStrategy, RoundHook):
    """Int8 quantization-aware training; see the module docstring."""

    hook_name = "qat"

    def __init__(
        self,
        inner: Strategy,
        model_fn: Callable[[], nn.Module],
        calib_x: np.ndarray,
        test_x: np.ndarray,
        test_y: np.ndarray,
        start_round: int = 1,
        calibration: str = "",
    ) -> None:
        if start_round < 1:
            raise ValueError(f"start_round must be >= 1, got {start_round}")
        self.inner, self.model_fn, self.start_round = inner, model_fn, start_round
        self.calib_x, self.test_x, self.test_y = calib_x, test_x, test_y
        self.calibration = calibration or f"{len(calib_x)} samples"
        check_supported(model_fn())  # one line naming the layer, before anything runs
        self._global: dict[str, np.ndarray] | None = None
        self.scales: dict[str, tuple[float, int]] = {}
        self._last: dict[str, Any] = {}

    def summary(self) -> None:
        log.info("QATStrategy(int8 from round %d)", self.start_round)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = from_record(arrays)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if server_round >= self.start_round:
            for msg in messages:
                msg.content[QAT_KEY] = ConfigRecord({"scheme": "int8"})
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is not None:
            self._global = from_record(arrays)
        return arrays, metrics

    # ---- round hook ------------------------------------------------------------------------
    def after_round(self, server_round: int, row: dict[str, Any]) -> None:
        if self._global is None:
            return
        model = self.model_fn()
        load_numpy_state(model, self._global)
        self.scales = calibrate(model, self.calib_x)
        loss, acc = evaluate(int8_model(model, self.scales), self.test_x, self.test_y)
        self._last = {
            "int8_accuracy": acc,
            "int8_loss": loss,
            "model_bytes_int8": int8_bytes(model),
            "qat": server_round >= self.start_round,
        }
        row.update(self._last)

    def state(self) -> dict[str, Any]:
        return {
            "scales": {k: [s, z] for k, (s, z) in self.scales.items()},
            "calibration": self.calibration,
            "last": self._last,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.scales = {k: (float(v[0]), int(v[1])) for k, v in state.get("scales", {}).items()}
        self._last = dict(state.get("last", {}))

    def summary_fields(self) -> dict[str, Any]:
        out = {"qat": "int8", "qat_start_round": self.start_round}
        if "int8_accuracy" in self._last:
            out["final_int8_accuracy"] = self._last["int8_accuracy"]
            out["model_bytes_int8"] = self._last["model_bytes_int8"]
        return out


def qat_from_config(inner: Strategy, config: Mapping[str, Any]) -> Strategy:
    """``inner`` wrapped in :class:`QATStrategy` when the run config asks (``qat``)."""
    if str(config.get("qat", "none")) == "none":
        return inner
    from fedsqueeze.federation import dataset_for, new_model
    from fedsqueeze.models.export import calibration_data

    ds = dataset_for(config)
    calib_x, source = calibration_data(config)
    return QATStrategy(
        inner,
        model_fn=lambda: new_model(config),
        calib_x=calib_x,
        test_x=ds.x_test,
        test_y=ds.y_test,
        start_round=int(config["qat-start-round"]),
        calibration=source,
    )
