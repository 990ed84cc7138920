"""Local DP on a client: DP-SGD with Opacus, its accountant carried across rounds.

The train handler calls :func:`train_local_dp` instead of ``train_local`` when
``dp = "local"``. Privacy is *sample-level*: one of this client's training examples.

- per-sample gradients are clipped to ``dp-clip`` and noised with ``dp-noise-multiplier``;
  with only ``dp-epsilon`` given, the multiplier is calibrated once, on the first round this
  client trains, for ``num-rounds × local-epochs`` epochs (as if it trained every round) and
  then kept, so a resumed or longer run does not change it mid-way;
- batches are Poisson-sampled at q = 1 / ceil(n / batch-size) (Opacus's DP loader), which is
  what the accountant assumes;
- the noise and the Poisson batches come from a fresh torch generator seeded from OS
  entropy every round (:func:`secret_generator`), never from the run seed, the round or the
  partition id: the server cannot replay a client's training (against whom: the server and
  everyone downstream). Opacus's ``secure_mode`` would use a CSPRNG and its
  floating-point-safe noise, but needs ``torchcsprng``, which is not installable for current
  torch; torch's generator (Mersenne Twister, 64-bit secret seed) is not cryptographic and
  its float Gaussian is subject to Mironov-style floating-point attacks, which is exactly
  what Opacus's "Secure RNG turned off" warning says — so that warning is left on;
- the accountant history (Opacus's ``[(σ, q, steps), ...]``) lives in ``Context.state``
  under :data:`STATE_KEY`, so every round composes with all earlier ones;
- δ = ``dp-delta`` or ``min(1e-5, 1 / n^1.1)`` for the n local examples;
- with a budget, a client whose next round would exceed it refuses to train
  (:class:`~fedsqueeze.privacy.BudgetExceeded`; the server counts it as dropped).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsqueeze.config import ConfigError
from fedsqueeze.contracts.streams import secret_seed
from fedsqueeze.privacy import (
    BudgetExceeded,
    InvalidPrivacyParameter,
    PrivacyAccountant,
    default_delta,
    noise_for_budget,
)
from fedsqueeze.privacy.floor import PrivacyFloor

__all__ = ["STATE_KEY", "LocalDPPlan", "plan_local_dp", "secret_generator", "train_local_dp"]

STATE_KEY = "dp-local"
"""Where the client's accountant history and noise multiplier live in ``Context.state``."""


def secret_generator() -> torch.Generator:
    """A torch generator seeded from OS entropy (fresh for every round's DP-SGD)."""
    gen = torch.Generator()
    gen.manual_seed(secret_seed())
    return gen


class LocalDPPlan:
    """What one client's DP-SGD uses: noise, sample rate, steps per round, δ."""

    def __init__(self, noise_multiplier: float, sample_rate: float, steps_per_epoch: int,
                 epochs: int, delta: float) -> None:  # fmt: skip
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.delta = delta

    @property
    def steps_per_round(self) -> int:
        return self.steps_per_epoch * self.epochs


def _batches(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def plan_local_dp(
    cfg: Mapping[str, Any], num_examples: int, stored_noise: float | None = None
) -> LocalDPPlan:
    """The DP-SGD plan of a client with ``num_examples`` local examples.

    ``stored_noise`` (from an earlier round) wins over a new calibration.
    """
    if num_examples < 1:
        raise ConfigError("dp = 'local' needs at least one training example per client")
    batches = _batches(num_examples, int(cfg["batch-size"]))
    q = 1.0 / batches
    steps_per_epoch = int(1 / q)  # what Opacus's Poisson loader iterates
    epochs = int(cfg["local-epochs"])
    delta = float(cfg["dp-delta"]) if float(cfg["dp-delta"]) > 0 else default_delta(num_examples)
    z = float(cfg["dp-noise-multiplier"])
    if z <= 0 and stored_noise:
        z = float(stored_noise)
    if z <= 0:
        budget = float(cfg["dp-epsilon"])
        steps = int(cfg["num-rounds"]) * epochs * steps_per_epoch
        try:
            z = noise_for_budget(budget, delta, q, steps, str(cfg["dp-accountant"]))  # type: ignore[arg-type]
        except InvalidPrivacyParameter as err:
            raise ConfigError(f"dp-epsilon = {budget} (local DP): {err}") from None
    return LocalDPPlan(z, q, steps_per_epoch, epochs, delta)


def _load_state(state: RecordDict) -> tuple[list[float], float | None]:
    if STATE_KEY not in state.config_records:
        return [], None
    rec = state.config_records[STATE_KEY]
    history = [float(v) for v in rec.get("history", [])]  # type: ignore[union-attr]
    noise = rec.get("noise-multiplier")
    return history, (float(noise) if noise is not None else None)  # type: ignore[arg-type]


def train_local_dp(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: Mapping[str, Any],
    state: RecordDict,
    generator: torch.Generator | None = None,
    floor: PrivacyFloor | None = None,
) -> tuple[float, dict[str, float]]:
    """Train ``model`` in place with DP-SGD; return the mean loss and the reply's DP metrics.

    ``state`` is the client's ``Context.state``: its accountant history is read before and
    written after training. ``generator`` drives both DP-SGD's Poisson batches and its
    noise; leave it None (a fresh :func:`secret_generator`) — passing a seeded one is for
    tests, and makes the training replayable by whoever knows the seed. The metrics are
    ``epsilon`` (cumulative, at ``delta``), ``delta``, ``dp-noise-multiplier`` and
    ``dp-steps`` (optimizer steps this round); the ClientApp sends only ε and δ.
    ``floor`` is the device's own (node config, :class:`~fedsqueeze.privacy.floor.PrivacyFloor`):
    the run config's noise, batch size and epochs come from the server, so a round below the
    floor is refused before any training.
    After the call ``model`` is the plain module again (Opacus's hooks removed).

    Raises
    ------
    BelowPrivacyFloor
        If the round's noise multiplier or resulting ε is below the device's ``floor``.
    BudgetExceeded
        If ``dp-epsilon`` is set and this round would push the client's ε past it.
    """
    from fedsqueeze.privacy.local import engine_history, local_epsilon, make_private, unwrap_model

    mechanism = str(cfg["dp-accountant"])
    history, stored_noise = _load_state(state)
    plan = plan_local_dp(cfg, len(x), stored_noise)
    budget = float(cfg["dp-epsilon"])
    if budget > 0 or floor is not None:
        trial = PrivacyAccountant.from_list(history, mechanism)  # type: ignore[arg-type]
        trial.step(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
        after = trial.epsilon(plan.delta)
        if floor is not None:
            floor.check_local(plan.noise_multiplier, after)
        if budget > 0 and after > budget:
            raise BudgetExceeded(after, budget)

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    if generator is None:
        generator = secret_generator()
    loader = DataLoader(
        TensorDataset(xt, yt), batch_size=int(cfg["batch-size"]), generator=generator
    )
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=float(cfg["lr"]),
        momentum=float(cfg["momentum"]),
        weight_decay=float(cfg["weight-decay"]),
    )
    # Opacus's Poisson loader takes the loader's generator; its noise, the one given here.
    private_model, private_opt, private_loader, engine = make_private(
        model,
        optimizer,
        loader,
        plan.noise_multiplier,
        float(cfg["dp-clip"]),
        history,
        mechanism,  # type: ignore[arg-type]
        noise_generator=generator,
    )
    loss_fn = nn.CrossEntropyLoss()
    private_model.train()
    total, count, steps = 0.0, 0, 0
    for _ in range(plan.epochs):
        for xb, yb in private_loader:
            private_opt.zero_grad()
            if len(xb) > 0:
                loss = loss_fn(private_model(xb), yb)
                total += float(loss.detach()) * len(xb)
                count += len(xb)
            else:
                # An empty Poisson batch is still a step (pure noise, accounted): the sum
                # over no examples gives Opacus empty per-sample gradients to work with.
                loss = nn.functional.cross_entropy(private_model(xb), yb, reduction="sum")
            loss.backward()
            private_opt.step()
            steps += 1
    new_history = engine_history(engine)
    unwrap_model(private_model)
    state[STATE_KEY] = ConfigRecord(
        {"history": new_history, "noise-multiplier": plan.noise_multiplier}
    )
    eps = local_epsilon(new_history, plan.delta, mechanism)  # type: ignore[arg-type]
    metrics = {
        "epsilon": eps,
        "delta": plan.delta,
        "dp-noise-multiplier": plan.noise_multiplier,
        "dp-steps": float(steps),
    }
    return (total / count if count else float("nan")), metrics
