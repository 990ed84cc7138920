"""The server's round loop: sample, train, aggregate, evaluate, account bytes, checkpoint.

Flower's ``Strategy.start`` runs a fixed loop from round 1; fedsqueeze needs to resume
from a checkpoint, sample reproducibly and count every byte, so it drives the same
strategy methods (``configure_train``/``aggregate_train``/...) in its own loop. The loop
knows nothing of compression, secure aggregation or privacy (beyond sampling secretly under
DP, :class:`ClientSampler`): those are the strategy chain
(:func:`~fedsqueeze.server.strategies.build_chain`), and everything a capability adds to a
round — a privacy budget that stops the run, fields in ``metrics.jsonl``, checkpoint state,
``summary.json`` fields — comes through round hooks (:class:`~fedsqueeze.server.hooks.RoundHook`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsqueeze.config import to_toml
from fedsqueeze.contracts.records import from_record, to_record
from fedsqueeze.contracts.streams import Secret, SecretStreams, Stream, round_rng
from fedsqueeze.federation import client_stats, dataset_for, initial_arrays, new_model
from fedsqueeze.models.weights import evaluate, load_numpy_state
from fedsqueeze.server.grid import CountingGrid, query_nodes
from fedsqueeze.server.hooks import RoundHook, hooks_in
from fedsqueeze.server.liveness import Liveness, WatchedGrid
from fedsqueeze.server.rundir import (
    CLIENTS,
    CONFIG,
    SUMMARY,
    Checkpoint,
    RunDir,
    check_resume_config,
    restore_strategy_state,
    strategy_state,
)
from fedsqueeze.server.strategies import build_chain, build_strategy

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]

STARTUP_TIMEOUT = 300.0
"""Seconds the handshake waits at least: the first reply includes the engine's start (Ray,
workers importing torch: 10-30 s here), which is not a client being slow."""

CRASH_ENV = "FEDSQUEEZE_CRASH_AFTER_ROUND"
"""Fault injection for tests: SIGKILL the server process right after this round's checkpoint."""


class FederationError(RuntimeError):
    """The federation cannot proceed (e.g. the expected nodes never connected)."""


def handshake(grid: Grid, num_clients: int, timeout: float) -> dict[int, int]:
    """Ask every node for its partition id; return ``{partition_id: node_id}``.

    Nodes are asked as they connect, so a node that belongs to another federation size (in
    ``flwr run``'s simulation: Flower's default of 2 simulated nodes against
    ``num-clients = 10``) stops the run at once with one line, instead of after the whole
    ``timeout`` of waiting for nodes that will never come.
    """
    deadline = time.monotonic() + timeout
    mapping: dict[int, int] = {}
    asked: set[int] = set()
    while True:
        new = [n for n in grid.get_node_ids() if n not in asked]
        asked.update(new)
        remaining = max(deadline - time.monotonic(), 1.0)
        for reply in query_nodes(grid, new, remaining):
            _check_handshake_reply(reply, num_clients, mapping)
        if len(asked) >= num_clients and len(mapping) == len(asked):
            break
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(mapping)} of {num_clients} nodes connected and answered within "
                f"{timeout:.0f} s"
            )
        time.sleep(0.5)
    if sorted(mapping) != list(range(num_clients)):
        raise FederationError(f"expected partition ids 0..{num_clients - 1}, got {sorted(mapping)}")
    return mapping


def _check_handshake_reply(reply: Message, num_clients: int, mapping: dict[int, int]) -> None:
    if reply.has_error():
        raise FederationError(
            f"node {reply.metadata.src_node_id} failed the handshake: {reply.error.reason}"
        )
    info = reply.content["node"]
    if int(info["num-partitions"]) != num_clients:
        raise FederationError(
            f"node {reply.metadata.src_node_id} says num-partitions={info['num-partitions']}, "
            f"but num-clients={num_clients}: the federation has a different size (flwr run "
            f"simulation: --federation-config 'num-supernodes={num_clients}'; SuperNodes: "
            f"--node-config 'partition-id=<i> num-partitions={num_clients}')"
        )
    partition = int(info["partition-id"])
    if partition in mapping:
        raise FederationError(
            f"nodes {mapping[partition]} and {reply.metadata.src_node_id} both say "
            f"partition-id={partition}"
        )
    mapping[partition] = reply.metadata.src_node_id


def draw(
    rng: np.random.Generator,
    num_clients: int,
    k: int,
    available: Collection[int] | None = None,
    top_up: bool = True,
) -> list[int]:
    """``k`` of ``num_clients`` partitions, only from ``available`` (None: all).

    The first draw is the same whatever is available, so a run where every client answers
    samples exactly as before; sampled partitions that are unavailable are left out and, with
    ``top_up``, replaced by further draws from the same generator among the available ones.
    """
    chosen = [int(p) for p in rng.choice(num_clients, size=k, replace=False)]
    if available is None:
        return sorted(chosen)
    kept = [p for p in chosen if p in available]
    spare = sorted(set(available) - set(chosen))
    if top_up and len(kept) < k and spare:
        extra = rng.choice(spare, size=min(k - len(kept), len(spare)), replace=False)
        kept += [int(p) for p in extra]
    return sorted(kept)


def sample_partitions(
    seed: int,
    server_round: int,
    num_clients: int,
    k: int,
    stream: Stream = Stream.CLIENT_SAMPLING,
    available: Collection[int] | None = None,
) -> list[int]:
    """The partitions trained (or evaluated) in a round: reproducible from (seed, round)."""
    return draw(round_rng(seed, server_round, stream), num_clients, k, available)


class ClientSampler(RoundHook):
    """Which partitions train in a round: by seed without DP, secretly under user-level DP.

    Under ``dp = "central"`` or ``"distributed"`` the accountant's privacy amplification by
    subsampling holds only if nobody outside the server knows which clients a round used;
    a schedule that follows from the public seed would void it (a client whose rounds are
    known is charged as if sampled every time). There the rounds' samples come from a
    secret key drawn from OS entropy, kept only in the server's private checkpoint (so a
    resumed run samples exactly as the uninterrupted one would). Against whom: everyone
    but the server (and whoever reads its checkpoint). Without DP (and under local DP,
    whose per-client accountant assumes nothing about the server's sampling) sampling stays
    reproducible from ``seed``, and such runs repeat bit for bit.
    """

    hook_name = "sampling"

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.seed = int(config["seed"])
        self.secret = str(config.get("dp", "none")) in ("central", "distributed")
        self.streams = SecretStreams() if self.secret else None

    def sample(
        self, server_round: int, num_clients: int, k: int, available: Collection[int] | None = None
    ) -> list[int]:
        """``k`` partitions, leaving out those not ``available`` (busy or disconnected).

        Without DP a left-out partition is replaced by another available one. Under DP it
        is not: a replacement would raise the other clients' chance of being sampled above
        the ``clients-per-round / num-clients`` the accountant charges for; leaving it out
        only lowers it.
        """
        if self.streams is None:
            return sample_partitions(
                self.seed, server_round, num_clients, k, Stream.CLIENT_SAMPLING, available
            )
        rng = self.streams.rng(server_round, Secret.CLIENT_SAMPLING)
        return draw(rng, num_clients, k, available, top_up=False)

    def state(self) -> dict[str, Any]:
        """The secret key under DP: this state belongs in the private checkpoint only."""
        return {"key": self.streams.state() if self.streams is not None else None}

    def restore(self, state: dict[str, Any]) -> None:
        if self.secret and state.get("key") is not None:
            self.streams = SecretStreams.restore(state["key"])

    def summary_fields(self) -> dict[str, Any]:
        return {"client_sampling": "secret" if self.secret else "seed"}


def train_round(
    strategy: Strategy,
    view: CountingGrid,
    server_round: int,
    arrays: dict[str, np.ndarray],
    timeout: float,
) -> tuple[dict[str, np.ndarray] | None, dict[str, float]]:
    """One training phase: the new global model (None = keep) and the aggregated metrics."""
    messages = strategy.configure_train(server_round, to_record(arrays), ConfigRecord(), view)
    replies = view.send_and_receive(messages, timeout=timeout)
    # Aggregate in partition order, not arrival order: float sums depend on the order,
    # and a run must be repeatable (and resumable) bit for bit.
    order = {node: i for i, node in enumerate(view.node_ids or [])}
    replies = sorted(replies, key=lambda m: order.get(m.metadata.src_node_id, len(order)))
    agg, metrics = strategy.aggregate_train(server_round, replies)
    values = {} if metrics is None else {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
    return (from_record(agg) if agg is not None else None), values


def evaluate_round(
    strategy: Strategy,
    view: CountingGrid,
    server_round: int,
    arrays: dict[str, np.ndarray],
    timeout: float,
) -> dict[str, float]:
    """Federated evaluation on the nodes of ``view``; the aggregated metrics."""
    messages = strategy.configure_evaluate(server_round, to_record(arrays), ConfigRecord(), view)
    metrics = strategy.aggregate_evaluate(
        server_round, view.send_and_receive(messages, timeout=timeout)
    )
    return {} if metrics is None else {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]


@dataclass
class Federation:
    """What the loop needs between rounds."""

    config: Mapping[str, Any]
    grid: Grid
    partition_nodes: dict[int, int]
    inner: Strategy
    strategy: Strategy
    hooks: list[RoundHook]
    sampler: ClientSampler
    liveness: Liveness
    arrays: dict[str, np.ndarray]
    metrics: list[dict[str, Any]]
    start_round: int
    elapsed: float
    timeout: float

    def nodes(self, partitions: Iterable[int]) -> list[int]:
        return [self.partition_nodes[p] for p in partitions]


def start_federation(
    grid: Grid,
    config: Mapping[str, Any],
    run_dir: RunDir,
    timeout: float,
    extra_hooks: Iterable[RoundHook] = (),
) -> Federation:
    """Connect to the nodes and build the strategy chain, fresh or from the checkpoint."""
    t_setup = time.monotonic()
    grid = WatchedGrid(grid)
    partition_nodes = handshake(grid, int(config["num-clients"]), max(timeout, STARTUP_TIMEOUT))
    ckpt = run_dir.load_checkpoint()
    inner = build_strategy(config)
    if ckpt is None:
        arrays = initial_arrays(config)
        metrics: list[dict[str, Any]] = initial_rows(config, arrays)
        run_dir.write_text(CONFIG, to_toml(config))
        run_dir.write_json(CLIENTS, client_stats(config))
    else:
        check_resume_config(ckpt.config, config, ckpt.completed_round)
        restore_strategy_state(inner, ckpt.strategy_state)
        arrays, metrics = ckpt.arrays, ckpt.metrics
        run_dir.write_metrics(metrics)  # drop any row written after the checkpoint
        log.info("resuming after round %d", ckpt.completed_round)
    strategy = build_chain(config, inner)
    sampler = ClientSampler(config)
    liveness = Liveness(config, grid, partition_nodes)
    hooks = hooks_in(strategy, [*extra_hooks, sampler, liveness])
    saved = ckpt.extra.get("hooks", {}) if ckpt is not None else {}
    for hook in hooks:
        if hook.hook_name in saved:
            hook.restore(saved[hook.hook_name])
    return Federation(
        config,
        grid,
        partition_nodes,
        inner,
        strategy,
        hooks,
        sampler,
        liveness,
        arrays,
        list(metrics),
        start_round=1 if ckpt is None else ckpt.completed_round + 1,
        elapsed=(float(ckpt.extra.get("elapsed_s", 0.0)) if ckpt else 0.0)
        + time.monotonic()
        - t_setup,
        timeout=timeout,
    )


def initial_rows(
    config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
) -> list[dict[str, Any]]:
    """With ``init-model``, round 0: the starting model evaluated before any training."""
    if not config.get("init-model"):
        return []
    model = new_model(config)
    load_numpy_state(model, arrays)
    ds = dataset_for(config)
    loss, acc = evaluate(model, ds.x_test, ds.y_test)
    zero = {"uplink_bytes": 0, "downlink_bytes": 0, "wall_s": 0.0, "elapsed_s": 0.0}
    return [{"round": 0, "accuracy": acc, "loss": loss, **zero}]


def run_round(fed: Federation, rnd: int, model: Any) -> dict[str, Any]:
    """Train (and federated-evaluate) round ``rnd``; its metrics row."""
    cfg, t0 = fed.config, time.monotonic()
    num_clients, seed = int(cfg["num-clients"]), int(cfg["seed"])
    k, available = int(cfg["clients-per-round"]), fed.liveness.available()
    sampled = fed.sampler.sample(rnd, num_clients, k, available)
    view = CountingGrid(fed.grid, fed.nodes(sampled))
    arrays, train_metrics = train_round(fed.strategy, view, rnd, fed.arrays, fed.timeout)
    if arrays is not None:
        fed.arrays = arrays
    row: dict[str, Any] = {"round": rnd}
    if float(cfg["fraction-evaluate"]) > 0:
        n_eval = max(1, round(float(cfg["fraction-evaluate"]) * num_clients))
        evaluated = sample_partitions(
            seed, rnd, num_clients, n_eval, Stream.EVAL_SAMPLING, fed.liveness.available()
        )
        eval_view = CountingGrid(fed.grid, fed.nodes(evaluated))
        eval_metrics = evaluate_round(fed.strategy, eval_view, rnd, fed.arrays, fed.timeout)
        view.add_counts(eval_view)
        if "eval-acc" in eval_metrics:
            row["federated_accuracy"] = eval_metrics["eval-acc"]
    load_numpy_state(model, fed.arrays)
    ds = dataset_for(cfg)
    loss, acc = evaluate(model, ds.x_test, ds.y_test)
    wall = time.monotonic() - t0
    fed.elapsed += wall
    row.update({"accuracy": acc, "loss": loss, "wall_s": round(wall, 4)})
    row["elapsed_s"] = round(fed.elapsed, 4)
    for hook in fed.hooks:
        hook.after_round(rnd, row)
    row.update(_byte_fields(view, fed.arrays, len(sampled), row, train_metrics))
    return row


def _byte_fields(
    view: CountingGrid,
    arrays: Mapping[str, np.ndarray],
    sampled: int,
    row: Mapping[str, Any],
    train_metrics: Mapping[str, float],
) -> dict[str, Any]:
    """Bytes of the round, per parameter and per update that reached the server."""
    n_params = int(sum(a.size for a in arrays.values()))
    updates = max(int(row.get("clients", 0)) + int(row.get("rejected_updates", 0)), 1)
    out: dict[str, Any] = {
        "uplink_bytes": view.uplink_bytes,
        "downlink_bytes": view.downlink_bytes,
        "uplink_compression": 4 * n_params * updates / max(view.uplink_bytes, 1),
        "uplink_bits_per_param": 8 * view.uplink_bytes / (updates * n_params),
        "downlink_bits_per_param": 8 * view.downlink_bytes / (max(sampled, 1) * n_params),
    }
    if "train-loss" in train_metrics:
        out["train_loss"] = train_metrics["train-loss"]
    return out


def run_federation(
    grid: Grid,
    config: Mapping[str, Any],
    run_dir: RunDir,
    on_round: RoundCallback | None = None,
    node_timeout: float = 600.0,
    hooks: Iterable[RoundHook] = (),
) -> dict[str, Any]:
    """Run (or continue) the federation described by ``config``; return the summary."""
    fed = start_federation(grid, config, run_dir, node_timeout, hooks)
    model = new_model(config)
    stopped_reason = ""
    for rnd in range(fed.start_round, int(config["num-rounds"]) + 1):
        stopped_reason = next((r for h in fed.hooks if (r := h.before_round(rnd))), "")
        if stopped_reason:
            log.warning("stopping before round %d: %s", rnd, stopped_reason)
            break
        row = run_round(fed, rnd, model)
        fed.metrics.append(row)
        run_dir.save_checkpoint(
            Checkpoint(
                completed_round=rnd,
                arrays=fed.arrays,
                strategy_state=strategy_state(fed.inner),
                metrics=fed.metrics,
                extra={
                    "elapsed_s": fed.elapsed,
                    "hooks": {h.hook_name: h.state() for h in fed.hooks if h.hook_name},
                },
                config=dict(config),
            )
        )
        run_dir.write_metrics(fed.metrics)
        run_dir.save_model(fed.arrays)
        if on_round is not None:
            on_round(row)
        if os.environ.get(CRASH_ENV) == str(rnd):
            os.kill(os.getpid(), 9)
    n_params = int(sum(a.size for a in fed.arrays.values()))
    summary = summarize(fed.metrics, config, n_params)
    if stopped_reason:
        summary["stopped_reason"] = stopped_reason
    for hook in fed.hooks:
        summary.update(hook.summary_fields())
    run_dir.write_json(SUMMARY, summary)
    run_dir.save_model(fed.arrays)
    _plot(run_dir, fed.metrics)
    return summary


def summarize(
    metrics: list[dict[str, Any]], config: Mapping[str, Any], n_params: int
) -> dict[str, Any]:
    """The ``summary.json`` content of a finished run."""
    accs = [m["accuracy"] for m in metrics]
    return {
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "total_uplink_bytes": int(sum(m["uplink_bytes"] for m in metrics)),
        "total_downlink_bytes": int(sum(m["downlink_bytes"] for m in metrics)),
        "num_rounds": sum(1 for m in metrics if m["round"] > 0),
        "wall_s": metrics[-1]["elapsed_s"] if metrics else 0.0,
        "num_parameters": n_params,
        "rejected_updates": int(sum(m.get("rejected_updates", 0) for m in metrics)),
        "dropped_clients": int(sum(m.get("dropped_clients", 0) for m in metrics)),
        "config": dict(config),
    }


def _plot(run_dir: RunDir, metrics: list[dict[str, Any]]) -> None:
    """accuracy.png: accuracy against round and against cumulative uplink MB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [m["round"] for m in metrics]
    accs = [m["accuracy"] for m in metrics]
    cum_mb = np.cumsum([m["uplink_bytes"] for m in metrics]) / 1e6
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(rounds, accs, marker="o")
    ax1.set_xlabel("round")
    ax1.set_ylabel("test accuracy")
    ax1.grid(alpha=0.3)
    ax2.plot(cum_mb, accs, marker="o")
    ax2.set_xlabel("cumulative uplink MB")
    ax2.set_ylabel("test accuracy")
    ax2.grid(alpha=0.3)
    fig.suptitle(str(run_dir.path.name))
    fig.tight_layout()
    fig.savefig(run_dir.file("accuracy.png"), dpi=100)
    plt.close(fig)
