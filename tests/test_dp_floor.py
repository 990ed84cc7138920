"""A device refuses DP parameters below its own floor; local DP sends no example count.

The adversary is an active server (the party distributed and local DP protect against): it
describes the round's mechanism, so it tries to get a client to add less noise than the
device accepts — a lower noise multiplier, a larger claimed cohort (smaller noise shares),
or more DP-SGD steps than the device's ε ceiling allows. Before the floor these rounds ran.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import inprocess
import numpy as np
import pytest
from flwr.app import ConfigRecord, Message
from flwr.serverapp.strategy import FedAvg
from test_secure_glue import InProcessGrid, _run

from fedsqueeze.client.app import build_client_app
from fedsqueeze.config import resolve_config
from fedsqueeze.contracts.records import from_record, to_record
from fedsqueeze.contracts.summable import (
    DistributedDPSum,
    EncodingError,
    RandomK,
    check_privacy_floor,
    choose_integer_encoding,
)
from fedsqueeze.federation import client_train_data, new_model
from fedsqueeze.models.weights import state_to_numpy
from fedsqueeze.privacy import DistributedDPParams, InvalidPrivacyParameter
from fedsqueeze.privacy.floor import BelowPrivacyFloor, PrivacyFloor

pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing", "ignore:Secure RNG turned off", "ignore:Optimal order"
)


def _floor_grid(node_config: dict[str, Any]) -> type:
    class FloorGrid(InProcessGrid):
        def __init__(self, config: dict[str, Any], num_nodes: int) -> None:
            super().__init__(config, num_nodes)
            self.errors: list[str] = []
            for ctx in self.contexts.values():
                ctx.node_config.update(node_config)

        def send_and_receive(
            self, messages: Iterable[Message], *, timeout: float | None = None
        ) -> Iterable[Message]:
            replies = list(super().send_and_receive(messages, timeout=timeout))
            self.errors += [r.error.reason for r in replies if r.has_error()]
            return replies

    return FloorGrid


DDP = {"dp": "distributed", "dp-clip": 1.0, "dp-bits": 16}


def test_server_lowered_distributed_noise_is_refused_by_the_device_floor() -> None:
    grid = _floor_grid({"dp-min-noise-multiplier": 1.0})
    run = _run({**DDP, "dp-noise-multiplier": 0.3}, grid_type=grid)
    (r,) = run.rounds
    assert r.arrays is None and r.row["secagg_aborted"] == 1  # nothing released
    assert len(run.grid.errors) == 5
    assert all("dp-min-noise-multiplier" in e for e in run.grid.errors)
    # With enough noise for the worst case (3 of 5 shares: z * sqrt(3/5) > 1) the round runs.
    ok = _run({**DDP, "dp-noise-multiplier": 3.0}, grid_type=grid)
    assert ok.rounds[0].arrays is not None and not ok.grid.errors


def _ddp(z: float, num_clients: int, dim: int = 1000) -> DistributedDPSum:
    return DistributedDPSum(DistributedDPParams.for_bits(dim, 1.0, 20, num_clients, z), 7)


def test_floor_is_checked_for_the_worst_case_cohort() -> None:
    node = {"dp-min-noise-multiplier": "1.0"}
    check_privacy_floor(_ddp(2.0, 10), node, min_contributors=10)
    # Same nominal z, but the server claims 100 clients so each adds 1/100 of the variance,
    # while only the threshold's 10 noise shares need be in the sum: z_eff ≈ 2 / sqrt(10).
    with pytest.raises(EncodingError, match="effective noise multiplier"):
        check_privacy_floor(_ddp(2.0, 100), node, min_contributors=10)
    # Random-k wraps the same encoding: still checked.
    with pytest.raises(EncodingError):
        check_privacy_floor(RandomK(_ddp(0.5, 10, dim=100), 1000, 3), node, 10)
    # No floor on the device, or no client-side noise (central DP: trusted server): passes.
    check_privacy_floor(_ddp(0.5, 10), {}, 10)
    plain = choose_integer_encoding(dim=10, num_clients=5, clip=1.0)
    check_privacy_floor(plain, node, 2)
    with pytest.raises(EncodingError, match="must be a number > 0"):
        check_privacy_floor(_ddp(2.0, 10), {"dp-min-noise-multiplier": "-1"}, 10)


def test_floor_from_node_config() -> None:
    floor = PrivacyFloor.from_node_config({"dp-min-noise-multiplier": 0.8, "dp-max-epsilon": "3"})
    assert floor == PrivacyFloor(0.8, 3.0)
    assert PrivacyFloor.from_node_config({"dp-max-epsilon": ""}) == PrivacyFloor()
    with pytest.raises(InvalidPrivacyParameter, match="not a number"):
        PrivacyFloor.from_node_config({"dp-max-epsilon": "lots"})
    floor.check_local(0.8, 3.0)
    with pytest.raises(BelowPrivacyFloor, match="noise multiplier"):
        floor.check_local(0.79, 1.0)
    with pytest.raises(BelowPrivacyFloor, match="dp-max-epsilon"):
        floor.check_local(2.0, 3.01)


# ---- local DP ---------------------------------------------------------------------------------

RUN = {
    "dataset": "digits",
    "model": "logreg",
    "num-clients": 2,
    "clients-per-round": 2,
    "num-rounds": 3,
    "local-epochs": 1,
    "lr": 0.1,
    "dp": "local",
}


def _local_round(cfg: dict[str, Any], node_config: dict[str, Any]) -> list[Message]:
    grid = inprocess.InProcessGrid(build_client_app(cfg), 2)
    for ctx in grid.contexts.values():
        ctx.node_config.update(node_config)
    arrays = state_to_numpy(new_model(cfg, seed=0))
    messages = FedAvg(fraction_train=1.0, min_available_nodes=1).configure_train(
        1, to_record(arrays), ConfigRecord(), grid
    )
    return list(grid.send_and_receive(messages))


@pytest.mark.parametrize(
    ("sent", "node", "reason"),
    [
        ({"dp-noise-multiplier": 0.5}, {"dp-min-noise-multiplier": 1.0}, "noise multiplier"),
        # The server keeps z but asks for many epochs: the device's ε ceiling refuses.
        ({"dp-noise-multiplier": 1.0, "local-epochs": 20}, {"dp-max-epsilon": 2.0}, "epsilon"),
    ],
)
def test_server_lowered_local_dp_is_refused_before_training(
    sent: dict[str, Any], node: dict[str, Any], reason: str
) -> None:
    replies = _local_round(resolve_config(RUN, sent), node)
    assert all(r.has_error() and reason in r.error.reason for r in replies)
    # The same request to a device without that floor trains.
    assert not any(r.has_error() for r in _local_round(resolve_config(RUN, sent), {}))


def test_local_dp_sends_no_example_count() -> None:
    """Without SecAgg, local DP sent each client's exact number of examples in the clear."""
    cfg = resolve_config(RUN, {"dp-noise-multiplier": 1.0})
    replies = _local_round(cfg, {})
    for pid, reply in enumerate(replies):
        assert not reply.has_error()
        assert len(client_train_data(cfg, pid, 2)[0]) > 1
        values = [v for rec in reply.content.metric_records.values() for v in rec.values()]
        assert set(reply.content["metrics"]) == {"num-examples", "epsilon", "delta"}
        assert reply.content["metrics"]["num-examples"] == 1  # constant: FedAvg is unweighted
        assert len(client_train_data(cfg, pid, 2)[0]) not in values
        assert all(np.isfinite(v).all() for v in from_record(reply.content["arrays"]).values())
