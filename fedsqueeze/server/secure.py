"""Server side of secure aggregation: one training round driven through SecAgg+.

``secure_train_round`` replaces the plain "send train messages, decode replies" phase when
``secagg = true``. Every stage goes through the round's :class:`CountingGrid` view, so the
uplink/downlink byte counts include the whole protocol::

    setup (= the train message)  → public keys        SecAggServer.collect_keys
    share (neighbours' keys)     → encrypted shares    SecAggServer.collect_shares
    mask  (shares for me)        → masked input        SecAggServer.collect_masked
    unmask (who survived)        → shares to unmask    SecAggServer.finish

The server learns only the sum over the clients whose masked input was included; it
divides it by the summed weights (hidden inside the vector) or, under DP, by
``clients-per-round``, and hands ``global + mean delta`` to the wrapped Flower strategy as
a single reply, exactly like :class:`~fedsqueeze.server.strategy.CompressedStrategy` does
for central DP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedsqueeze.client.secure import (
    MASK,
    REPLY_KEY,
    SETUP,
    SHARE,
    STAGE_KEY,
    UNMASK,
    WIRE_FIELD,
    IntegerEncoding,
    SecureConfigError,
    SecureWireError,
    choose_encoding,
    decode_integers,
    flatten,
    randk_fraction,
    randk_positions,
    simulated_dropouts,
    to_fields,
    unflatten,
    unpack_reply,
)
from fedsqueeze.compression.stages import resolve_k
from fedsqueeze.privacy.distributed import center_mod, decode_sum
from fedsqueeze.records import from_record, to_record
from fedsqueeze.secagg import SecAggAbort, SecAggConfig, SecAggServer, from_field
from fedsqueeze.server.grid import CountingGrid
from fedsqueeze.server.rounds import TrainOutcome
from fedsqueeze.server.strategy import CompressedStrategy, all_finite, round_seed

log = logging.getLogger(__name__)

RANDK_STREAM, ROTATION_STREAM = 2, 3
_weight_caps: dict[tuple[Any, ...], int] = {}


def weight_cap(config: Mapping[str, Any]) -> int:
    """Largest client training-set size of the federation (bounds the hidden weight n_i)."""
    from fedsqueeze.federation import partitions_for

    key = tuple(
        config[k]
        for k in (
            "dataset",
            "partition",
            "num-clients",
            "seed",
            "dirichlet-alpha",
            "shards-per-client",
        )
    )
    if key not in _weight_caps:
        _weight_caps[key] = max(1, max(len(p) for p in partitions_for(config)))
    return _weight_caps[key]


def protocol_params(config: Mapping[str, Any], num_clients: int) -> tuple[int, int]:
    """(neighbours k, threshold t) for ``num_clients``: ``secagg-*`` or the defaults
    (full graph; the smallest threshold safe against a server lying about dropouts)."""
    n = num_clients
    k = int(config["secagg-neighbours"]) or n - 1
    k = min(k, n - 1)
    if (n * k) % 2:  # no k-regular graph on n nodes: take one more neighbour (or one fewer)
        k = k + 1 if k + 1 <= n - 1 else k - 1
    t = int(config["secagg-threshold"]) or SecAggConfig.min_secure_threshold(k)
    return k, min(t, k + 1)


def _encoding_fields(
    config: Mapping[str, Any],
    privacy: Any,
    n: int,
    sub_dim: int,
) -> tuple[dict[str, Any], int, int, IntegerEncoding | None, Any]:
    """Per-round glue fields for clients; returns (fields, bits, vector_len, enc, dp_params)."""
    mode = "plain" if privacy is None or privacy.mode == "local" else str(privacy.mode)
    fields: dict[str, Any] = {"secagg-mode": mode}
    if mode == "distributed":
        params = privacy.distributed_params(sub_dim, n)
        if int(config["secagg-bits"]) and int(config["secagg-bits"]) != params.bits:
            log.warning(
                "secagg-bits = %s ignored: distributed DP uses dp-bits = %d",
                config["secagg-bits"],
                params.bits,
            )
        fields.update(
            {
                "dp.dim": params.dim,
                "dp.clip": float(params.clip),
                "dp.scale": float(params.scale),
                "dp.bits": params.bits,
                "dp.num_clients": params.num_clients,
                "dp.noise_multiplier": float(params.noise_multiplier),
                "dp.mechanism": str(params.mechanism),
                "dp.conditional_rounding": bool(params.conditional_rounding),
                "dp.beta": float(params.beta),
            }
        )
        return fields, params.bits, params.padded_dim, None, params
    central = mode == "central"
    enc = choose_encoding(
        num_clients=n,
        clip=float(privacy.clip) if central else float(config["secagg-clip"]),
        bits=int(config["secagg-bits"]),
        scale=float(config["secagg-scale"]),
        weighted=not central,
        weight_cap=1 if central else weight_cap(config),
    )
    fields.update(
        {
            "secagg-clip": enc.clip,
            "secagg-scale": enc.scale,
            "secagg-weighted": enc.weighted,
            "secagg-weight-cap": enc.weight_cap,
        }
    )
    return fields, enc.bits, sub_dim + (1 if enc.weighted else 0), enc, None


def _stage_message(node: int, rnd: int, stage: str, fields: Mapping[str, Any]) -> Message:
    cfg = ConfigRecord({"secagg": True, STAGE_KEY: stage, "server-round": rnd})
    cfg.update(to_fields(fields))
    return Message(
        content=RecordDict({"config": cfg}), message_type=MessageType.TRAIN, dst_node_id=node
    )


def _collect(
    replies: list[Message], stage: str, requests: Mapping[int, Mapping[str, Any]]
) -> tuple[dict[int, dict[str, Any]], list[Message]]:
    """Stage replies by node, in the core's form; error replies count as dropouts.

    A reply whose wire form does not fit the request (:func:`unpack_reply`) reaches the core
    as an empty message, so the core rejects that client and lists it in ``rejected``.
    """
    out: dict[int, dict[str, Any]] = {}
    ok: list[Message] = []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error() or REPLY_KEY not in reply.content.config_records:
            continue
        blob = reply.content.config_records[REPLY_KEY].get(WIRE_FIELD)
        try:
            if not isinstance(blob, bytes):
                raise SecureWireError(f"field {WIRE_FIELD!r} is not bytes")
            out[node] = unpack_reply(stage, blob, requests.get(node, {}))
        except SecureWireError as exc:
            log.warning("client %d: malformed %s reply (%s); rejected", node, stage, exc)
            out[node] = {}
        ok.append(reply)
    return out, ok


def secure_train_round(
    view: CountingGrid,
    rnd: int,
    arrays: dict[str, np.ndarray],
    config: Mapping[str, Any],
    strategy: CompressedStrategy,
    privacy: Any,
    node_timeout: float,
) -> TrainOutcome:
    """One training phase under SecAgg+ (see the module docstring)."""
    t_start = time.perf_counter()
    nodes = sorted(view.node_ids or view.get_node_ids())
    n = len(nodes)
    if n < 2:
        raise SecureConfigError(f"secure aggregation needs >= 2 clients in a round, got {n}")
    seed = int(config["seed"])
    d = int(sum(a.size for a in arrays.values()))
    amount = randk_fraction(config)
    randk_seed = round_seed(seed, rnd, RANDK_STREAM)
    rotation_seed = round_seed(seed, rnd, ROTATION_STREAM)
    positions = randk_positions(d, amount, randk_seed)
    sub_dim = d if positions is None else resolve_k(amount, d)
    glue, bits, vector_len, enc, dp_params = _encoding_fields(config, privacy, n, sub_dim)
    k, t = protocol_params(config, n)
    sa_config = SecAggConfig(
        num_clients=n,
        neighbours=k,
        threshold=t,
        bits=bits,
        vector_len=vector_len,
        round_seed=round_seed(seed, rnd, 4),
    )
    server = SecAggServer(sa_config, nodes)
    drops = simulated_dropouts(seed, rnd, nodes, float(config["simulate-dropout"]))
    glue.update(
        {
            "secagg-dim": d,
            "secagg-randk": amount,
            "secagg-randk-seed": randk_seed,
            "secagg-rotation-seed": rotation_seed,
        }
    )
    extra: dict[str, Any] = {
        "secagg_bits": bits,
        "secagg_vector_len": vector_len,
        "secagg_neighbours": k,
        "secagg_threshold": t,
    }

    # Stage 0/1: the train message carries the setup; the reply carries the public keys.
    setup = server.setup()
    messages = list(strategy.configure_train(rnd, to_record(arrays), ConfigRecord(), view))
    for msg in messages:
        node = msg.metadata.dst_node_id
        cfg = ConfigRecord(dict(msg.content.config_records.get("config", ConfigRecord())))
        cfg.update(glue)
        cfg.update({"secagg": True, STAGE_KEY: SETUP, "server-round": rnd})
        cfg["secagg-drop-stage"] = drops.get(node, "")
        cfg.update(to_fields(setup[node]))
        content = RecordDict(dict(msg.content.items()))
        content["config"] = cfg
        msg.content = content
    replies = list(view.send_and_receive(messages, timeout=node_timeout))
    keys, ok = _collect(replies, SETUP, {})
    losses = []
    client_metrics: list[dict[str, float]] = []
    for reply in ok:
        metrics = reply.content.metric_records.get("metrics")
        if metrics is not None:
            row = {k2: float(v) for k2, v in metrics.items() if isinstance(v, int | float)}
            client_metrics.append(row)
            if "train-loss" in row:
                losses.append(row["train-loss"])
    template = ok[0] if ok else None
    t_train = time.perf_counter()
    unmask_s = 0.0

    def exchange(stage: str, requests: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        messages = [_stage_message(v, rnd, stage, m) for v, m in requests.items()]
        replies = list(view.send_and_receive(messages, timeout=node_timeout))
        return _collect(replies, stage, requests)[0]

    try:
        shares = exchange(SHARE, server.collect_keys(keys))
        masked = exchange(MASK, server.collect_shares(shares))
        out = server.collect_masked(masked)
        answers = exchange(UNMASK, out)
        t_unmask = time.perf_counter()
        result = server.finish(answers)
        unmask_s = time.perf_counter() - t_unmask
    except SecAggAbort as exc:
        log.warning("round %d: %s; global model kept", rnd, exc)
        extra.update({"secagg_aborted": 1, "secagg_s": round(time.perf_counter() - t_train, 4)})
        return TrainOutcome(
            arrays=None,
            accepted=0,
            rejected=len(server.rejected),
            dropped=n - len(server.rejected),
            train_loss=float(np.mean(losses)) if losses else None,
            client_metrics=client_metrics,
            extra=extra,
        )
    included = result.included
    extra.update(
        {
            "secagg_included": len(included),
            # Sent the masked input (so it is in the sum) but not its unmasking shares.
            "secagg_late_dropouts": len(set(out) - set(answers)),
            "secagg_unmask_s": round(unmask_s, 4),
            "secagg_s": round(time.perf_counter() - t_train, 4),
            "secagg_round_s": round(time.perf_counter() - t_start, 4),
        }
    )
    if result.rejected:
        log.warning("round %d: secagg rejected %s", rnd, result.rejected)

    per_round = int(config["clients-per-round"])
    dp_released = False  # the server has seen a DP-noised sum (accounted even if unusable)
    if dp_params is not None:
        centered = center_mod(result.total.astype(np.int64), bits)
        sub_sum = decode_sum(centered, len(included), dp_params, rotation_seed)
        dp_released = True
        sub_mean = sub_sum / per_round
        extra["effective_noise_multiplier"] = float(
            dp_params.effective_noise_multiplier(len(included))
        )
    else:
        assert enc is not None
        values, total_weight = decode_integers(from_field(result.total, bits), enc)
        if enc.weighted:
            if total_weight <= 0:
                log.warning("round %d: summed weight is %d; global model kept", rnd, total_weight)
                return TrainOutcome(arrays=None, dropped=n - len(included), extra=extra)
            sub_mean = values * enc.weight_cap / total_weight
        else:
            noised = privacy.noise_secure_sum(
                values, np.random.default_rng([int(config["seed"]), rnd, 0xD9])
            )
            dp_released = True
            sub_mean = np.asarray(noised, dtype=np.float64) / per_round
    if positions is None:
        mean_delta = sub_mean
    else:
        mean_delta = np.zeros(d, dtype=np.float64)
        mean_delta[positions] = sub_mean
    delta = unflatten(mean_delta, arrays)
    merged = {name: (arrays[name] + delta[name]).astype(np.float32) for name in arrays}
    new_arrays: dict[str, np.ndarray] | None = None
    if template is not None and all_finite(merged):
        metrics = MetricRecord({"num-examples": 1})
        if losses:
            metrics["train-loss"] = float(np.mean(losses))
        template.content = RecordDict({"arrays": to_record(merged), "metrics": metrics})
        agg, _ = strategy.inner.aggregate_train(rnd, [template])
        if agg is not None:
            candidate = from_record(agg)
            new_arrays = candidate if all_finite(candidate) else None
    if new_arrays is None:
        log.warning("round %d: secure aggregate unusable; global model kept", rnd)
    rejected = set(result.rejected) & set(result.dropped)
    return TrainOutcome(
        arrays=new_arrays,
        accepted=len(included),
        rejected=len(rejected),
        dropped=len(result.dropped) - len(rejected),
        train_loss=float(np.mean(losses)) if losses else None,
        client_metrics=client_metrics,
        extra=extra,
        dp_released=dp_released,
    )


__all__ = ["flatten", "protocol_params", "secure_train_round", "weight_cap"]
