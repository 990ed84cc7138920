"""A plain Flower app that knows nothing of fedsqueeze gains compression from the mod and wrapper.

The ClientApp below is ordinary Flower code (it adds 1 to every weight and replies with its
full weights); the ServerApp is Flower's own ``Strategy.start`` loop. Adding ``compress_mod``
to the client and wrapping FedAvg in ``CompressedStrategy`` is all it takes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from fedsqueeze.client.mods import compress_mod
from fedsqueeze.server.grid import CountingGrid
from fedsqueeze.server.strategy import CompressedStrategy

pytestmark = pytest.mark.e2e

SHAPES = {"layer.weight": (64, 32), "layer.bias": (64,)}


def _client_app() -> ClientApp:
    app = ClientApp(mods=[compress_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = {k: v.numpy() + 1.0 for k, v in msg.content["arrays"].items()}
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def _server_app(codec: str, out: dict[str, Any]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        counting = CountingGrid(grid)
        strategy = CompressedStrategy(
            FedAvg(fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3), codec=codec
        )
        initial = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
        result = strategy.start(counting, initial, num_rounds=2)
        out["arrays"] = {k: v.numpy() for k, v in result.arrays.items()}
        out["uplink"] = counting.uplink_bytes

    return app


def _run(codec: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    run_simulation(
        server_app=_server_app(codec, out),
        client_app=_client_app(),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return out


def test_plain_client_app_gains_compression() -> None:
    plain = _run("none")
    compressed = _run("q4")
    n = sum(int(np.prod(s)) for s in SHAPES.values())
    for result in (plain, compressed):
        for v in result["arrays"].values():
            # two rounds of "+1" from every client: the global model moved by 2
            np.testing.assert_allclose(v, 2.0, atol=0.15)
    # fp32 replies carry the raw 4 bytes/parameter; q4 replies about half a byte.
    assert plain["uplink"] >= 2 * 3 * 4 * n
    assert compressed["uplink"] < plain["uplink"] / 6
