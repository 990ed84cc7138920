"""The strategy chain a run config describes: a stock Flower strategy inside fedsqueeze's
public wrappers, assembled exactly as a plain Flower app would assemble them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fedsqueeze.compression import parse_codec
from fedsqueeze.compression.dgc import DGCOptions
from fedsqueeze.compression.stages import ErrorFeedback, Sketch
from fedsqueeze.contracts.architectures import parse_client_models
from fedsqueeze.contracts.checks import ConfigError, randk_fraction
from fedsqueeze.federation import devices_bring_data, partitions_for
from fedsqueeze.privacy import default_delta
from fedsqueeze.server.adapters import adapters_from_config
from fedsqueeze.server.distill import with_distill
from fedsqueeze.server.dp import CentralDP, DistributedDP, LocalDP
from fedsqueeze.server.feedback import server_feedback_from_config
from fedsqueeze.server.hetero import ClientModels, HeteroStrategy
from fedsqueeze.server.layers import with_train_layers
from fedsqueeze.server.lowrank import lowrank_from_config
from fedsqueeze.server.pruning import pruning_from_config
from fedsqueeze.server.qat import qat_from_config
from fedsqueeze.server.secure import SecAggStrategy, protocol_params
from fedsqueeze.server.strategy import CompressedStrategy


def build_strategy(config: Mapping[str, Any]) -> Strategy:
    """A stock Flower strategy that trains on every node the round's grid view shows.

    fedsqueeze samples the round's clients itself (by seed, or secretly under DP) and shows
    the strategy only those, so ``fraction_train=1`` and no minimums: a round that leaves out
    busy or disconnected clients shows fewer (even none), and Flower's sampler would wait
    forever for the missing ones (``min-clients`` judges the round instead).
    """
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": 0,
        "min_evaluate_nodes": 0,
        "min_available_nodes": 0,
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
    # Robust aggregators: CompressedStrategy hands them decoded (and norm-bounded) updates.
    f, k = int(config["byzantine-clients"]), int(config["clients-per-round"])
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common)
    if name == "krum":
        return Krum(**common, num_malicious_nodes=f)
    if name == "multikrum":
        return MultiKrum(**common, num_malicious_nodes=f, num_nodes_to_select=max(1, k - f))
    if name == "bulyan":
        return Bulyan(**common, num_malicious_nodes=f)
    raise ConfigError(f"unknown strategy {name!r}")


def weight_cap(config: Mapping[str, Any]) -> int | None:
    """Largest client training-set size of the federation (bounds the hidden weight n_i).

    With devices' own data the server knows no sizes: ``client-max-examples`` (None when 0:
    no cap on a claimed weight; unweighted under SecAgg)."""
    if devices_bring_data(config):
        return int(config["client-max-examples"]) or None
    return max(1, max(len(p) for p in partitions_for(config)))


def _dp_wrapper(inner: Strategy, config: Mapping[str, Any]) -> Strategy:
    mode = str(config["dp"])
    if mode not in ("central", "distributed"):
        return inner
    common: dict[str, Any] = {
        "clip": float(config["dp-clip"]),
        "clients_per_round": int(config["clients-per-round"]),
        "num_clients": int(config["num-clients"]),
        "noise_multiplier": float(config["dp-noise-multiplier"]),
        "epsilon": float(config["dp-epsilon"]),
        "num_rounds": int(config["num-rounds"]),
        "delta": float(config["dp-delta"]),
        "accountant": str(config["dp-accountant"]),
    }
    if mode == "central":
        quantile = float(config["dp-target-quantile"]) if config["dp-adaptive-clip"] else 0.0
        # The noise is secret (OS entropy, key in the private checkpoint), never the seed.
        return CentralDP(inner, adaptive_quantile=quantile, **common)
    # The budget check assumes the worst round SecAgg+ accepts: only t clients' noise.
    _, threshold = protocol_params(
        int(config["secagg-neighbours"]),
        int(config["secagg-threshold"]),
        int(config["clients-per-round"]),
    )
    return DistributedDP(
        inner,
        bits=int(config["dp-bits"]),
        mechanism=str(config["dp-mechanism"]),
        min_contributors=threshold,
        randk=randk_fraction(config),
        sketch=_sketch(config),
        **common,
    )


def _sketch(config: Mapping[str, Any]) -> Sketch | None:
    codec = parse_codec(str(config["codec"]))
    return codec.sparsifier if isinstance(codec.sparsifier, Sketch) else None


def _secure(inner: Strategy, config: Mapping[str, Any]) -> Strategy:
    codec = parse_codec(str(config["codec"]))
    weighted = str(config["dp"]) == "none"  # under DP the mean is unweighted
    return SecAggStrategy(
        inner,
        clip=float(config["secagg-clip"]),
        bits=int(config["secagg-bits"]),
        scale=float(config["secagg-scale"]),
        neighbours=int(config["secagg-neighbours"]),
        threshold=int(config["secagg-threshold"]),
        weight_cap=(weight_cap(config) or 0) if weighted else 0,
        randk=randk_fraction(config),
        error_feedback=isinstance(codec.feedback, ErrorFeedback),
        sketch=_sketch(config),
        hadamard=(codec.rotation, codec.quantizer.bits) if codec.rotation is not None else None,
        seed=int(config["seed"]),
        timeout=float(config["node-timeout"]),
        simulate_dropout=float(config["simulate-dropout"]),
    )


def build_chain(config: Mapping[str, Any], inner: Strategy | None = None) -> Strategy:
    """``inner`` (or :func:`build_strategy`) wrapped as the run config says:
    ``[TrainLayers]([LocalDP]([AdapterStrategy]([QATStrategy]([LowRankStrategy]([PruningStrategy](CompressedStrategy([SecAggStrategy]([ServerFeedback]([CentralDP|DistributedDP](inner))))))))))``."""
    inner = inner if inner is not None else build_strategy(config)
    if config["client-models"]:
        strategy: Strategy = _heterogeneous(inner, config)
    else:
        strategy = _homogeneous(inner, config)
    strategy = pruning_from_config(strategy, config)
    strategy = lowrank_from_config(strategy, config)
    strategy = qat_from_config(strategy, config)
    strategy = adapters_from_config(strategy, config)
    if str(config["dp"]) == "local":
        delta = float(config["dp-delta"]) or default_delta(int(config["num-clients"]))
        strategy = LocalDP(strategy, accountant=str(config["dp-accountant"]), delta=delta)
    return with_train_layers(strategy, config)


def _compressed(inner: Strategy, config: Mapping[str, Any], secagg: bool = False) -> Strategy:
    return CompressedStrategy(
        inner,
        codec="none" if secagg else str(config["codec"]),
        downlink_codec=str(config["downlink-codec"]),
        seed=int(config["seed"]),
        max_update_norm=float(config["max-update-norm"]),
        norm_factor=float(config["update-norm-factor"]),
        max_weight=weight_cap(config),
        warmup=(int(config["dgc-warmup-rounds"]), float(config["dgc-warmup-start"])),
        client_options=DGCOptions(
            momentum=float(config["dgc-momentum"]),
            masking=bool(config["dgc-masking"]),
            clip=float(config["dgc-clip"]),
        ),
    )


def _heterogeneous(inner: Strategy, config: Mapping[str, Any]) -> Strategy:
    """One ``CompressedStrategy(ClientModels(...))`` per ``client-models`` architecture; the
    run's ``model`` gets ``inner`` (whose state is checkpointed), the others a fresh copy."""
    main = str(config["model"])
    members = {
        name: _compressed(ClientModels(inner if name == main else build_strategy(config)), config)
        for name, _ in parse_client_models(str(config["client-models"]))
    }
    return HeteroStrategy(members, config)


def _homogeneous(inner: Strategy, config: Mapping[str, Any]) -> Strategy:
    strategy = _dp_wrapper(inner, config)
    strategy = server_feedback_from_config(strategy, config)
    secagg = bool(config["secagg"])
    if secagg:
        strategy = _secure(strategy, config)
    strategy = with_distill(strategy, config)  # inside: sees decoded replies / the release
    return _compressed(strategy, config, secagg)
