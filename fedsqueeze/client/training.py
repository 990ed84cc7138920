"""Local training loop (plain PyTorch, no Flower); weights and evaluation are in
:mod:`fedsqueeze.models.weights`."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedsqueeze.contracts.streams import training_seed
from fedsqueeze.models.weights import evaluate, load_numpy_state, state_to_numpy

__all__ = ["evaluate", "load_numpy_state", "make_generator", "state_to_numpy", "train_local"]


def make_generator(seed: int, server_round: int, partition_id: int) -> torch.Generator:
    """A torch generator for a client's training order (:func:`training_seed`)."""
    gen = torch.Generator()
    gen.manual_seed(training_seed(seed, server_round, partition_id))
    return gen


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    generator: torch.Generator | None = None,
) -> float:
    """Train ``model`` in place with SGD on ``(x, y)``; return the mean training loss.

    ``proximal_mu > 0`` adds FedProx's term ``mu/2 * ||w - w_global||^2`` where
    ``w_global`` is the model's weights on entry.
    """
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    n = len(xt)
    if n == 0:
        return float("nan")
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    loss_fn = nn.CrossEntropyLoss()
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    model.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            if global_params is not None:
                prox = sum(
                    ((p - g) ** 2).sum()
                    for p, g in zip(model.parameters(), global_params, strict=True)
                )
                loss = loss + 0.5 * proximal_mu * prox
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
    return total / max(count, 1)
