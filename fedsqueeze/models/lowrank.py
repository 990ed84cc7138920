"""Low-rank factorized layers: truncated SVD of the global model, clients train the factors.

A weight ``W`` of shape ``(out, in, *kernel)`` (Linear: no kernel; Conv1d/Conv2d: one or two
kernel axes) is read as the matrix ``(out, in * prod(kernel))`` and replaced by two thin
layers, ``W ~= U @ V`` with ``U: (out, r)`` and ``V: (r, in * prod(kernel))``:

- ``down``: the layer's own type at rank ``r`` (``Linear(in, r)``, or ``ConvNd(in, r)`` with the
  original kernel, stride, padding and dilation), no bias;
- ``up``: ``Linear(r, out)`` or a pointwise ``ConvNd(r, out, kernel_size=1)`` with the
  original bias.

``up(c * down(x))`` is the original layer with weight ``c * U @ V``: at full rank it *is* the
original layer (to float rounding). Both factors get ``sqrt`` of the singular values
(balanced), so neither starts much larger than the other, and both are divided by ``sqrt(c)``.

The per-layer constant ``c`` (:func:`choose_scales`: ``1 / sigma_max`` of the dense weight,
fixed when the ranks are chosen) keeps an SGD step on the factors from moving the product
further than the same step moves a dense weight. For ``W = U @ V`` a step ``-lr * grad`` on both
factors moves ``W`` by ``-lr * (G V^T V + U U^T G)``: the gradient ``G`` amplified by the
squared singular values of the factors — with balanced factors, ``sigma_i + sigma_j`` along
singular directions ``i, j``. Trained cnn1d layers have ``sigma_max`` of 2–4, so without
``c`` the factorized model trains at an effective learning rate up to ~7x the configured one;
at the default ``lr = 0.05`` with momentum 0.9 every client's model diverged and the
federation collapsed from 0.52 to ~0.1 accuracy the round it was factorized. With
``W = c * U' @ V'`` (``U' = U / sqrt(c)``, ``V' = V / sqrt(c)``) the same step moves ``W`` by
``-lr * c * (G V^T V + U U^T G)``: amplification ``(sigma_i + sigma_j) / sigma_max <= 2``. (The
same reason LoRA scales its adapters by ``alpha / r``.) The layer then holds ``r * (out + in*k)``
parameters instead of ``out * in*k``; a layer only gets factorized when that is fewer.

:func:`choose_ranks` picks each layer's rank from the global model: ``rank >= 1`` is a rank
(capped at the layer's full rank); ``0 < rank < 1`` keeps the fewest singular values whose
squared sum reaches that fraction of the layer's energy (``||W||_F^2``). The numpy functions
(:func:`factorize`, :func:`expand`) work on ``state_dict`` arrays — the server's side —
and :func:`factorized_models` makes every model built inside it (the train handler's, through
:func:`~fedsqueeze.models.pruning.model_build_scope`) the factorized architecture whose
``state_dict`` has exactly those arrays, so the handler loads, trains and returns factors
without knowing about them.

Why not ``torch.nn.utils.parametrize``: a parametrization keeps the dense weight's name and
computes it from the factors on every forward pass (no multiply-add saved); the federation
exchanges ``state_dict`` arrays, and two real layers are what Opacus (per-sample gradients of
Linear/Conv) and the ONNX export understand.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from fedsqueeze.models.errors import ModelError
from fedsqueeze.models.pruning import model_build_scope

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
DOWN, UP = "down", "up"


class LowRankError(ModelError):
    """A layer low-rank factorization does not support, or ranks that do not fit a model."""


def _layer_weights(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Layer names (``state_dict`` prefixes) whose ``.weight`` has two or more dimensions."""
    return [
        k[: -len(".weight")] for k, v in arrays.items() if k.endswith(".weight") and v.ndim >= 2
    ]


def saves(shape: tuple[int, ...], rank: int) -> bool:
    """Whether rank ``rank`` factors hold fewer parameters than the dense weight ``shape``."""
    out, fan_in = shape[0], math.prod(shape[1:])
    return rank * (out + fan_in) < out * fan_in


def choose_ranks(arrays: Mapping[str, np.ndarray], rank: float) -> dict[str, int]:
    """Per factorized layer, its rank (layers it would not shrink are left out: kept dense)."""
    if not (rank >= 1 and float(rank).is_integer()) and not 0 < rank < 1:
        raise ValueError(
            f"lowrank must be an integer rank >= 1 or a fraction in (0, 1), got {rank}"
        )
    out: dict[str, int] = {}
    for layer in _layer_weights(arrays):
        w = np.asarray(arrays[f"{layer}.weight"], dtype=np.float64)
        mat = w.reshape(w.shape[0], -1)
        full = min(mat.shape)
        if rank >= 1:
            r = min(int(rank), full)
        else:
            energy = np.cumsum(np.linalg.svd(mat, compute_uv=False) ** 2)
            total = energy[-1]
            r = (
                full
                if total == 0
                else int(np.searchsorted(energy, rank * total - 1e-12 * total)) + 1
            )
            r = min(max(r, 1), full)
        if saves(w.shape, r):
            out[layer] = r
    return out


def choose_scales(arrays: Mapping[str, np.ndarray], ranks: Mapping[str, int]) -> dict[str, float]:
    """Per factorized layer, the constant ``c = 1 / sigma_max`` of its dense weight (module doc;
    ``1`` for a zero weight)."""
    out: dict[str, float] = {}
    for layer in ranks:
        w = np.asarray(arrays[f"{layer}.weight"], dtype=np.float64)
        top = float(np.linalg.norm(w.reshape(w.shape[0], -1), ord=2)) if w.size else 0.0
        out[layer] = 1.0 / top if top > 0 and np.isfinite(top) else 1.0
    return out


def _scale(scales: Mapping[str, float] | None, layer: str) -> float:
    return 1.0 if scales is None else float(scales.get(layer, 1.0))


def factorize(
    arrays: Mapping[str, np.ndarray],
    ranks: Mapping[str, int],
    scales: Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """``arrays`` with each ranked layer's weight (and bias) replaced by its balanced rank-r SVD
    factors divided by ``sqrt(c)`` (``scales``; none: ``c = 1``), in the ``state_dict`` order of
    the factorized model."""
    missing = [layer for layer in ranks if f"{layer}.weight" not in arrays]
    if missing:
        raise LowRankError(f"lowrank names layer {missing[0]!r}, which the model does not have")
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        layer, _, leaf = key.rpartition(".")
        if layer not in ranks:
            out[key] = np.asarray(value, dtype=np.float32)
            continue
        if leaf == "bias":
            out[f"{layer}.{UP}.bias"] = np.asarray(value, dtype=np.float32)
            continue
        w = np.asarray(value, dtype=np.float64)
        r, kernel = ranks[layer], w.shape[2:]
        u, s, vt = np.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
        root = np.sqrt(s[:r] / _scale(scales, layer))
        down = (root[:, None] * vt[:r]).reshape(r, *w.shape[1:])
        up = (u[:, :r] * root[None, :]).reshape(w.shape[0], r, *([1] * len(kernel)))
        out[f"{layer}.{DOWN}.weight"] = down.astype(np.float32)
        out[f"{layer}.{UP}.weight"] = up.astype(np.float32)
    # the bias comes after the weight in a state_dict, so it lands after the up factor
    return out


def expand(
    factors: Mapping[str, np.ndarray],
    ranks: Mapping[str, int],
    scales: Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Inverse of :func:`factorize` up to the truncation: the dense arrays ``c * U @ V``."""
    out: dict[str, np.ndarray] = {}
    for key, value in factors.items():
        head, _, leaf = key.rpartition(".")
        layer, _, part = head.rpartition(".")
        if layer not in ranks or part not in (DOWN, UP):
            out[key] = np.asarray(value, dtype=np.float32)
            continue
        if part == DOWN:
            continue
        if leaf == "bias":
            out[f"{layer}.bias"] = np.asarray(value, dtype=np.float32)
            continue
        down = np.asarray(factors[f"{layer}.{DOWN}.weight"], dtype=np.float64)
        up = np.asarray(value, dtype=np.float64)
        w = _scale(scales, layer) * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))
        out[f"{layer}.weight"] = w.reshape(up.shape[0], *down.shape[1:]).astype(np.float32)
    return out


def parameter_counts(
    arrays: Mapping[str, np.ndarray], ranks: Mapping[str, int]
) -> dict[str, tuple[int, int]]:
    """Per factorized layer: ``(dense weight parameters, factor parameters)``."""
    out = {}
    for layer, r in ranks.items():
        shape = np.shape(arrays[f"{layer}.weight"])
        out[layer] = (math.prod(shape), r * (shape[0] + math.prod(shape[1:])))
    return out


# ---- torch side: the factorized architecture -------------------------------------------------


class Factorized(nn.Module):
    """``up(scale * down(x))``: a Linear/Conv layer as two thin layers (see the module doc).

    ``scale`` is a constant of the architecture (like a kernel size), not a parameter or a
    buffer: it is not trained and does not travel with the factors."""

    def __init__(self, down: nn.Module, up: nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.down, self.up, self.scale = down, up, float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        out: torch.Tensor = self.up(h if self.scale == 1.0 else h * self.scale)
        return out


def thin_layers(layer: nn.Module, rank: int, up_bias: bool) -> tuple[nn.Module, nn.Module]:
    """The two thin layers of rank ``rank`` for ``layer`` (module doc): ``down``, the layer's
    own type (same kernel, stride, padding, dilation) without bias, and ``up``, a Linear or
    pointwise Conv (with a bias when ``up_bias``). Also the shape of low-rank adapters
    (:mod:`fedsqueeze.models.adapters`)."""
    if isinstance(layer, nn.Linear):
        return (
            nn.Linear(layer.in_features, rank, bias=False),
            nn.Linear(rank, layer.out_features, bias=up_bias),
        )
    assert isinstance(layer, nn.Conv1d | nn.Conv2d)
    conv = type(layer)
    down = conv(
        layer.in_channels,
        rank,
        kernel_size=layer.kernel_size,  # type: ignore[arg-type]
        stride=layer.stride,  # type: ignore[arg-type]
        padding=layer.padding,  # type: ignore[arg-type]
        dilation=layer.dilation,  # type: ignore[arg-type]
        bias=False,
        padding_mode=layer.padding_mode,
    )
    return down, conv(rank, layer.out_channels, kernel_size=1, bias=up_bias)


def _factor_layers(layer: nn.Module, rank: int, scale: float = 1.0) -> Factorized:
    down, up = thin_layers(layer, rank, up_bias=layer.bias is not None)
    return Factorized(down, up, scale)


def unsupported_layer(model: nn.Module) -> str | None:
    """``'name' (Kind)`` of the first layer with a matrix (2+-D) parameter that is not a Linear
    or ungrouped Conv1d/Conv2d, or None."""
    for name, module in model.named_modules():
        if not any(p.ndim >= 2 for p in module.parameters(recurse=False)):
            continue
        if not isinstance(module, SUPPORTED) or getattr(module, "groups", 1) != 1:
            kind = type(module).__name__ + (" (grouped)" if isinstance(module, SUPPORTED) else "")
            return f"{name!r} ({kind})"
    return None


def check_supported(model: nn.Module) -> None:
    """Raise :class:`LowRankError` naming the first layer :func:`unsupported_layer` finds."""
    layer = unsupported_layer(model)
    if layer is not None:
        raise LowRankError(
            f"lowrank does not support layer {layer}; supported: Linear, Conv1d, Conv2d"
        )


def ranked_layer(
    model: nn.Module, name: str, rank: int, key: str, error: type[Exception]
) -> nn.Module:
    """The supported layer ``name`` of ``model``, checked against ``rank`` (the run-config
    ``key`` and ``error`` type name the feature in the one-line message)."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise error(f"{key} names layer {name!r}, which the model does not have") from None
    if not isinstance(layer, SUPPORTED):
        raise error(f"{key} does not support layer {name!r} ({type(layer).__name__})")
    full = min(layer.weight.shape[0], math.prod(layer.weight.shape[1:]))
    if not 1 <= int(rank) <= full:
        raise error(f"{key} rank {rank} for layer {name!r} outside 1..{full}")
    return layer


def factorize_model(
    model: nn.Module, ranks: Mapping[str, int], scales: Mapping[str, float] | None = None
) -> nn.Module:
    """Replace each ranked layer of ``model`` (in place) by its :class:`Factorized` pair."""
    check_supported(model)
    for name, rank in ranks.items():
        layer = ranked_layer(model, name, rank, "lowrank", LowRankError)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        scale = _scale(scales, name)
        if not (np.isfinite(scale) and scale > 0):
            raise LowRankError(f"scale {scale} for layer {name!r} must be finite and > 0")
        setattr(parent, child, _factor_layers(layer, int(rank), scale))
    return model


@contextlib.contextmanager
def factorized_models(
    ranks: Mapping[str, int], scales: Mapping[str, float] | None = None
) -> Iterator[None]:
    """Within this block every model built (:func:`~fedsqueeze.models.build_model`) is the
    factorized architecture for ``ranks`` (and ``scales``)."""
    ranks = dict(ranks)
    scales = dict(scales) if scales is not None else None
    with model_build_scope(lambda model: factorize_model(model, ranks, scales)):
        yield
