"""Local DP-SGD on a client with Opacus, its accountant carried across rounds.

A client trains a few local epochs per round with ``opacus.PrivacyEngine``. A fresh engine
starts with an empty accountant, so without care every round would report only its own ε
and the client's cumulative (record-level) privacy loss would be forgotten. Here each new
engine is seeded with the history saved at the end of the previous round
(:func:`engine_history`), which the Flower glue keeps in the client's ``Context.state`` as a
flat list of floats (the format of :meth:`PrivacyAccountant.to_list`).

The model may be a fresh ``nn.Module`` built from the round's global weights (the expected
use), the same module object wrapped in an earlier round, or an Opacus
``GradSampleModule``: all are unwrapped to the plain module and wrapped once more, so
per-sample-gradient hooks are never installed twice. Use :func:`unwrap_model` to get the
plain module (whose ``state_dict`` keys lack Opacus's ``_module.`` prefix) after training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from opacus import PrivacyEngine
from opacus.grad_sample import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn, optim
from torch.utils.data import DataLoader

from .accounting import (
    Mechanism,
    PrivacyAccountant,
    _check_mechanism,
    history_from_list,
    history_to_list,
)
from .errors import InvalidPrivacyParameter

__all__ = ["engine_history", "local_epsilon", "make_private", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain ``nn.Module`` under any Opacus wrapper, with Opacus's hooks removed.

    Also cleans a plain module whose wrapper was dropped without cleanup (its hook handles
    are still registered and would make Opacus refuse to wrap it again).
    """
    while isinstance(model, AbstractGradSampleModule):
        model = model.to_standard_module()
    stale = getattr(model, "autograd_grad_sample_hooks", None)
    if stale is not None:
        for handle in stale:
            handle.remove()
        stale.clear()
        delattr(model, "autograd_grad_sample_hooks")
    return model


def make_private(
    model: nn.Module,
    optimizer: optim.Optimizer,
    data_loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant_history: Sequence[float] | None,
    mechanism: Mechanism = "rdp",
    *,
    poisson_sampling: bool = True,
    noise_generator: torch.Generator | None = None,
) -> tuple[nn.Module, DPOptimizer, DataLoader, PrivacyEngine]:
    """Wrap model, optimizer and loader for DP-SGD, resuming the accountant's history.

    Parameters
    ----------
    model, optimizer, data_loader
        The client's training objects; the optimizer must be over ``model``'s parameters
        (a ``DPOptimizer`` from a previous round is accepted and unwrapped by Opacus).
    noise_multiplier, max_grad_norm
        DP-SGD noise multiplier σ and per-example clip norm.
    accountant_history
        Flat ``[σ, q, steps, ...]`` from the previous round's :func:`engine_history`, or
        None / empty for the first round.
    mechanism
        Accountant: ``"rdp"`` or ``"prv"``; must match the one that produced the history.
    poisson_sampling
        Opacus's Poisson-sampled loader (needed for the accounting to hold); it samples
        with ``data_loader.generator``.
    noise_generator
        Source of the Gaussian noise (None: torch's global generator). Both this and the
        loader's generator must be secret from whoever DP protects against — seeded from
        OS entropy, not from anything in the run config.

    Returns
    -------
    model, optimizer, loader, engine
        Opacus's wrapped objects and the engine; its accountant already holds the earlier
        rounds and records every optimizer step of this round.
    """
    noise = float(noise_multiplier)
    clip = float(max_grad_norm)
    if not noise > 0:
        # Zero noise has infinite ε and could not be carried in the history.
        raise InvalidPrivacyParameter(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
    if not clip > 0:
        raise InvalidPrivacyParameter(f"max_grad_norm must be > 0, got {max_grad_norm!r}")
    mechanism = _check_mechanism(mechanism)
    history = history_from_list(accountant_history or [])

    module = unwrap_model(model)
    # Opacus warns that its RNG is not cryptographically secure: true here as well (torch's
    # generator, seeded from OS entropy by the caller), so the warning is not silenced.
    engine = PrivacyEngine(accountant=mechanism)
    engine.accountant.history = list(history)
    private_model, private_optimizer, private_loader = engine.make_private(
        module=module,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=noise,
        max_grad_norm=clip,
        poisson_sampling=poisson_sampling,
        noise_generator=noise_generator,
    )
    return private_model, private_optimizer, private_loader, engine


def engine_history(engine: PrivacyEngine) -> list[float]:
    """The engine accountant's full history (earlier rounds included) as a flat float list."""
    return history_to_list(engine.accountant.history)


def local_epsilon(history: Sequence[float], delta: float, mechanism: Mechanism = "rdp") -> float:
    """Cumulative record-level ε of a client from its saved history."""
    return PrivacyAccountant.from_list(history, mechanism).epsilon(delta)
