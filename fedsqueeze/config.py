"""The run configuration: one flat dict of kebab-case keys (DESIGN.md "Public interface").

The same keys are read from a CONFIG.toml, from ``--set key=value``, from
``[tool.flwr.app.config]`` in pyproject.toml and from ``flwr run . --run-config``.
``resolve_config`` turns any of those into a validated dict with every key present.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedsqueeze.contracts.checks import ConfigError, check_run_config

__all__ = ["DEFAULTS", "SCHEMA", "ConfigError", "resolve_config"]

Value = bool | int | float | str


def _positive_int(v: Any) -> str | None:
    return None if v >= 1 else "must be >= 1"


def _non_negative_int(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _positive_float(v: Any) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be a finite number > 0"


def _non_negative_float(v: Any) -> str | None:
    return None if math.isfinite(v) and v >= 0 else "must be a finite number >= 0"


def _seed(v: Any) -> str | None:
    # Seeds travel in Flower records (int64) and seed torch's generator.
    return None if 0 <= v < 2**63 else "must be in [0, 2**63)"


MIN_NODE_TIMEOUT = 10.0
"""Shortest ``node-timeout``: below it the handshake fails before a node can start."""


def _timeout(v: Any) -> str | None:
    if math.isfinite(v) and v >= MIN_NODE_TIMEOUT:
        return None
    return f"must be a finite number of seconds >= {MIN_NODE_TIMEOUT:g}"


def _fraction(v: Any) -> str | None:
    return None if math.isfinite(v) and 0 <= v < 1 else "must be in [0, 1)"


def _rank(v: Any) -> str | None:
    if v == 0 or 0 < v < 1 or (v >= 1 and float(v).is_integer()):
        return None
    return "must be 0 (off), an integer rank >= 1 or a fraction in (0, 1)"


def _density(v: Any) -> str | None:
    return None if math.isfinite(v) and 0 < v <= 1 else "must be in (0, 1]"


def _choice(*options: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in options else f"must be one of: {', '.join(options)}"

    return check


def _dataset(v: Any) -> str | None:
    if v in ("digits", "mnist1d") or (isinstance(v, str) and v.startswith("npz:") and len(v) > 4):
        return None
    return "must be digits, mnist1d or npz:PATH"


STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedavgm", "fedyogi", "fedadagrad")
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")

# key -> (default, type, validator or None, help)
SCHEMA: dict[str, tuple[Value, type, Callable[[Any], str | None] | None, str]] = {
    "dataset": ("digits", str, _dataset, "digits | mnist1d | npz:PATH"),
    "partition": (
        "iid",
        str,
        _choice("iid", "dirichlet", "shards", "natural"),
        "client partitioning scheme",
    ),
    "dirichlet-alpha": (0.5, float, _positive_float, "concentration for dirichlet"),
    "shards-per-client": (2, int, _positive_int, "shards per client for shards"),
    "num-clients": (10, int, _positive_int, "number of clients (SuperNodes)"),
    "clients-per-round": (10, int, _positive_int, "clients sampled each round"),
    "num-rounds": (10, int, _positive_int, "federated rounds"),
    "local-epochs": (5, int, _positive_int, "local epochs per round"),
    "batch-size": (16, int, _positive_int, "local batch size"),
    "lr": (0.05, float, _positive_float, "client learning rate (SGD)"),
    "momentum": (0.9, float, _fraction, "client SGD momentum"),
    "weight-decay": (0.0, float, _non_negative_float, "client SGD weight decay"),
    "seed": (0, int, _seed, "seed for partitions, sampling, init and training"),
    "model": ("mlp", str, None, "model registry name"),
    "strategy": ("fedavg", str, _choice(*STRATEGIES, *ROBUST_STRATEGIES), "server strategy"),
    "proximal-mu": (0.01, float, _non_negative_float, "FedProx proximal term"),
    "server-lr": (0.01, float, _positive_float, "server learning rate (fedadam/fedyogi/...)"),
    "server-momentum": (0.9, float, _fraction, "server momentum (fedavgm)"),
    "max-update-norm": (
        10.0,
        float,
        _non_negative_float,
        "L2 bound on one client's update, larger ones are scaled down (0 = no bound)",
    ),
    "update-norm-factor": (
        1.0,
        float,
        _non_negative_float,
        "no update counts for more than this times its round's median update norm (0 = off)",
    ),
    "byzantine-clients": (1, int, _non_negative_int, "f tolerated by krum/multikrum/bulyan"),
    "codec": ("none", str, None, "uplink codec spec, e.g. topk(0.01)+q4+ef"),
    "dgc-momentum": (0.0, float, _fraction, "DGC momentum correction of ef codecs (0 = off)"),
    "dgc-masking": (True, bool, None, "DGC momentum-factor masking (clear sent velocity)"),
    "dgc-clip": (0.0, float, _non_negative_float, "DGC L2 clip of an update before ef (0 = off)"),
    "dgc-warmup-rounds": (4, int, _non_negative_int, "DGC sparsity warm-up rounds (0 = off)"),
    "dgc-warmup-start": (0.25, float, _density, "density of round 1 of the warm-up"),
    "server-ef-momentum": (0.0, float, _fraction, "server-side DGC momentum (0 = off)"),
    "server-ef-density": (1.0, float, _density, "server applies this top fraction (1 = all)"),
    "downlink-codec": ("none", str, None, "downlink codec spec, e.g. fp16, q8"),
    "secagg": (False, bool, None, "secure aggregation on/off"),
    "secagg-neighbours": (0, int, _non_negative_int, "SecAgg+ graph degree k (0 = all)"),
    "secagg-threshold": (0, int, _non_negative_int, "Shamir threshold t (0 = auto)"),
    "secagg-bits": (0, int, _non_negative_int, "field bit width b (0 = auto)"),
    "secagg-clip": (1.0, float, _positive_float, "L2 clip of each update under secagg"),
    "secagg-scale": (0.0, float, _non_negative_float, "integer scale (0 = auto from bits)"),
    "secagg-randk": (1.0, float, _positive_float, "shared-seed random-k fraction (1 = dense)"),
    "simulate-dropout": (0.0, float, _fraction, "fraction of sampled clients that drop out"),
    "dp": ("none", str, _choice("none", "central", "distributed", "local"), "DP mode"),
    "dp-clip": (1.0, float, _positive_float, "L2 clipping norm (update, or per-sample)"),
    "dp-noise-multiplier": (0.0, float, _non_negative_float, "noise std / clip"),
    "dp-epsilon": (0.0, float, _non_negative_float, "privacy budget (0 = no budget)"),
    "dp-delta": (0.0, float, _fraction, "delta (0 = min(1e-5, 1/N^1.1))"),
    "dp-accountant": ("rdp", str, _choice("rdp", "prv"), "Opacus accountant"),
    "dp-adaptive-clip": (False, bool, None, "quantile-based adaptive clipping (central)"),
    "dp-target-quantile": (0.5, float, _fraction, "adaptive clipping target quantile"),
    "dp-mechanism": ("skellam", str, _choice("skellam", "dgauss"), "distributed noise"),
    "dp-bits": (16, int, _positive_int, "field bit width for distributed DP"),
    "prune": ("none", str, _choice("none", "magnitude", "channel"), "none | magnitude | channel"),
    "prune-sparsity": (0.0, float, _fraction, "final fraction of prunable weights removed"),
    "prune-start-round": (1, int, _positive_int, "first round of the cubic pruning schedule"),
    "prune-end-round": (1, int, _positive_int, "round the final sparsity is reached"),
    "prune-scope": ("global", str, _choice("global", "layer"), "magnitude threshold scope"),
    "prune-biases": (False, bool, None, "also prune biases (1-D tensors)"),
    "lowrank": (
        0.0,
        float,
        _rank,
        "low-rank layers: 0 = off, an integer rank, or a fraction of each layer's energy kept",
    ),
    "lowrank-start-round": (1, int, _positive_int, "first round trained on low-rank factors"),
    "lowrank-adapter": (
        0,
        int,
        _non_negative_int,
        "low-rank adapters (LoRA) of rank R on a frozen base: 0 = off",
    ),
    "qat": ("none", str, _choice("none", "int8"), "quantization-aware training: none | int8"),
    "qat-start-round": (1, int, _positive_int, "first round clients train with fake quant"),
    "fraction-evaluate": (0.0, float, _fraction, "fraction of clients for federated eval"),
    "client-cpus": (1.0, float, _positive_float, "CPUs per simulated client (Ray)"),
    "node-timeout": (600.0, float, _timeout, "seconds to wait for nodes / replies"),
    "min-clients": (1, int, _positive_int, "fewest usable replies for a round to count"),
    "max-failed-rounds": (
        3,
        int,
        _non_negative_int,
        "rounds below min-clients in a row that end the run (0 = never)",
    ),
    "out-dir": ("", str, None, "run directory ('' = runs/<name>-<timestamp>)"),
    "distill": ("none", str, _choice("none", "student", "feddf"), "server-side distillation"),
    "student-model": ("", str, None, "registry model distilled from the global (student)"),
    "distill-data": ("", str, None, "npz:PATH with unlabeled x ('' = built-in public slice)"),
    "distill-every": (1, int, _positive_int, "distill the student every N rounds (and last)"),
    "distill-steps": (200, int, _positive_int, "distillation steps (Adam minibatches)"),
    "distill-temperature": (3.0, float, _positive_float, "softmax temperature T"),
    "distill-lr": (0.001, float, _positive_float, "distillation learning rate (Adam)"),
    "distill-batch-size": (128, int, _positive_int, "distillation minibatch size"),
    "distill-final-steps": (
        0,
        int,
        _non_negative_int,
        "steps of the last round's distillation (0 = distill-steps)",
    ),
    "distill-schedule": (
        "constant",
        str,
        _choice("constant", "cosine"),
        "distillation lr schedule: constant | cosine (to 0 over each distillation)",
    ),
    "distill-public-samples": (
        4000,
        int,
        _positive_int,
        "size of the built-in public transfer slice (4000 per generator seed)",
    ),
    "client-data": (
        "partition",
        str,
        _choice("partition", "device"),
        "partition of dataset | device (each node's own data-path; server sees none)",
    ),
    "client-max-examples": (
        0,
        int,
        _non_negative_int,
        "with client-data = device: cap on the weight a device claims (0 = none)",
    ),
    "init-model": ("", str, None, "model.pt / run dir / export.json to start from ('' = fresh)"),
    "train-layers": ("all", str, None, "all | last | NAME,NAME: the tensors fine-tuning trains"),
    "client-models": ("", str, None, "NAME:FRACTION,... architecture per client ('' = model)"),
}

DEFAULTS: dict[str, Value] = {k: spec[0] for k, spec in SCHEMA.items()}


def _coerce(key: str, value: Any) -> Value:
    """Coerce a value (possibly a string from --set) to the key's type."""
    typ = SCHEMA[key][1]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, SCHEMA, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown config key {key!r}{hint}; valid keys: {', '.join(SCHEMA)}"


def resolve_config(*layers: Mapping[str, Any]) -> dict[str, Value]:
    """Merge config layers (later wins) over the defaults and validate every key.

    Raises
    ------
    ConfigError
        Unknown key, wrong type, value out of range, or inconsistent combination.
    """
    config: dict[str, Value] = dict(DEFAULTS)
    for layer in layers:
        for key, value in layer.items():
            if key not in SCHEMA:
                raise ConfigError(unknown_key_message(key))
            config[key] = _coerce(key, value)
    for key, value in config.items():
        check = SCHEMA[key][2]
        problem = check(value) if check else None
        if problem:
            raise ConfigError(f"{key} = {value!r}: {problem}")
    if int(config["clients-per-round"]) > int(config["num-clients"]):
        raise ConfigError(
            f"clients-per-round ({config['clients-per-round']}) is larger than "
            f"num-clients ({config['num-clients']})"
        )
    _check_names(config)
    return config


def _check_names(config: Mapping[str, Value]) -> None:
    """Validate registry names and codec specs early, so a run fails before it starts."""
    from fedsqueeze.models import MODEL_NAMES
    from fedsqueeze.models.user import is_user_model

    if config["model"] not in MODEL_NAMES and not is_user_model(str(config["model"])):
        raise ConfigError(
            f"model = {config['model']!r}: unknown model; valid models: {', '.join(MODEL_NAMES)}"
        )
    if config["client-models"]:
        from fedsqueeze.contracts.architectures import check_client_models, parse_client_models

        for name, _ in parse_client_models(str(config["client-models"])):
            if name not in MODEL_NAMES:
                raise ConfigError(
                    f"client-models: unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}"
                )
        check_client_models(config)
    student = str(config["student-model"])
    if student and student not in MODEL_NAMES:
        raise ConfigError(
            f"student-model = {student!r}: unknown model; valid models: {', '.join(MODEL_NAMES)}"
        )
    from fedsqueeze.compression import CodecError, parse_codec

    for key in ("codec", "downlink-codec"):
        try:
            parse_codec(str(config[key]))
        except CodecError as err:
            raise ConfigError(f"{key} = {config[key]!r}: {err}") from None
    check_run_config(config)


#: Keys whose value names a file or directory (``npz:PATH`` for the dataset keys).
PATH_KEYS: tuple[str, ...] = ("init-model", "dataset", "distill-data")


def anchor_paths(config: Mapping[str, Any], cwd: str | Path | None = None) -> dict[str, Any]:
    """``config`` with every relative path of :data:`PATH_KEYS` made absolute against ``cwd``
    (default: the current directory).

    A run directory records its config for ``--resume`` and for the reader of its results; a
    path recorded as typed (``runs/pretrained``) would name another file, or none, once the run
    is resumed or re-read from another directory. Registry datasets (``digits``) and empty
    values are left as they are.
    """
    base = Path.cwd() if cwd is None else Path(cwd)
    out = dict(config)
    for key in PATH_KEYS:
        value = out.get(key)
        if not isinstance(value, str) or not value:
            continue
        prefix = ""
        if key != "init-model":
            if not value.startswith("npz:"):
                continue
            prefix, value = "npz:", value[len("npz:") :].strip()
        path = Path(value).expanduser()
        if value and not path.is_absolute():
            out[key] = prefix + str(base / path)
    return out


def parse_set_option(item: str) -> tuple[str, str]:
    """Parse one ``--set key=value`` into its key and raw string value."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, value = item.split("=", 1)
    key = key.strip()
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return key, value


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a CONFIG.toml: flat keys at top level (a ``[config]`` table is also accepted)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{p}: not valid TOML ({err})") from None
    if "config" in data and isinstance(data["config"], dict):
        data = {**{k: v for k, v in data.items() if k != "config"}, **data["config"]}
    for key, value in data.items():
        if isinstance(value, dict | list):
            raise ConfigError(f"{p}: key {key!r} must be a scalar value")
    return data


def to_toml(config: Mapping[str, Value]) -> str:
    """Serialize a resolved config as TOML (flat, in schema order)."""
    lines = []
    for key, value in config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"
