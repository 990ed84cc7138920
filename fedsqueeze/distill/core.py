"""Knowledge distillation on the server: the transfer data and the distillation step.

Two uses share one step (:func:`distill`): a teacher's tempered softmax on unlabeled
transfer data is the target, and the student is trained to match it with the KL
divergence scaled by ``T^2`` (Hinton et al., 2015):

- teacher → student compression: the teacher is the federated global model, the student a
  smaller registry model (``distill = "student"``);
- FedDF ensemble distillation (Lin et al., NeurIPS 2020): the teacher is the average of the
  round's client models' tempered softmaxes and the student is the aggregated global
  itself, fine-tuned (``distill = "feddf"``).

Both are functions of what the server already holds (the aggregate, or the individual
client models) and of public transfer data: no client data is touched here. torch only
(no Flower).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedsqueeze.contracts.checks import BUILTIN_TRANSFER_DATASETS, ConfigError


class DistillError(ConfigError):
    """Transfer data that cannot be used (missing file, wrong shape, no built-in slice)."""


BUILTIN_TRANSFER: dict[str, str] = {
    "mnist1d": (
        "4000 MNIST-1D samples generated locally with mnist1d's default arguments but "
        "seed 1001 (the run's dataset uses seed 42): drawn independently of every client's "
        "training sample and of the test split, labels discarded; standardized per position "
        "with their own statistics. distill-public-samples > 4000 appends further blocks of "
        "4000 made the same way with seeds 1002, 1003, ... (the first 4000 never change)"
    ),
}
"""The built-in public transfer slice of each dataset (``distill-data = ""``)."""
assert tuple(BUILTIN_TRANSFER) == BUILTIN_TRANSFER_DATASETS

_MNIST1D_TRANSFER_SEED = 1001
MNIST1D_BLOCK = 4000
"""Samples per generator seed of the built-in MNIST-1D slice (mnist1d's default train split)."""


def _builtin_mnist1d(samples: int = MNIST1D_BLOCK) -> np.ndarray:
    import mnist1d.data

    blocks = []
    for k in range(-(-samples // MNIST1D_BLOCK)):
        args = mnist1d.data.get_dataset_args()
        args.seed = _MNIST1D_TRANSFER_SEED + k
        np_state, py_state = np.random.get_state(), random.getstate()
        try:  # make_dataset reseeds the global generators: restore them
            raw = mnist1d.data.make_dataset(args=args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        x = np.asarray(raw["x"], dtype=np.float64)
        std = x.std(axis=0)
        blocks.append((x - x.mean(axis=0)) / np.where(std < 1e-8, 1.0, std))
    x = np.concatenate(blocks)[:samples]
    return np.ascontiguousarray(x.astype(np.float32)[:, None, :])


def load_transfer_data(
    spec: str,
    dataset: str,
    input_shape: Sequence[int],
    limit: int = 0,
    builtin_samples: int = MNIST1D_BLOCK,
) -> np.ndarray:
    """The unlabeled transfer inputs: ``npz:PATH`` (array ``x``) or the built-in slice of
    ``builtin_samples`` samples (``distill-public-samples``; ignored for a file).

    Raises
    ------
    DistillError
        No built-in slice for ``dataset``, an unreadable file, or samples whose shape is
        not ``input_shape``.
    """
    if spec:
        if not spec.startswith("npz:") or len(spec) <= 4:
            raise DistillError(f"distill-data = {spec!r}: expected npz:PATH or empty")
        path = Path(spec[4:]).expanduser()
        try:
            with np.load(path, allow_pickle=False) as f:
                x = np.asarray(f["x"], dtype=np.float32)
        except (OSError, ValueError, KeyError) as err:
            raise DistillError(f"distill-data: cannot read array 'x' from {path}: {err}") from None
        shape = tuple(int(d) for d in input_shape)
        if (
            x.ndim >= 2
            and tuple(x.shape[1:]) != shape
            and int(np.prod(x.shape[1:])) == int(np.prod(shape))
        ):
            x = x.reshape(len(x), *shape)
        if x.ndim < 2 or tuple(x.shape[1:]) != shape or len(x) == 0 or not np.isfinite(x).all():
            raise DistillError(
                f"distill-data: {path} array 'x' has shape {x.shape}, expected (N, *{shape}) "
                "with N >= 1 finite values"
            )
    elif dataset == "mnist1d":
        x = _builtin_mnist1d(builtin_samples)
    else:
        raise DistillError(
            f"dataset {dataset!r} has no built-in public transfer slice (only "
            f'{", ".join(BUILTIN_TRANSFER)}): set distill-data = "npz:PATH"'
        )
    return np.ascontiguousarray(x[:limit] if limit > 0 else x)


@torch.no_grad()
def teacher_probs(
    model: nn.Module, x: np.ndarray, temperature: float, batch_size: int = 1024
) -> torch.Tensor:
    """``softmax(model(x) / T)`` for all of ``x``, in eval mode."""
    model.eval()
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out = [
        F.softmax(model(xt[i : i + batch_size]) / temperature, dim=1)
        for i in range(0, len(xt), batch_size)
    ]
    return torch.cat(out)


def ensemble_probs(
    models: Sequence[nn.Module],
    x: np.ndarray,
    temperature: float,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """FedDF's target: the (weighted) mean of the models' tempered softmaxes."""
    if not models:
        raise DistillError("ensemble_probs needs at least one model")
    w = np.ones(len(models)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    total = sum(
        float(wi) * teacher_probs(m, x, temperature) for wi, m in zip(w, models, strict=True)
    )
    assert isinstance(total, torch.Tensor)
    return total


def distill(
    student: nn.Module,
    x: np.ndarray,
    target: torch.Tensor,
    *,
    steps: int,
    temperature: float,
    lr: float,
    batch_size: int,
    seed: int,
    schedule: str = "constant",
) -> dict[str, Any]:
    """Train ``student`` for ``steps`` Adam steps to match ``target`` (tempered probs) on ``x``.

    The loss is ``T^2 * KL(target || softmax(student(x) / T))`` (Hinton et al.): the ``T^2``
    keeps gradient magnitudes comparable across temperatures. ``schedule = "cosine"`` decays
    the learning rate from ``lr`` to 0 over the steps (a student warm-started from its previous
    distillation then settles instead of ending on a full-size step). Minibatches are drawn
    from a generator seeded by ``seed`` (reproducible; nothing secret depends on it). Returns
    the mean loss of the first and last tenth of the steps.
    """
    if schedule not in ("constant", "cosine"):
        raise DistillError(f"distill schedule {schedule!r}: expected constant or cosine")
    if len(x) != len(target):
        raise DistillError(f"{len(x)} transfer inputs but {len(target)} targets")
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    student.train()
    losses: list[float] = []
    bs = min(batch_size, len(xt))
    for step in range(steps):
        if schedule == "cosine":
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(xt), (bs,), generator=gen)
        log_p = F.log_softmax(student(xt[idx]) / temperature, dim=1)
        loss = F.kl_div(log_p, target[idx], reduction="batchmean") * temperature**2
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    student.eval()
    k = max(1, steps // 10)
    return {
        "loss_first": float(np.mean(losses[:k])) if losses else float("nan"),
        "loss_last": float(np.mean(losses[-k:])) if losses else float("nan"),
    }
