"""Magnitude pruning inside the federation: the schedule, the server's masks, masked training.

- :func:`cubic_sparsity` is Zhu & Gupta's gradual schedule (2017, "To prune, or not to
  prune"), stepped per federated round: ``s(r) = s_f * (1 - (1 - (r - r0) / (r1 - r0))^3)``
  between ``prune-start-round`` ``r0`` and ``prune-end-round`` ``r1``, ``0`` before and
  ``s_f`` from ``r1`` on — it prunes fast while the model is redundant and slowly near the end.
- :func:`magnitude_masks` is the server's decision, on numpy arrays of the global model:
  drop the smallest-magnitude weights, over all prunable tensors together (``global``) or
  the same fraction in each (``layer``). Prunable: tensors with two or more dimensions
  (Linear and Conv weights); biases (and any 1-D norm parameters) are kept unless asked.
  Each prunable tensor keeps at least one weight, so no layer is cut off entirely.
- :func:`masked_training` is the client side: every model built inside it (the train
  handler's, through :func:`on_model_built`, called by :func:`~fedsqueeze.models.build_model`)
  gets the mask installed: gradients of pruned weights are masked by a tensor hook, and after
  every optimizer step (any optimizer, including Opacus's DP-SGD, whose noise does not pass
  through gradient hooks) pruned weights and their optimizer state (momentum, Adam moments)
  are set back to exactly zero.

Why not ``torch.nn.utils.prune`` / ``torch.ao.pruning``: both reparametrize a module
(``weight = weight_orig * weight_mask``), which renames its ``state_dict`` entries and
replaces its parameters. The federation exchanges strict ``state_dict`` arrays with the same
keys on every side, Opacus wraps the parameters it finds, and the mask is decided by the
server on numpy arrays (where a torch module would have to be built only to compute a
quantile). Hooks on the unchanged parameters keep all three intact.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

SCOPES = ("global", "layer")


def cubic_sparsity(server_round: int, final: float, start: int, end: int) -> float:
    """Target sparsity of the global model trained in ``server_round`` (Zhu & Gupta)."""
    if final <= 0 or server_round < start:
        return 0.0
    if server_round >= end:
        return float(final)
    progress = (server_round - start) / (end - start)
    return float(final * (1.0 - (1.0 - progress) ** 3))


def is_prunable(name: str, shape: tuple[int, ...], include_biases: bool = False) -> bool:
    """Weights of Linear/Conv layers (2+ dims); 1-D tensors only when asked."""
    return len(shape) >= 2 or (include_biases and len(shape) == 1)


def magnitude_masks(
    arrays: Mapping[str, np.ndarray],
    sparsity: float,
    scope: str = "global",
    include_biases: bool = False,
    previous: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Masks (True = kept) removing ``sparsity`` of the prunable weights by magnitude.

    Ties are broken by position (stable sort), so the masks are a deterministic function of
    the arrays. Positions ``previous`` pruned rank below every weight, so along a schedule
    of growing sparsity a pruned weight is never let back in.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in SCOPES:
        raise ValueError(f"prune-scope must be one of {SCOPES}, got {scope!r}")
    masks = {k: np.ones(np.shape(v), dtype=bool) for k, v in arrays.items()}
    names = [k for k, v in arrays.items() if is_prunable(k, np.shape(v), include_biases)]
    if sparsity == 0.0 or not names:
        return masks
    groups = [[n] for n in names] if scope == "layer" else [names]
    for group in groups:
        mags = np.concatenate(
            [
                np.where(
                    previous[n] if previous is not None else True,
                    np.abs(np.asarray(arrays[n], dtype=np.float32)),
                    -1.0,
                ).ravel()
                for n in group
            ]
        )
        n_prune = int(np.floor(sparsity * mags.size))
        order = np.argsort(mags, kind="stable")
        flat_keep = np.ones(mags.size, dtype=bool)
        flat_keep[order[:n_prune]] = False
        pos = 0
        for n in group:
            size = int(np.size(arrays[n]))
            keep = flat_keep[pos : pos + size]
            if not keep.any():  # never cut a layer off: keep its largest weight
                keep = keep.copy()
                keep[int(np.argmax(mags[pos : pos + size]))] = True
            masks[n] = keep.reshape(np.shape(arrays[n]))
            pos += size
    return masks


def sparsity_of(masks: Mapping[str, np.ndarray], include_biases: bool = False) -> float:
    """Fraction of prunable weights the masks remove."""
    total = pruned = 0
    for k, m in masks.items():
        if is_prunable(k, m.shape, include_biases):
            total += m.size
            pruned += m.size - int(np.count_nonzero(m))
    return pruned / total if total else 0.0


# ---- client side: the model-build scope, and training with the mask installed ---------------

ModelTransform = Callable[[nn.Module], nn.Module]

_BUILD_SCOPE: contextvars.ContextVar[tuple[ModelTransform, ...]] = contextvars.ContextVar(
    "fedsqueeze_model_build_scope", default=()
)


@contextlib.contextmanager
def model_build_scope(transform: ModelTransform) -> Iterator[None]:
    """Within this block, every model the zoo builds passes through ``transform`` (after
    those of enclosing blocks). This is how a client mod changes the model its handler
    trains — a pruning mask, low-rank factors — without a branch in the handler."""
    token = _BUILD_SCOPE.set((*_BUILD_SCOPE.get(), transform))
    try:
        yield
    finally:
        _BUILD_SCOPE.reset(token)


def on_model_built(model: nn.Module) -> nn.Module:
    """Apply the active build scopes to a freshly built model; called by the model zoo."""
    for transform in _BUILD_SCOPE.get():
        model = transform(model)
    return model


class PruningError(ValueError):
    """A mask does not fit the model it is installed in."""


class _MaskScope:
    def __init__(self, masks: Mapping[str, np.ndarray]) -> None:
        self.masks = dict(masks)
        # id(parameter) -> (parameter, its mask as a float tensor); lives as long as the scope.
        self.params: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def install(self, model: nn.Module) -> nn.Module:
        state = model.state_dict(keep_vars=True)
        if list(state) != list(self.masks):
            raise PruningError(
                f"the pruning mask names {list(self.masks)[:4]}..., the model "
                f"{type(model).__name__} has {list(state)[:4]}..."
            )
        for name, tensor in state.items():
            keep = self.masks[name]
            if tuple(tensor.shape) != keep.shape:
                raise PruningError(
                    f"mask for {name!r} is {keep.shape}, the tensor {tuple(tensor.shape)}"
                )
            if keep.all() or not isinstance(tensor, nn.Parameter):
                continue
            mask = torch.from_numpy(keep.astype(np.float32))
            with torch.no_grad():
                tensor.mul_(mask)
            tensor.register_hook(lambda g, m=mask: g * m)
            self.params[id(tensor)] = (tensor, mask)
        return model

    def after_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        """Pruned weights and their optimizer state back to exactly zero."""
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    entry = self.params.get(id(p))
                    if entry is None or entry[0] is not p:
                        continue
                    mask = entry[1]
                    p.mul_(mask)
                    for value in optimizer.state.get(p, {}).values():
                        if isinstance(value, torch.Tensor) and value.shape == p.shape:
                            value.mul_(mask)


@contextlib.contextmanager
def masked_training(masks: Mapping[str, np.ndarray]) -> Iterator[None]:
    """Within this block, every model built gets ``masks`` installed (see the module doc).

    The optimizer hook is process-wide (``torch.optim`` offers no per-call scope) but acts
    only on parameters of models built inside this block, and is removed on exit.
    """
    scope = _MaskScope(masks)
    handle = register_optimizer_step_post_hook(scope.after_step)
    try:
        with model_build_scope(scope.install):
            yield
    finally:
        handle.remove()
