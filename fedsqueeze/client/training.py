"""Local training and evaluation loops (plain PyTorch, no Flower)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


def make_generator(*seed_parts: int) -> torch.Generator:
    """A torch generator seeded from several integers (e.g. seed, round, partition)."""
    seed = int(np.random.SeedSequence([int(p) for p in seed_parts]).generate_state(1)[0])
    gen = torch.Generator()
    gen.manual_seed(seed)
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


@torch.no_grad()
def evaluate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024
) -> tuple[float, float]:
    """Return ``(loss, accuracy)`` of ``model`` on ``(x, y)``."""
    model.eval()
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    if len(xt) == 0:
        return float("nan"), float("nan")
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct = 0.0, 0
    for start in range(0, len(xt), batch_size):
        logits = model(xt[start : start + batch_size])
        target = yt[start : start + batch_size]
        loss_sum += float(loss_fn(logits, target))
        correct += int((logits.argmax(dim=1) == target).sum())
    return loss_sum / len(xt), correct / len(xt)


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state_dict as float32 numpy arrays (copies), in state_dict order."""
    return {
        k: v.detach().cpu().numpy().astype(np.float32, copy=True)
        for k, v in model.state_dict().items()
    }


def load_numpy_state(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load numpy arrays into ``model`` (strict: same keys and shapes)."""
    state = {
        k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in arrays.items()
    }
    model.load_state_dict(state, strict=True)
