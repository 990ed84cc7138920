"""The server's round loop: sample, train, aggregate, evaluate, account bytes, checkpoint.

Flower's ``Strategy.start`` runs a fixed loop from round 1; fedsqueeze needs to resume
from a checkpoint, sample reproducibly and count every byte, so it drives the same
strategy methods (``configure_train``/``aggregate_train``/...) in its own loop.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsqueeze.client.training import evaluate, load_numpy_state, state_to_numpy
from fedsqueeze.config import to_toml
from fedsqueeze.data import partition_stats
from fedsqueeze.federation import dataset_for, new_model, partitions_for
from fedsqueeze.records import from_record, to_record
from fedsqueeze.server.grid import CountingGrid
from fedsqueeze.server.privacy import build_server_privacy
from fedsqueeze.server.rundir import CLIENTS, CONFIG, SUMMARY, Checkpoint, RunDir
from fedsqueeze.server.strategies import build_strategy
from fedsqueeze.server.strategy import CompressedStrategy

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]

CRASH_ENV = "FEDSQUEEZE_CRASH_AFTER_ROUND"
"""Fault injection for tests: SIGKILL the server process right after this round's checkpoint."""


class FederationError(RuntimeError):
    """The federation cannot proceed (e.g. the expected nodes never connected)."""


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """Block until ``count`` nodes are connected; return their ids."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} of {count} nodes connected within {timeout:.0f} s"
            )
        time.sleep(0.5)


def handshake(grid: Grid, num_clients: int, timeout: float) -> dict[int, int]:
    """Ask every node for its partition id; return ``{partition_id: node_id}``."""
    nodes = wait_for_nodes(grid, num_clients, timeout)
    messages = [
        Message(
            content=RecordDict({"config": ConfigRecord()}),
            message_type=MessageType.QUERY,
            dst_node_id=n,
        )
        for n in nodes
    ]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            raise FederationError(
                f"node {reply.metadata.src_node_id} failed the handshake: {reply.error.reason}"
            )
        info = reply.content["node"]
        if int(info["num-partitions"]) != num_clients:
            raise FederationError(
                f"node {reply.metadata.src_node_id} says num-partitions="
                f"{info['num-partitions']}, but num-clients={num_clients}"
            )
        mapping[int(info["partition-id"])] = reply.metadata.src_node_id
    if sorted(mapping) != list(range(num_clients)):
        raise FederationError(f"expected partition ids 0..{num_clients - 1}, got {sorted(mapping)}")
    return mapping


def sample_partitions(seed: int, server_round: int, num_clients: int, k: int) -> list[int]:
    """The partitions trained in a round: reproducible from (seed, round)."""
    rng = np.random.default_rng([seed, server_round, 0xC11E])
    return sorted(int(p) for p in rng.choice(num_clients, size=k, replace=False))


@dataclass
class TrainOutcome:
    """What the training phase of one round produced."""

    arrays: dict[str, np.ndarray] | None
    """The new global model, or None to keep the current one."""
    accepted: int = 0
    rejected: int = 0
    dropped: int = 0
    """Sampled clients that sent nothing usable: errors, time-outs, protocol drop-outs."""
    train_loss: float | None = None
    client_metrics: list[dict[str, float]] = field(default_factory=list)
    """Each accepted client's train MetricRecord (e.g. a local-DP client's epsilon)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """More per-round fields for metrics.jsonl (e.g. the secure-aggregation bit width)."""
    dp_released: bool = False
    """The server computed a DP-noised aggregate this round, even if it then dropped it
    (non-finite): the server saw it, so the privacy accountant charges the round."""


def plain_train_round(
    strategy: CompressedStrategy,
    view: CountingGrid,
    server_round: int,
    arrays: dict[str, np.ndarray],
    timeout: float,
) -> TrainOutcome:
    """One training phase without secure aggregation: any reply may be (de)compressed."""
    messages = strategy.configure_train(server_round, to_record(arrays), ConfigRecord(), view)
    replies = view.send_and_receive(messages, timeout=timeout)
    # Aggregate in partition order, not arrival order: float sums depend on the order,
    # and a run must be repeatable (and resumable) bit for bit.
    order = {node: i for i, node in enumerate(view.node_ids or [])}
    replies = sorted(replies, key=lambda m: order.get(m.metadata.src_node_id, len(order)))
    agg, train_metrics = strategy.aggregate_train(server_round, replies)
    stats = strategy.stats
    loss = None
    if train_metrics is not None and "train-loss" in train_metrics:
        loss = float(train_metrics["train-loss"])
    return TrainOutcome(
        arrays=from_record(agg) if agg is not None else None,
        accepted=stats.accepted,
        rejected=stats.rejected,
        dropped=stats.failed + (len(view.node_ids or []) - stats.replies),
        train_loss=loss,
        client_metrics=stats.client_metrics,
        dp_released=stats.aggregator_applied,
    )


def _param_count(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(a.size for a in arrays.values()))


def run_federation(
    grid: Grid,
    config: Mapping[str, Any],
    run_dir: RunDir,
    on_round: RoundCallback | None = None,
    node_timeout: float = 600.0,
) -> dict[str, Any]:
    """Run (or continue) the federation described by ``config``; return the summary."""
    num_clients = int(config["num-clients"])
    k = int(config["clients-per-round"])
    seed = int(config["seed"])
    num_rounds = int(config["num-rounds"])
    ds = dataset_for(config)

    t_setup = time.monotonic()
    partition_nodes = handshake(grid, num_clients, node_timeout)

    inner = build_strategy(config)
    ckpt = run_dir.load_checkpoint()
    if ckpt is None:
        model = new_model(config, seed=seed)
        arrays = state_to_numpy(model)
        metrics: list[dict[str, Any]] = []
        start_round = 1
        elapsed = 0.0
        run_dir.write_text(CONFIG, to_toml(config))
        parts = partitions_for(config)
        run_dir.write_json(CLIENTS, partition_stats(ds, parts))
    else:
        model = new_model(config)
        arrays = ckpt.arrays
        inner = pickle.loads(ckpt.strategy_state)
        metrics = list(ckpt.metrics)
        start_round = ckpt.completed_round + 1
        elapsed = float(ckpt.extra.get("elapsed_s", 0.0))
        run_dir.write_metrics(metrics)  # drop any row written after the checkpoint
        log.info("resuming after round %d", ckpt.completed_round)

    privacy = build_server_privacy(config, ckpt.extra.get("privacy") if ckpt else None)
    strategy = CompressedStrategy(
        inner,
        codec=str(config["codec"]),
        downlink_codec=str(config["downlink-codec"]),
        seed=seed,
        aggregator=privacy.aggregator() if privacy is not None else None,
    )
    n_params = _param_count(arrays)
    fp32_bytes = 4 * n_params
    elapsed += time.monotonic() - t_setup
    stopped_reason = ""

    for rnd in range(start_round, num_rounds + 1):
        if privacy is not None:
            refusal = privacy.refuse_round(rnd)
            if refusal:
                stopped_reason = refusal
                log.warning("stopping before round %d: %s", rnd, refusal)
                break
        t0 = time.monotonic()
        sampled = sample_partitions(seed, rnd, num_clients, k)
        view = CountingGrid(grid, [partition_nodes[p] for p in sampled])
        if bool(config["secagg"]):
            from fedsqueeze.server.secure import secure_train_round

            outcome = secure_train_round(view, rnd, arrays, config, strategy, privacy, node_timeout)
        else:
            outcome = plain_train_round(strategy, view, rnd, arrays, node_timeout)
        if outcome.arrays is not None:
            arrays = outcome.arrays

        row: dict[str, Any] = {"round": rnd}
        if float(config["fraction-evaluate"]) > 0:
            n_eval = max(1, round(float(config["fraction-evaluate"]) * num_clients))
            eval_parts = sample_partitions(seed + 1, rnd, num_clients, n_eval)
            eval_view = CountingGrid(grid, [partition_nodes[p] for p in eval_parts])
            eval_msgs = strategy.configure_evaluate(
                rnd, to_record(arrays), ConfigRecord(), eval_view
            )
            eval_metrics = strategy.aggregate_evaluate(
                rnd, eval_view.send_and_receive(eval_msgs, timeout=node_timeout)
            )
            view.downlink_bytes += eval_view.downlink_bytes
            view.uplink_bytes += eval_view.uplink_bytes
            if eval_metrics is not None:
                row["federated_accuracy"] = float(eval_metrics.get("eval-acc", float("nan")))

        load_numpy_state(model, arrays)
        loss, acc = evaluate(model, ds.x_test, ds.y_test)
        wall = time.monotonic() - t0
        elapsed += wall
        uplink_payload = max(outcome.accepted + outcome.rejected, 1)
        row.update(
            {
                "accuracy": acc,
                "loss": loss,
                "uplink_bytes": view.uplink_bytes,
                "downlink_bytes": view.downlink_bytes,
                "wall_s": round(wall, 4),
                "elapsed_s": round(elapsed, 4),
                "clients": outcome.accepted,
                "rejected_updates": outcome.rejected,
                "dropped_clients": outcome.dropped,
                "uplink_compression": fp32_bytes * uplink_payload / max(view.uplink_bytes, 1),
                "uplink_bits_per_param": 8 * view.uplink_bytes / (uplink_payload * n_params),
                "downlink_bits_per_param": 8
                * view.downlink_bytes
                / (max(len(sampled), 1) * n_params),
            }
        )
        if outcome.train_loss is not None:
            row["train_loss"] = outcome.train_loss
        row.update(outcome.extra)
        if privacy is not None:
            row.update(privacy.after_round(rnd, outcome))
        metrics.append(row)
        run_dir.save_checkpoint(
            Checkpoint(
                completed_round=rnd,
                arrays=arrays,
                strategy_state=pickle.dumps(inner),
                metrics=metrics,
                extra={
                    "elapsed_s": elapsed,
                    "privacy": privacy.state() if privacy is not None else None,
                },
            )
        )
        run_dir.write_metrics(metrics)
        run_dir.save_model(arrays)
        if on_round is not None:
            on_round(row)
        if os.environ.get(CRASH_ENV) == str(rnd):
            os.kill(os.getpid(), 9)

    summary = summarize(metrics, config, n_params)
    if stopped_reason:
        summary["stopped_reason"] = stopped_reason
    if privacy is not None:
        summary.update(privacy.summary())
    run_dir.write_json(SUMMARY, summary)
    run_dir.save_model(arrays)
    _plot(run_dir, metrics)
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
        "num_rounds": len(metrics),
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
