"""A model's weights as numpy arrays, and its evaluation: shared by clients and the server."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


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
