"""examples/quickstart_pytorch: a plain Flower app gains each capability from mods + a wrapper.

5 clients, 3 rounds, a 64-32-10 MLP on the digits. The example's own ServerApp and ClientApp
run every mode; ``distributed-dp`` (SecAgg+ with drop-outs and client-side noise: the most
stages and messages) runs in Flower's Simulation Engine, the other modes through the
in-process grid, which delivers the same messages to the same ClientApp without paying a Ray
start per mode. The example is imported as the top-level package ``quickstart_pytorch``
(opacus installs a package named ``examples``, which would shadow a namespace package).
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict
from inprocess import InProcessGrid

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Ray workers start with the driver's sys.path, so they can import the example too.
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

NUM_CLIENTS = 5
NUM_ROUNDS = 3


def _check(mode: str, out: dict[str, Any]) -> dict[str, Any]:
    assert out, f"{mode}: the ServerApp did not finish (see the log above)"
    assert sorted(out["accuracy"]) == list(range(NUM_ROUNDS + 1))
    print(
        f"{mode}: accuracy {out['accuracy'][NUM_ROUNDS]:.3f}, epsilon {out['epsilon']}, "
        f"uplink {out['uplink_bytes']} B, downlink {out['downlink_bytes']} B, "
        f"{out['seconds']:.1f} s"
    )
    return out


def _config(mode: str) -> dict[str, Any]:
    return {"mode": mode, "num-server-rounds": NUM_ROUNDS, "num-clients": NUM_CLIENTS}


def _run(mode: str) -> dict[str, Any]:
    """The example's apps, messages delivered in this process."""
    from quickstart_pytorch.client_app import app as client_app
    from quickstart_pytorch.server_app import build_server_app

    out: dict[str, Any] = {}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    build_server_app(_config(mode), out)(InProcessGrid(client_app, NUM_CLIENTS), context)
    return _check(mode, out)


def _simulate(mode: str) -> dict[str, Any]:
    """The example's apps in Flower's Simulation Engine (Ray), as ``python -m`` runs them."""
    from flwr.simulation import run_simulation
    from quickstart_pytorch.client_app import app as client_app
    from quickstart_pytorch.server_app import build_server_app

    out: dict[str, Any] = {}
    run_simulation(
        server_app=build_server_app(_config(mode), out),
        client_app=client_app,
        num_supernodes=NUM_CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return _check(mode, out)


def _assert_growing_epsilon(out: dict[str, Any]) -> None:
    eps = [out["epsilon"].get(rnd) for rnd in range(1, NUM_ROUNDS + 1)]
    assert all(e is not None and math.isfinite(e) and e > 0 for e in eps), eps
    assert all(a < b for a, b in itertools.pairwise(eps)), eps


@functools.cache
def _plain() -> dict[str, Any]:
    return _run("plain")


@pytest.fixture
def plain() -> dict[str, Any]:
    """Run once for the module (cached; a function-scoped fixture, so the task identity is set)."""
    return _plain()


def test_plain_learns(plain: dict[str, Any]) -> None:
    assert plain["accuracy"][NUM_ROUNDS] > 0.8
    assert plain["epsilon"] == {}
    # 5 clients x 3 rounds of fp32 weights (2,410 parameters) each way.
    assert plain["uplink_bytes"] > NUM_CLIENTS * NUM_ROUNDS * 4 * 2410
    assert plain["downlink_bytes"] > NUM_CLIENTS * NUM_ROUNDS * 4 * 2410


def test_compressed_learns_on_a_fraction_of_the_bytes(plain: dict[str, Any]) -> None:
    out = _run("compressed")
    assert out["accuracy"][NUM_ROUNDS] > plain["accuracy"][NUM_ROUNDS] - 0.15
    assert out["uplink_bytes"] < plain["uplink_bytes"] / 4
    assert out["downlink_bytes"] < plain["downlink_bytes"] / 2


def test_secagg_with_dropouts_learns() -> None:
    out = _run("secagg")
    assert out["accuracy"][NUM_ROUNDS] > 0.5  # chance is 0.1
    assert out["uplink_bytes"] > 0 and out["downlink_bytes"] > 0
    assert out["epsilon"] == {}


def test_central_dp_reports_a_growing_epsilon() -> None:
    _assert_growing_epsilon(_run("central-dp"))


@pytest.mark.e2e
def test_distributed_dp_in_the_simulation_engine() -> None:
    out = _simulate("distributed-dp")
    _assert_growing_epsilon(out)
    assert out["uplink_bytes"] > 0 and out["downlink_bytes"] > 0
