"""quickstart_pytorch: a Flower ServerApp (Message API) running a stock FedAvg.

``main`` is the usual Flower server: build the model, build FedAvg, call ``strategy.start``
with a centralized ``evaluate_fn``. The fedsqueeze parts are two lines in ``main`` (the
``CountingGrid`` and the call to :func:`wrap`) and :func:`wrap` itself, which picks one
capability by the run-config key ``mode``:

==================  =====================================================================
``plain``           FedAvg, unchanged
``compressed``      top-10% + 4-bit + error-feedback uplink, 8-bit downlink
``secagg``          SecAgg+ secure aggregation, 20% of the clients drop out every round
``central-dp``      central DP: the server clips each update and noises the aggregate
``distributed-dp``  distributed DP: every client adds its share of the noise under SecAgg+
==================  =====================================================================
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy

from fedsqueeze.server import (
    CentralDP,
    CompressedStrategy,
    CountingGrid,
    DistributedDP,
    SecAggStrategy,
)

from .task import Net, load_centralized_testset, test

MODES = ("plain", "compressed", "secagg", "central-dp", "distributed-dp")

DEFAULTS: dict[str, Any] = {
    "mode": "plain",
    "num-server-rounds": 3,
    "num-clients": 5,
    "lr": 0.1,
    "local-epochs": 2,
    "seed": 0,
    "out": "",  # write the run's report (JSON) to this path
}


def wrap(strategy: Strategy, mode: str, num_clients: int) -> Strategy:
    """Give ``strategy`` the fedsqueeze capability ``mode``; ``"plain"`` returns it as is.

    Every client trains every round, so for DP ``clients_per_round = num_clients``.
    """
    if mode == "plain":
        return strategy
    if mode == "compressed":
        return CompressedStrategy(strategy, codec="topk(0.1)+q4+ef", downlink_codec="q8")
    if mode == "secagg":
        return SecAggStrategy(strategy, clip=4.0, simulate_dropout=0.2)
    if mode == "central-dp":
        return CentralDP(
            strategy,
            clip=1.0,
            clients_per_round=num_clients,
            num_clients=num_clients,
            noise_multiplier=1.0,
        )
    if mode == "distributed-dp":
        dp = DistributedDP(
            strategy,
            clip=1.0,
            clients_per_round=num_clients,
            num_clients=num_clients,
            noise_multiplier=1.0,
        )
        return SecAggStrategy(dp, simulate_dropout=0.2)  # the DP mode brings the clip
    raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Test the global model on the held-out digits."""
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, accuracy = test(model, load_centralized_testset())
    return MetricRecord({"accuracy": accuracy, "loss": loss})


def build_server_app(
    run_config: Mapping[str, Any] | None = None, out: dict[str, Any] | None = None
) -> ServerApp:
    """A ServerApp; ``run_config`` overrides the Context's run config, ``out`` gets the report."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = {**DEFAULTS, **context.run_config, **(run_config or {})}
        mode = str(cfg["mode"])
        num_rounds = int(cfg["num-server-rounds"])
        num_clients = int(cfg["num-clients"])

        counting = CountingGrid(grid)  # counts the bytes of every message
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=num_clients,
            min_available_nodes=num_clients,
        )
        strategy = wrap(strategy, mode, num_clients)

        torch.manual_seed(int(cfg["seed"]))  # the same initial model in every run
        initial_arrays = ArrayRecord(Net().state_dict())
        started = time.perf_counter()
        result = strategy.start(
            grid=counting,
            initial_arrays=initial_arrays,
            num_rounds=num_rounds,
            train_config=ConfigRecord(
                {"lr": float(cfg["lr"]), "local-epochs": int(cfg["local-epochs"])}
            ),
            evaluate_fn=global_evaluate,
        )
        report = {
            "mode": mode,
            "accuracy": {
                rnd: float(m["accuracy"]) for rnd, m in result.evaluate_metrics_serverapp.items()
            },
            "epsilon": {
                rnd: float(m["epsilon"])
                for rnd, m in result.train_metrics_clientapp.items()
                if "epsilon" in m
            },
            "uplink_bytes": counting.uplink_bytes,
            "downlink_bytes": counting.downlink_bytes,
            "seconds": time.perf_counter() - started,
        }
        for rnd, accuracy in report["accuracy"].items():
            eps = report["epsilon"].get(rnd)
            print(f"[{mode}] round {rnd}: accuracy {accuracy:.3f}", end="")
            print("" if eps is None else f", epsilon {eps:.2f}")
        print(
            f"[{mode}] uplink {report['uplink_bytes']:,} B, "
            f"downlink {report['downlink_bytes']:,} B, {report['seconds']:.1f} s"
        )
        if out is not None:
            out.update(report)
        if cfg["out"]:
            Path(str(cfg["out"])).write_text(json.dumps(report, indent=2))

    return app


app = build_server_app()
