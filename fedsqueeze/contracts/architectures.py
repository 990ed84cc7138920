"""Which architecture each client trains (``client-models = "NAME:FRACTION,..."``).

Shared by both sides: the server and every client compute the same assignment from the run
config and the client's partition id, so nothing about it travels in messages. Pure Python
and numpy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedsqueeze.contracts.checks import ConfigError

_ASSIGN_STREAM = 0xA4C7


def parse_client_models(spec: str) -> list[tuple[str, float]]:
    """``"cnn1d:0.5,cnn1d-small:0.5"`` as ``[(name, fraction), ...]`` (fractions sum to 1).

    Raises
    ------
    ConfigError
        Malformed entries, a repeated name, fractions not in (0, 1] or not summing to 1.
    """
    out: list[tuple[str, float]] = []
    for part in spec.split(","):
        name, sep, frac = part.strip().rpartition(":")
        try:
            value = float(frac)
        except ValueError:
            value = float("nan")
        if not sep or not name or not 0 < value <= 1:
            raise ConfigError(
                f"client-models = {spec!r}: expected NAME:FRACTION,... with fractions in (0, 1]"
            )
        if any(n == name for n, _ in out):
            raise ConfigError(f"client-models = {spec!r}: {name!r} is listed twice")
        out.append((name, value))
    if abs(sum(f for _, f in out) - 1.0) > 1e-6:
        raise ConfigError(f"client-models = {spec!r}: the fractions must sum to 1")
    return out


def assign_architectures(spec: str, num_clients: int, seed: int) -> list[str]:
    """The architecture of each partition ``0 .. num_clients - 1``.

    Counts follow the fractions (largest remainder, so they add up to ``num_clients``); which
    partitions get which architecture is a permutation drawn from ``seed`` (reproducible,
    nothing secret depends on it). Every listed architecture gets at least one client.
    """
    entries = parse_client_models(spec)
    exact = [f * num_clients for _, f in entries]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(entries)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: num_clients - sum(counts)]:
        counts[i] += 1
    empty = [name for (name, _), c in zip(entries, counts, strict=True) if c == 0]
    if empty:
        raise ConfigError(
            f"client-models: {', '.join(empty)} would get no client of {num_clients}; "
            "raise its fraction or num-clients"
        )
    order = np.random.default_rng([seed, _ASSIGN_STREAM]).permutation(num_clients)
    out = [""] * num_clients
    pos = 0
    for (name, _), count in zip(entries, counts, strict=True):
        for p in order[pos : pos + count]:
            out[int(p)] = name
        pos += count
    return out


def check_client_models(config: Mapping[str, Any]) -> None:
    """Refuse ``client-models`` settings that cannot run (the names are checked against the
    registry by the config loader).

    The server aggregates within each architecture from the individual (decoded) client
    models: refused with secure aggregation and with central or distributed DP for the
    reasons FedDF is, with pruning (one mask per model), teacher → student distillation (one
    teacher per run) and the retraining keys (they name one architecture's tensors).
    """
    spec = str(config.get("client-models", ""))
    if not spec:
        return
    names = [n for n, _ in parse_client_models(spec)]
    if str(config.get("model")) not in names:
        raise ConfigError(
            f"client-models = {spec!r} must list model = {config.get('model')!r} "
            "(the run's main model: checkpointed, evaluated and exported)"
        )
    if bool(config.get("secagg")) or str(config.get("dp")) in ("central", "distributed"):
        raise ConfigError(
            "client-models aggregates each architecture from the individual client models, "
            "which secure aggregation hides and central/distributed DP must not use"
        )
    if str(config.get("prune", "none")) != "none" or str(config.get("distill")) == "student":
        raise ConfigError('client-models works with distill = "none" or "feddf", without prune')
    if (
        str(config.get("train-layers", "all")) != "all"
        or str(config.get("init-model", ""))
        or str(config.get("client-data", "partition")) != "partition"
        or str(config.get("qat", "none")) != "none"
    ):
        raise ConfigError(
            "client-models cannot be combined with train-layers, init-model, qat or "
            "client-data = 'device' yet (each is set up for one architecture)"
        )
    assign_architectures(spec, int(config.get("num-clients", 1)), int(config.get("seed", 0)))
