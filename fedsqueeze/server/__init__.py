"""Server-side building blocks, usable from any Flower ServerApp.

Wrap any weighted-mean Flower strategy; pass a :class:`CountingGrid` to see the bytes::

    strategy = CompressedStrategy(CentralDP(FedAvg(), clip=0.5, ...), codec="topk(0.01)+q4+ef")
    strategy = SecAggStrategy(DistributedDP(FedAvg(), clip=0.5, ...), neighbours=4)
    result = strategy.start(grid=CountingGrid(grid), initial_arrays=arrays, num_rounds=10)

See ``docs/architecture.md`` for the orders that compose and the hooks of the round loop.
"""

from fedsqueeze.server.compose import StrategyCompositionError
from fedsqueeze.server.dp import CentralDP, DistributedDP, LocalDP
from fedsqueeze.server.grid import CountingGrid
from fedsqueeze.server.hooks import RoundHook
from fedsqueeze.server.secure import SecAggStrategy
from fedsqueeze.server.strategy import CompressedStrategy

__all__ = [
    "CentralDP",
    "CompressedStrategy",
    "CountingGrid",
    "DistributedDP",
    "LocalDP",
    "RoundHook",
    "SecAggStrategy",
    "StrategyCompositionError",
]
