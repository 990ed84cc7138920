"""Build the Flower strategy named by the run config (``strategy`` key)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Strategy,
)

from fedsqueeze.config import ConfigError


def build_strategy(config: Mapping[str, Any]) -> Strategy:
    """A stock Flower strategy that trains on every node the round's grid view shows.

    fedsqueeze samples the round's clients itself (reproducibly) and shows the strategy
    only those, so ``fraction_train=1`` and the minimums equal ``clients-per-round``.
    """
    k = int(config["clients-per-round"])
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": k,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
    }
    name = str(config["strategy"])
    server_lr = float(config["server-lr"])
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=float(config["proximal-mu"]))
    if name == "fedavgm":
        return FedAvgM(**common, server_momentum=float(config["server-momentum"]))
    if name == "fedadam":
        return FedAdam(**common, eta=server_lr)
    if name == "fedyogi":
        return FedYogi(**common, eta=server_lr)
    if name == "fedadagrad":
        return FedAdagrad(**common, eta=server_lr)
    raise ConfigError(f"unknown strategy {name!r}")
