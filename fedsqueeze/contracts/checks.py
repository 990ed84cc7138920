"""Which run configurations can run: checks shared by the CLI, the ServerApp and the glue.

Each check reads the flat run config (``fedsqueeze.config``) and raises :class:`ConfigError`
naming the key that is wrong, before anything starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsqueeze.compression import parse_codec
from fedsqueeze.compression.errors import CodecError
from fedsqueeze.compression.stages import ErrorFeedback, Hadamard, Quantize, RandomK, Sketch
from fedsqueeze.contracts.summable import EncodingError, choose_integer_encoding
from fedsqueeze.secagg import SecAggConfig, SecAggConfigError
from fedsqueeze.secagg.config import DEFAULT_DROPOUT, protocol_params

MAX_NOISE_MULTIPLIER = 1e6
"""Largest ``dp-noise-multiplier``: at 1e6 epsilon is already ~0; far above it Opacus' RDP
accountant overflows (near 1e154) and the central noise grid leaves int64 (near 3e13/sqrt(d))."""

MAX_EPSILON = 1000.0
"""Largest ``dp-epsilon`` budget: beyond it DP means nothing, and the noise calibration's
search never ends for a budget of 1e308."""


MAX_MODEL_PARAMETERS = 100_000_000
"""Largest model a run may build: 400 MB per float32 copy, and the server holds one per reply
of a round (the models here have 10^3-10^5). Far above it a configuration is a mistake — a
stray feature dimension or class count in a dataset — that would otherwise allocate gigabytes
in every process before failing."""


class ConfigError(ValueError):
    """A run-config key or value a user supplied is invalid."""


class SecureConfigError(ConfigError):
    """The run config asks for a secure-aggregation setup that cannot work."""


def check_run_config(config: Mapping[str, Any]) -> None:
    """Every cross-key check (single keys are checked by ``fedsqueeze.config``'s schema)."""
    check_secure_config(config)
    check_dp_config(config)
    check_liveness_config(config)
    check_prune_config(config)
    check_lowrank_config(config)
    check_adapter_config(config)
    check_qat_config(config)
    check_distill_config(config)
    check_robust_config(config)
    check_retrain_config(config)


def check_retrain_config(config: Mapping[str, Any]) -> None:
    """``train-layers`` restricts what travels; pruning's mask covers the whole model."""
    layers = str(config.get("train-layers", "all")).strip()
    if layers != "all" and str(config.get("prune", "none")) != "none":
        raise ConfigError(f"train-layers = {layers!r} cannot be combined with prune")
    path = str(config.get("init-model", "") or "")
    if path and not Path(path).expanduser().exists():
        raise ConfigError(f"init-model = {path!r}: file not found")


def check_model_size(num_parameters: int, model: str = "the model") -> None:
    """Refuse a model with more than :data:`MAX_MODEL_PARAMETERS` parameters (counted before
    it is allocated: ``fedsqueeze simulate`` builds it on torch's meta device first)."""
    if num_parameters > MAX_MODEL_PARAMETERS:
        raise ConfigError(
            f"model = {model!r} would have {num_parameters:,} parameters "
            f"({num_parameters * 4 / 1e9:.1f} GB in float32), more than {MAX_MODEL_PARAMETERS:,}: "
            "check the dataset's feature shape and labels"
        )


ROBUST_MIN_CLIENTS = {"krum": (2, 3), "multikrum": (2, 3), "bulyan": (4, 3)}
"""Byzantine-robust rules: clients-per-round must be at least a * f + b (Flower's checks)."""


def check_robust_config(config: Mapping[str, Any]) -> None:
    """A robust aggregator needs enough clients per round for the f it tolerates, and
    aggregates individual updates (not a secure sum)."""
    name = str(config.get("strategy", "fedavg"))
    robust = name in (*ROBUST_MIN_CLIENTS, "fedmedian", "fedtrimmedavg")
    if robust and bool(config.get("secagg", False)):
        raise ConfigError(f"strategy = {name!r} needs individual updates; secagg hides them")
    if name in ROBUST_MIN_CLIENTS:
        a, b = ROBUST_MIN_CLIENTS[name]
        f, n = int(config.get("byzantine-clients", 1)), int(config.get("clients-per-round", 2))
        if n < a * f + b:
            raise ConfigError(
                f"strategy = {name!r} with byzantine-clients = {f} needs clients-per-round "
                f">= {a * f + b}, got {n}"
            )


def check_liveness_config(config: Mapping[str, Any]) -> None:
    """``min-clients`` must be reachable: no round samples more than ``clients-per-round``."""
    need, k = int(config.get("min-clients", 1)), int(config.get("clients-per-round", 1))
    if need > k:
        raise ConfigError(f"min-clients = {need} exceeds clients-per-round = {k}")


def randk_fraction(config: Mapping[str, Any]) -> float | int:
    """The random-k amount of a secure run: ``secagg-randk`` or the codec's ``randk(F)``."""
    frac: float | int = float(config.get("secagg-randk", 1.0))
    try:
        codec = parse_codec(str(config.get("codec", "none")))
    except CodecError:
        return frac
    if isinstance(codec.sparsifier, RandomK):
        amount = codec.sparsifier.amount
        if frac < 1.0 and amount != frac:
            raise SecureConfigError(
                f"codec {codec.spec!r} and secagg-randk = {frac} both set random-k; use one"
            )
        return amount
    return frac


def _sketch_stage(config: Mapping[str, Any]) -> Sketch | None:
    try:
        codec = parse_codec(str(config.get("codec", "none")))
    except CodecError:
        return None
    return codec.sparsifier if isinstance(codec.sparsifier, Sketch) else None


def _rotation_stage(config: Mapping[str, Any]) -> Hadamard | None:
    try:
        return parse_codec(str(config.get("codec", "none"))).rotation
    except CodecError:
        return None


def check_secure_config(config: Mapping[str, Any]) -> None:
    """Refuse run configs secure aggregation cannot honour, naming the culprit.

    Raises
    ------
    SecureConfigError
        ``dp = "distributed"`` without ``secagg``; under ``secagg`` a codec stage that is not
        linear with integer output (the secure path integerizes itself), fewer than two
        clients per round, conflicting random-k settings, or a bit width that overflows.
    """
    secagg = bool(config.get("secagg", False))
    dp = str(config.get("dp", "none"))
    if dp == "distributed" and not secagg:
        raise SecureConfigError(
            'dp = "distributed" needs secagg = true (noise is split among clients)'
        )
    if not secagg:
        if _sketch_stage(config) is not None:
            raise SecureConfigError(
                "codec sketch(F) needs secagg = true (the server unsketches the secure sum)"
            )
        if _rotation_stage(config) is not None:
            raise SecureConfigError(
                "codec hadamard+qB needs secagg = true (the server inverse-rotates the secure "
                "sum); on the plain path use qB or qsgdB"
            )
        if float(config.get("simulate-dropout", 0.0)) > 0:
            raise SecureConfigError(
                "simulate-dropout needs secagg = true (it drops protocol stages)"
            )
        return
    n = int(config.get("clients-per-round", 2))
    if n < 2:
        raise SecureConfigError(f"secagg needs clients-per-round >= 2, got {n}")
    codec = parse_codec(str(config.get("codec", "none")))
    if isinstance(codec.sparsifier, Sketch) and (codec.feedback is not None or dp == "central"):
        # Central DP noises the server's sum: the sketch's unsketched step has no clip-bounded
        # sensitivity. Distributed DP noises the clipped sketch itself (SecAggStrategy).
        raise SecureConfigError(
            f"codec {codec.spec!r}: a sketch keeps its error on the server; it takes no "
            '"+ef" and no central dp (use dp = "distributed")'
        )
    if isinstance(codec.sparsifier, Sketch) and float(config.get("secagg-randk", 1.0)) < 1.0:
        raise SecureConfigError(f"codec {codec.spec!r} and secagg-randk both set; use one")
    if isinstance(codec.rotation, Hadamard):
        if dp != "none":
            raise SecureConfigError(
                f'codec {codec.spec!r} is its own integer encoding: not with dp = "{dp}" '
                "(distributed DP already rotates and rounds)"
            )
        if float(config.get("secagg-scale", 0.0)) > 0:
            raise SecureConfigError(
                f"codec {codec.spec!r} sets its own scale (from secagg-clip): no secagg-scale"
            )
    for stage in codec.stages:
        if isinstance(stage, RandomK | ErrorFeedback | Sketch | Hadamard):
            continue
        if isinstance(stage, Quantize) and codec.rotation is not None:
            continue
        if stage.role == "feedback":
            raise SecureConfigError(
                f"codec stage {stage.spec!r} cannot run under secagg = true: the server would "
                "need each client's own state, but it only sees the masked sum; use "
                '"randk(F)+ef" (client-only error feedback)'
            )
        why = (
            "it is not linear (clients' encodings cannot be summed)"
            if not stage.linear
            else "it keeps per-client state or compresses bytes that masking makes uniform"
        )
        raise SecureConfigError(
            f"codec stage {stage.spec!r} cannot run under secagg = true: {why}; the secure "
            "path already clips, scales and rounds to secagg-bits integers — use codec = "
            '"none", "randk(F)", "randk(F)+ef", "sketch(F)" or "hadamard+qB"'
        )
    # Error feedback is allowed with dp = "central" and "local". Central: every round the
    # server sees (and the accountant charges for) the sum of contributions each clipped to
    # dp-clip, plus Gaussian noise; the residual is the client's own data and past public
    # outputs, and client-level DP-FedAvg already allows any client-side function of those
    # as long as the contribution is clipped — the sensitivity per round stays dp-clip.
    # Local: the residual is post-processing of the Opacus-trained (already DP) updates.
    if isinstance(codec.feedback, ErrorFeedback) and dp == "distributed":
        # The distributed-DP encoder rotates and adds each client's noise before rounding;
        # what was "sent" is not separable from that noise without decoding the rotation, and
        # a residual that absorbed the noise would make the client cancel its own noise
        # next round. Not supported until that is worked out.
        raise SecureConfigError(
            'codec error feedback ("+ef") cannot be combined with dp = "distributed" under '
            'secagg; use dp = "central" or drop "+ef"'
        )
    randk_fraction(config)
    neighbours = int(config.get("secagg-neighbours", 0))
    if neighbours > n - 1:
        raise SecureConfigError(
            f"secagg-neighbours = {neighbours} exceeds clients-per-round - 1 = {n - 1}"
        )
    threshold = int(config.get("secagg-threshold", 0))
    if threshold and threshold > (neighbours or n - 1) + 1:
        raise SecureConfigError(
            f"secagg-threshold = {threshold} exceeds neighbours + 1 = {(neighbours or n - 1) + 1}"
        )
    dropout = max(DEFAULT_DROPOUT, float(config.get("simulate-dropout", 0.0)))
    try:
        k, _ = protocol_params(neighbours, threshold, n, dropout)
    except SecAggConfigError as err:
        raise SecureConfigError(f"secagg-neighbours = {neighbours}: {err}") from None
    if threshold and threshold < SecAggConfig.min_secure_threshold(k):
        raise SecureConfigError(
            f"secagg-threshold = {threshold} is below the secure threshold "
            f"{SecAggConfig.min_secure_threshold(k)} for {k} neighbours; clients refuse it"
        )
    if dp != "distributed":
        clip = float(config["dp-clip"]) if dp == "central" else float(config["secagg-clip"])
        # The weight coordinate depends on the partition sizes; checked again per round.
        try:
            choose_integer_encoding(
                dim=1,
                num_clients=n,
                clip=clip,
                bits=int(config.get("secagg-bits", 0)),
                scale=float(config.get("secagg-scale", 0.0)),
            )
        except EncodingError as err:
            raise SecureConfigError(str(err)) from None


def check_dp_config(config: Mapping[str, Any]) -> None:
    """Cheap consistency checks of the ``dp-*`` keys (no accountant is run here).

    Raises
    ------
    ConfigError
        On a DP setting that cannot run; the message names the key.
    """
    mode = str(config["dp"])
    if mode == "none":
        return
    if float(config["dp-noise-multiplier"]) > MAX_NOISE_MULTIPLIER:
        raise ConfigError(
            f"dp-noise-multiplier = {config['dp-noise-multiplier']:g}: must be <= "
            f"{MAX_NOISE_MULTIPLIER:g} (epsilon is ~0 there; the accountant and the noise "
            "grid overflow above it)"
        )
    if float(config["dp-epsilon"]) > MAX_EPSILON:
        raise ConfigError(
            f"dp-epsilon = {config['dp-epsilon']:g}: must be <= {MAX_EPSILON:g} (a larger "
            "budget protects nothing, and calibrating noise for a huge one never ends)"
        )
    if float(config["dp-noise-multiplier"]) <= 0 and float(config["dp-epsilon"]) <= 0:
        raise ConfigError(f"dp = {mode!r} needs dp-noise-multiplier > 0 or a budget dp-epsilon > 0")
    if mode == "distributed" and not bool(config["secagg"]):
        raise ConfigError("dp = 'distributed' needs secagg = true (the noise is added on clients)")
    if bool(config["dp-adaptive-clip"]):
        if mode != "central" or bool(config["secagg"]):
            raise ConfigError("dp-adaptive-clip works only with dp = 'central' and secagg = false")
        if not 0 < float(config["dp-target-quantile"]) < 1:
            raise ConfigError("dp-target-quantile must be in (0, 1) with dp-adaptive-clip")
    if mode == "local" and str(config["strategy"]) == "fedprox":
        raise ConfigError(
            "dp = 'local' cannot use strategy = 'fedprox': DP-SGD's per-sample clipping would "
            "silently drop the proximal term"
        )


def check_prune_config(config: Mapping[str, Any]) -> None:
    """The pruning keys: a schedule that ends after it starts, a stateless server strategy."""
    if str(config.get("prune", "none")) == "none":
        return
    start, end = int(config["prune-start-round"]), int(config["prune-end-round"])
    if end < start:
        raise ConfigError(f"prune-end-round = {end} is before prune-start-round = {start}")
    if str(config["strategy"]) not in ("fedavg", "fedprox"):
        raise ConfigError(
            f"prune needs strategy = 'fedavg' or 'fedprox', not {config['strategy']!r}: its "
            "server state has the shape of the kept weights, which changes while pruning"
        )
    feedback = parse_codec(str(config.get("codec", "none"))).feedback
    if feedback is not None and end > 1:
        raise ConfigError(
            f"codec stage {feedback.spec!r} keeps per-coordinate state, and the kept "
            "coordinates change while pruning: use prune-start-round = prune-end-round = 1 "
            "(one-shot pruning), or a codec without error feedback"
        )


def check_lowrank_config(config: Mapping[str, Any]) -> None:
    """Low-rank layers: a stateless server strategy, and not together with pruning."""
    if float(config.get("lowrank", 0.0)) == 0.0:
        return
    if str(config.get("prune", "none")) != "none":
        raise ConfigError("lowrank and prune cannot be combined yet: use one of them")
    if str(config.get("train-layers", "all")) != "all":
        raise ConfigError("lowrank and train-layers cannot be combined yet: use one of them")
    if str(config.get("client-models", "")):
        raise ConfigError("lowrank and client-models cannot be combined yet: use one of them")
    if str(config.get("qat", "none")) != "none":
        raise ConfigError("lowrank and qat cannot be combined yet: use one of them")
    if str(config["strategy"]) not in ("fedavg", "fedprox"):
        raise ConfigError(
            f"lowrank needs strategy = 'fedavg' or 'fedprox', not {config['strategy']!r}: its "
            "server state has the dense model's shapes, which the factors replace"
        )


def check_adapter_config(config: Mapping[str, Any]) -> None:
    """Low-rank adapters train on a frozen base: nothing else may change the model's layers or
    which tensors train (``fedsqueeze.server.adapters``)."""
    if int(config.get("lowrank-adapter", 0)) == 0:
        return
    refused = {
        "lowrank": float(config.get("lowrank", 0.0)) != 0.0,
        "prune": str(config.get("prune", "none")) != "none",
        "qat": str(config.get("qat", "none")) != "none",
        "train-layers": str(config.get("train-layers", "all")) != "all",
        "client-models": bool(str(config.get("client-models", ""))),
        "dp = 'local'": str(config.get("dp", "none")) == "local",
    }
    for key, on in refused.items():
        if on:
            raise ConfigError(f"lowrank-adapter and {key} cannot be combined yet: use one of them")


def check_qat_config(config: Mapping[str, Any]) -> None:
    """QAT trains through forward hooks that Opacus' per-sample gradients do not see."""
    if str(config.get("qat", "none")) != "none" and str(config.get("dp", "none")) == "local":
        raise ConfigError(
            'qat = "int8" cannot be combined with dp = "local": Opacus computes per-sample '
            "gradients from the layers' fp32 inputs, not the fake-quantized ones; use "
            'dp = "central" or "distributed"'
        )


BUILTIN_TRANSFER_DATASETS = ("mnist1d",)
"""Datasets with a built-in public transfer slice for distillation (``fedsqueeze.distill``)."""


def check_distill_config(config: Mapping[str, Any]) -> None:
    """Refuse distillation settings that cannot run, naming the key.

    FedDF distills from the round's individual client models, which the server never sees
    under secure aggregation (only the masked sum) and must not use under central DP (its
    guarantee covers only the clipped, noised aggregate): refused there. Teacher → student
    distillation reads only the released aggregate (post-processing), so it runs with any
    of them.
    """
    mode = str(config.get("distill", "none"))
    if mode == "none":
        return
    if mode == "feddf" and (bool(config.get("secagg")) or str(config.get("dp")) == "central"):
        raise ConfigError(
            'distill = "feddf" needs the individual client models, which secure aggregation '
            'hides and central DP must not use; use distill = "student" (post-processing)'
        )
    if mode == "student" and not str(config.get("student-model", "")):
        raise ConfigError('distill = "student" needs student-model = NAME (a registry model)')
    data = str(config.get("distill-data", ""))
    if data:
        if not data.startswith("npz:") or len(data) <= 4:
            raise ConfigError(f"distill-data = {data!r}: expected npz:PATH (or empty)")
        if not Path(data[4:]).expanduser().is_file():
            raise ConfigError(f"distill-data = {data!r}: file not found")
    elif str(config.get("dataset")) not in BUILTIN_TRANSFER_DATASETS:
        raise ConfigError(
            f"dataset = {config.get('dataset')!r} has no built-in public transfer slice "
            f'(only {", ".join(BUILTIN_TRANSFER_DATASETS)}): set distill-data = "npz:PATH"'
        )
