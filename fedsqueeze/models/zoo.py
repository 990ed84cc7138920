"""Model registry: small CPU-friendly classifiers for the offline datasets.

Design constraints, shared by every model here:

- no BatchNorm: its running statistics are not parameters, average badly under FedAvg and
  are rejected by Opacus for DP-SGD (per-sample gradients need sample independence);
- only float32 parameters and buffers, with ``state_dict`` keys that depend on the model
  name only (never on the input shape), so updates from every client line up;
- layers Opacus can compute per-sample gradients for (Linear, Conv1d, Conv2d), with
  non-inplace activations;
- at most ~100k parameters: adaptive pooling caps the flattened width for large inputs.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from fedsqueeze.models.errors import ModelError
from fedsqueeze.models.pruning import on_model_built

__all__ = ["MODEL_NAMES", "SMALL_MODELS", "ModelError", "build_model", "count_parameters"]


def _flat_dim(input_shape: tuple[int, ...]) -> int:
    return math.prod(input_shape)


def _logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            [
                ("flatten", nn.Flatten()),
                ("fc", nn.Linear(_flat_dim(input_shape), num_classes)),
            ]
        )
    )


def _mlp_layout(hidden1: int, hidden2: int) -> Callable[[tuple[int, ...], int], nn.Module]:
    """A flatten-fc-fc-fc classifier with the given hidden widths."""

    def factory(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return nn.Sequential(
            OrderedDict(
                [
                    ("flatten", nn.Flatten()),
                    ("fc1", nn.Linear(_flat_dim(input_shape), hidden1)),
                    ("act1", nn.ReLU()),
                    ("fc2", nn.Linear(hidden1, hidden2)),
                    ("act2", nn.ReLU()),
                    ("fc3", nn.Linear(hidden2, num_classes)),
                ]
            )
        )

    return factory


_mlp = _mlp_layout(128, 64)
# ~10x mlp's parameters (167,178 on digits): a model where a few kilobytes of fixed
# per-client protocol cost (secure aggregation's keys and signatures) no longer dominate a
# compressed update.
_mlp_wide = _mlp_layout(512, 256)


# Longest sequence / side kept after the conv stack; larger inputs are pooled down to it.
_CNN1D_MAX_LEN = 10
_CNN2D_MAX_SIDE = 4


def _cnn1d_layout(
    name: str, width: int, hidden: int, max_len: int
) -> Callable[[tuple[int, ...], int], nn.Module]:
    """A conv-conv-conv-fc-fc classifier for ``(channels, length)`` inputs at a given size."""

    def factory(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if len(input_shape) != 2:
            raise ModelError(
                f"model {name!r} needs input_shape (channels, length), got {tuple(input_shape)}"
            )
        channels, length = input_shape
        if length < 4:
            raise ModelError(f"model {name!r} needs sequence length >= 4, got {length}")
        # Two 2x poolings keep position information (MNIST-1D digits are position-dependent
        # templates), so the head sees a short sequence rather than a global average.
        out_len = min(length // 4, max_len)
        return nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv1d(channels, width, kernel_size=5, padding=2)),
                    ("act1", nn.ReLU()),
                    ("pool1", nn.MaxPool1d(2)),
                    ("conv2", nn.Conv1d(width, width, kernel_size=5, padding=2)),
                    ("act2", nn.ReLU()),
                    ("pool2", nn.MaxPool1d(2)),
                    ("conv3", nn.Conv1d(width, width, kernel_size=3, padding=1)),
                    ("act3", nn.ReLU()),
                    ("pool3", nn.AdaptiveAvgPool1d(out_len)),
                    ("flatten", nn.Flatten()),
                    ("fc1", nn.Linear(width * out_len, hidden)),
                    ("act4", nn.ReLU()),
                    ("fc2", nn.Linear(hidden, num_classes)),
                ]
            )
        )

    return factory


_cnn1d = _cnn1d_layout("cnn1d", width=32, hidden=64, max_len=_CNN1D_MAX_LEN)
_cnn1d_small = _cnn1d_layout("cnn1d-small", width=16, hidden=32, max_len=_CNN1D_MAX_LEN // 2)


def _cnn2d_layout(
    name: str, widths: tuple[int, int, int], hidden: int, max_side: int
) -> Callable[[tuple[int, ...], int], nn.Module]:
    """A conv-conv-pool-conv-pool-fc-fc classifier for ``(channels, h, w)`` at a given size."""
    c1, c2, c3 = widths

    def factory(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if len(input_shape) != 3:
            raise ModelError(
                f"model {name!r} needs input_shape (channels, height, width), "
                f"got {tuple(input_shape)}"
            )
        channels, height, width = input_shape
        if height < 4 or width < 4:
            raise ModelError(f"model {name!r} needs height and width >= 4, got {height}x{width}")
        out_h = min(height // 4, max_side)
        out_w = min(width // 4, max_side)
        return nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(channels, c1, kernel_size=3, padding=1)),
                    ("act1", nn.ReLU()),
                    ("conv2", nn.Conv2d(c1, c2, kernel_size=3, padding=1)),
                    ("act2", nn.ReLU()),
                    ("pool1", nn.MaxPool2d(2)),
                    ("conv3", nn.Conv2d(c2, c3, kernel_size=3, padding=1)),
                    ("act3", nn.ReLU()),
                    ("pool2", nn.MaxPool2d(2)),
                    ("pool3", nn.AdaptiveAvgPool2d((out_h, out_w))),
                    ("flatten", nn.Flatten()),
                    ("fc1", nn.Linear(c3 * out_h * out_w, hidden)),
                    ("act4", nn.ReLU()),
                    ("fc2", nn.Linear(hidden, num_classes)),
                ]
            )
        )

    return factory


_cnn2d = _cnn2d_layout("cnn2d", widths=(16, 32, 32), hidden=64, max_side=_CNN2D_MAX_SIDE)
_cnn2d_small = _cnn2d_layout("cnn2d-small", widths=(8, 8, 16), hidden=32, max_side=_CNN2D_MAX_SIDE)


_REGISTRY: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "logreg": _logreg,
    "mlp": _mlp,
    "mlp-wide": _mlp_wide,
    "cnn1d": _cnn1d,
    "cnn2d": _cnn2d,
    "cnn1d-small": _cnn1d_small,
    "cnn2d-small": _cnn2d_small,
}

#: Registered model names, in a stable order.
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)

SMALL_MODELS: dict[str, str] = {"cnn1d-small": "cnn1d", "cnn2d-small": "cnn2d"}
"""Compact registry models and the full-size model each one shrinks (same input shapes,
>= 5x fewer parameters): distillation students (``student-model``) and the architecture
of small devices (``client-models``). They are ordinary registry models: any role a
model can take, they can take."""


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    seed: int | None = None,
) -> nn.Module:
    """Build a registered classifier producing ``(batch, num_classes)`` logits.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES`.
    input_shape : tuple of int
        Shape of one sample without the batch axis, e.g. ``(1, 40)`` or ``(1, 8, 8)``.
    num_classes : int
        Number of output logits (>= 2).
    seed : int, optional
        If given, parameters are initialized from this seed without disturbing the
        caller's global torch RNG; otherwise the global RNG is used.

    Returns
    -------
    torch.nn.Module
        A float32 model in training mode.

    Raises
    ------
    ModelError
        Unknown name, malformed shape, or a shape the model cannot take.
    """
    from fedsqueeze.models.user import build_user_model, user_factory

    user = user_factory(name) if name not in _REGISTRY else None
    if name not in _REGISTRY and user is None:
        raise ModelError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise ModelError(f"input_shape must be a tuple of ints, got {input_shape!r}") from None
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ModelError(f"input_shape must be a non-empty tuple of positive ints, got {shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ModelError(f"num_classes must be an int >= 2, got {num_classes!r}")

    def factory(shape: tuple[int, ...], classes: int) -> nn.Module:
        if user is not None:  # a user's own model (fedsqueeze.models.user), checked
            return build_user_model(name, user, shape, classes)
        return _REGISTRY[name](shape, classes)

    if seed is None:
        model = factory(shape, num_classes)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory(shape, num_classes)
    # Independent of torch.get_default_dtype(): the federation exchanges float32.
    return on_model_built(model.to(torch.float32))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
