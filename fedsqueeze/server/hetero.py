"""Clients of different sizes: one aggregation per architecture, FedDF across all of them.

``client-models = "cnn1d:0.5,cnn1d-small:0.5"`` gives each client an architecture
(:func:`fedsqueeze.contracts.architectures.assign_architectures`: deterministic from the
partition id and the seed, computed identically by server and clients). The server side is
one composable wrapper, :class:`HeteroStrategy`, around one ordinary strategy chain per
architecture (``CompressedStrategy(ClientModels(FedAvg))`` — decoding, reply checks and
aggregation exactly as in a homogeneous run): each round it shows each member only the
sampled nodes of its architecture and hands it only their replies. With ``distill =
"feddf"`` it then does FedDF's heterogeneous step (Lin et al., NeurIPS 2020, §3): the target
is the example-weighted mean tempered softmax of *all* the round's client models, whatever
their architecture, on the public transfer data, and every architecture's aggregate is
fine-tuned towards it — so a small device's model learns from the big devices' models.

The round loop sees one global model, ``model`` (checkpointed, evaluated, exported); the
other architectures' globals are this hook's state. Per round it adds ``accuracy_<NAME>``
(server test split) and ``clients_<NAME>`` for every architecture, and with FedDF
``pre_distill_accuracy_<NAME>``, ``ensemble_accuracy`` and ``distill_s``. The node →
partition map comes from a query message to each node the first time it is sampled (the
``query`` handler every fedsqueeze client answers); its bytes count in the round's downlink.
Refused with secure aggregation and central/distributed DP (the individual models are
needed), as FedDF is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsqueeze.contracts.architectures import assign_architectures, parse_client_models
from fedsqueeze.contracts.records import RecordNames, from_record, to_record
from fedsqueeze.distill import distill, ensemble_probs
from fedsqueeze.federation import dataset_for
from fedsqueeze.models import build_model, count_parameters
from fedsqueeze.models.weights import evaluate, load_numpy_state, state_to_numpy
from fedsqueeze.server.compose import DelegatingStrategy
from fedsqueeze.server.distill import (
    DistillSettings,
    client_models,
    ensemble_accuracy,
    transfer_data,
)
from fedsqueeze.server.grid import GridWrapper, query_nodes
from fedsqueeze.server.hooks import RoundHook, hooks_in, strategy_chain

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
_COUNTS = ("clients", "rejected_updates", "dropped_clients", "clipped_updates")


class ClientModels(DelegatingStrategy):
    """Pass-through that keeps the client models ``inner`` aggregated in the last round.

    Inside ``CompressedStrategy`` these are exactly the replies that passed its checks,
    decoded to ``global + delta`` (never a rejected or undecoded reply)."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.names = RecordNames.of(inner)
        self.last: list[tuple[Arrays, float]] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.last = []
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.last = client_models(replies, self.names)
        return self.inner.aggregate_train(server_round, replies)


class _Nodes(GridWrapper):
    """``grid`` showing only ``nodes`` (byte counting stays with ``grid``)."""

    def __init__(self, inner: Grid, nodes: list[int]) -> None:
        super().__init__(inner)
        self.nodes = nodes

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)


class HeteroStrategy(Strategy, RoundHook):
    """One member strategy per architecture; FedDF across architectures when asked.

    Parameters
    ----------
    members
        ``{architecture: strategy chain}``; the chain of ``config["model"]`` produces the
        loop's global model. Each should contain a :class:`ClientModels` for FedDF.
    config
        The run config (``client-models``, ``model``, ``distill`` and ``distill-*`` keys).
    """

    hook_name = "hetero"

    def __init__(self, members: Mapping[str, Strategy], config: Mapping[str, Any]) -> None:
        self.members = dict(members)
        self.main = str(config["model"])
        spec = str(config["client-models"])
        if set(self.members) != {n for n, _ in parse_client_models(spec)}:
            raise ValueError("HeteroStrategy needs one member per client-models architecture")
        self.assignment = assign_architectures(
            spec, int(config["num-clients"]), int(config["seed"])
        )
        self.feddf = str(config["distill"]) == "feddf"
        ds = dataset_for(config)
        self._test = (ds.x_test, ds.y_test)
        self._build = lambda name, seed=None: build_model(
            name, ds.input_shape, ds.num_classes, seed=seed
        )
        self.seed = int(config["seed"])
        self.globals: dict[str, Arrays] = {
            name: state_to_numpy(self._build(name, self.seed)) for name in self.members
        }
        if self.feddf:
            self.transfer = transfer_data(config)
        self.distill_settings = DistillSettings.of(config)
        self._arch: dict[int, str] = {}
        self._row: dict[str, Any] = {}
        self._eval: dict[str, float] = {}

    def summary(self) -> None:
        log.info("HeteroStrategy(%s, feddf=%s)", ", ".join(self.members), self.feddf)
        for member in self.members.values():
            member.summary()

    # ---- which node trains which architecture ---------------------------------------------
    def _architectures(self, grid: Grid, nodes: list[int]) -> dict[int, str]:
        """Each node's architecture; nodes seen for the first time are asked their partition."""
        unknown = [n for n in nodes if n not in self._arch]
        if unknown:
            for reply in query_nodes(grid, unknown, timeout=60.0):
                try:
                    pid = int(reply.content["node"]["partition-id"])  # type: ignore[arg-type]
                    self._arch[reply.metadata.src_node_id] = self.assignment[pid]
                except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
                    log.warning(
                        "node %d: no usable partition id (%s); left out",
                        reply.metadata.src_node_id,
                        err,
                    )
        return {n: self._arch[n] for n in nodes if n in self._arch}

    def _split(self, grid: Grid, nodes: list[int]) -> Iterable[tuple[str, Strategy, list[int]]]:
        arch = self._architectures(grid, nodes)
        for name, member in self.members.items():
            mine = [n for n in nodes if arch.get(n) == name]
            if mine:
                yield name, member, mine

    # ---- training ---------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.globals[self.main] = from_record(arrays)
        messages: list[Message] = []
        for name, member, nodes in self._split(grid, list(grid.get_node_ids())):
            messages += member.configure_train(
                server_round, to_record(self.globals[name]), config, _Nodes(grid, nodes)
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        groups: dict[str, list[Message]] = {name: [] for name in self.members}
        for msg in replies:
            name = self._arch.get(msg.metadata.src_node_id)
            if name is not None:
                groups[name].append(msg)
        self._row = {}
        main_metrics: MetricRecord | None = None
        changed = False
        for name, member in self.members.items():
            if not groups[name]:
                continue
            agg, metrics = member.aggregate_train(server_round, groups[name])
            if agg is not None:
                self.globals[name] = from_record(agg)
                changed |= name == self.main
            if name == self.main:
                main_metrics = metrics
        if self.feddf:
            changed |= self._feddf(server_round, groups)
        for name, arrays in self.globals.items():
            model = self._build(name)
            load_numpy_state(model, arrays)
            self._row[f"accuracy_{name}"] = evaluate(model, *self._test)[1]
        return (to_record(self.globals[self.main]) if changed else None), main_metrics

    def _feddf(self, server_round: int, groups: Mapping[str, list[Message]]) -> bool:
        """Fine-tune every architecture towards the ensemble of all the round's client models."""
        models, weights = [], []
        for name, member in self.members.items():
            collector = next(
                (s for s in strategy_chain(member) if isinstance(s, ClientModels)), None
            )
            if collector is None or not groups[name]:
                continue
            for arrays, weight in collector.last:
                m = self._build(name)
                load_numpy_state(m, arrays)
                models.append(m)
                weights.append(weight)
        if not models:
            return False
        t0 = time.process_time()
        step = self.distill_settings.step_args(server_round)
        target = ensemble_probs(models, self.transfer, step["temperature"], weights)
        self._row["ensemble_accuracy"] = ensemble_accuracy(models, self._test)
        for i, name in enumerate(self.members):
            model = self._build(name)
            load_numpy_state(model, self.globals[name])
            self._row[f"pre_distill_accuracy_{name}"] = evaluate(model, *self._test)[1]
            distill(model, self.transfer, target, **{**step, "seed": step["seed"] * 31 + i})
            out = state_to_numpy(model)
            if all(np.isfinite(a).all() for a in out.values()):
                self.globals[name] = out
            else:
                log.warning("round %d: FedDF gave non-finite %s weights; kept", server_round, name)
        self._row["distill_s"] = round(time.process_time() - t0, 4)
        return True

    # ---- evaluation ----------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages: list[Message] = []
        for name, member, nodes in self._split(grid, list(grid.get_node_ids())):
            record = arrays if name == self.main else to_record(self.globals[name])
            messages += member.configure_evaluate(server_round, record, config, _Nodes(grid, nodes))
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The main architecture's aggregate; the others' ``eval-acc`` as row fields."""
        groups: dict[str, list[Message]] = {name: [] for name in self.members}
        for msg in replies:
            name = self._arch.get(msg.metadata.src_node_id)
            if name is not None:
                groups[name].append(msg)
        out = None
        for name, member in self.members.items():
            if not groups[name]:
                continue
            metrics = member.aggregate_evaluate(server_round, groups[name])
            if name == self.main:
                out = metrics
            elif metrics is not None and "eval-acc" in metrics:
                self._eval[f"federated_accuracy_{name}"] = float(metrics["eval-acc"])  # type: ignore[arg-type]
        return out

    # ---- round hook ------------------------------------------------------------------------
    def after_round(self, server_round: int, row: dict[str, Any]) -> None:
        reasons: dict[str, Any] = {}
        for name, member in self.members.items():
            sub: dict[str, Any] = {}
            for hook in hooks_in(member):
                hook.after_round(server_round, sub)
            row[f"clients_{name}"] = int(sub.get("clients", 0))
            for key in _COUNTS:
                if key in sub:
                    row[key] = int(row.get(key, 0)) + int(sub[key])
            reasons.update(sub.get("rejected_reasons", {}))
        if reasons:
            row["rejected_reasons"] = reasons
        row.update(self._row)
        row.update(self._eval)
        self._eval = {}

    def state(self) -> dict[str, Any]:
        return {"globals": {n: a for n, a in self.globals.items() if n != self.main}}

    def restore(self, state: dict[str, Any]) -> None:
        for name, arrays in state.get("globals", {}).items():
            if name in self.globals:
                self.globals[name] = dict(arrays)

    def summary_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"client_models": {}}
        for name, arrays in self.globals.items():
            model = self._build(name)
            load_numpy_state(model, arrays)
            out["client_models"][name] = {
                "parameters": count_parameters(model),
                "clients": self.assignment.count(name),
                "final_accuracy": evaluate(model, *self._test)[1],
            }
        return out
