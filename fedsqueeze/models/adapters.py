"""Low-rank adapters (LoRA): a frozen base model, trainable rank-r adapters per layer.

Each supported layer with weight ``W (out, in, *kernel)`` (Linear, ungrouped Conv1d/Conv2d)
gets two child layers, as low-rank factorization builds them
(:mod:`fedsqueeze.models.lowrank`):

- ``lora_down`` (``A``): the layer's own type at rank ``r`` (``Linear(in, r)``, or
  ``ConvNd(in, r)`` with the layer's kernel, stride, padding and dilation), no bias;
- ``lora_up`` (``B``): ``Linear(r, out)`` or a pointwise ``ConvNd(r, out, 1)``, no bias

(:func:`fedsqueeze.models.lowrank.thin_layers`, the same pair low-rank factorization uses)

and computes ``layer(x) + up(down(x))``, i.e. the weight ``W + B @ A`` (``A`` read as the
matrix ``(r, in * prod(kernel))``). The base keeps its ``state_dict`` names
(``fc1.weight``, ``fc1.bias``); the adapters add ``fc1.lora_down.weight`` and
``fc1.lora_up.weight`` (:func:`adapter_names`), so a base model loads unchanged and the
merged model (:func:`merge`: ``W + B @ A``, adapters dropped) is the plain architecture that
evaluation, checkpoints and ``fedsqueeze export`` see.

Initialisation (:func:`init_adapters`, seeded: the server makes it): ``B = 0`` (the adapted
model starts exactly at the base, as in LoRA) and ``A ~ N(0, 1 / fan_in)``, so ``A^T A``
has eigenvalues ~1 on the adapters' row space and a plain SGD step on ``B`` moves
``B @ A`` about as far as the same step moves a dense weight (LoRA's ``alpha / r`` scale
exists for the same reason; with ``A`` at this scale it is 1 and is left out). The rank is
capped at each layer's full rank.

Why not ``torch.nn.utils.parametrize``: it recomputes ``W + B @ A`` as the weight (one name,
``parametrizations.weight.original``), which renames the base; real child layers keep the
base's names, are what Opacus and ONNX understand, and merge with one matrix product.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from fedsqueeze.models.errors import ModelError
from fedsqueeze.models.lowrank import ranked_layer, thin_layers, unsupported_layer
from fedsqueeze.models.pruning import model_build_scope

DOWN, UP = "lora_down", "lora_up"

ADAPTER_KEY = "fedsqueeze.adapters"
"""ConfigRecord of a train message: the adapted layers and their ranks (``layers``,
``ranks``); the client builds the adapted architecture while it handles the message."""


class AdapterError(ModelError):
    """A layer adapters do not support, or ranks that do not fit a model."""


def adapter_names(layer: str) -> tuple[str, str]:
    """The ``state_dict`` names of ``layer``'s adapters: ``(A, B)``."""
    return f"{layer}.{DOWN}.weight", f"{layer}.{UP}.weight"


def is_adapter(name: str) -> bool:
    """Whether a ``state_dict`` name is an adapter tensor."""
    head = name.rpartition(".")[0]
    return head.endswith(f".{DOWN}") or head.endswith(f".{UP}")


def choose_ranks(arrays: Mapping[str, np.ndarray], rank: int) -> dict[str, int]:
    """Per layer with a matrix (2+-D) weight, its adapter rank: ``rank`` capped at full rank."""
    if rank < 1:
        raise ValueError(f"lowrank-adapter must be >= 1 to build adapters, got {rank}")
    out: dict[str, int] = {}
    for key, value in arrays.items():
        if key.endswith(".weight") and np.ndim(value) >= 2 and not is_adapter(key):
            shape = np.shape(value)
            out[key[: -len(".weight")]] = min(int(rank), shape[0], math.prod(shape[1:]))
    return out


def init_adapters(
    arrays: Mapping[str, np.ndarray], ranks: Mapping[str, int], seed: int
) -> dict[str, np.ndarray]:
    """Fresh adapters for ``ranks``: ``A ~ N(0, 1/fan_in)`` (seeded), ``B = 0``."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for layer, r in ranks.items():
        w = np.shape(arrays[f"{layer}.weight"])
        fan_in = math.prod(w[1:])
        a, b = adapter_names(layer)
        out[a] = rng.normal(0.0, 1.0 / math.sqrt(fan_in), (r, *w[1:])).astype(np.float32)
        out[b] = np.zeros((w[0], r, *([1] * (len(w) - 2))), dtype=np.float32)
    return out


def delta(adapters: Mapping[str, np.ndarray], layer: str, shape: tuple[int, ...]) -> np.ndarray:
    """``B @ A`` of ``layer``, in the weight's ``shape`` (float64)."""
    a, b = adapter_names(layer)
    down = np.asarray(adapters[a], dtype=np.float64)
    up = np.asarray(adapters[b], dtype=np.float64)
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)


def merge(
    base: Mapping[str, np.ndarray], adapters: Mapping[str, np.ndarray], ranks: Mapping[str, int]
) -> dict[str, np.ndarray]:
    """The plain model with weights ``W + B @ A`` (``base``'s names, order and dtype)."""
    out: dict[str, np.ndarray] = {}
    for key, value in base.items():
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        if layer is not None and layer in ranks:
            w = np.asarray(value, dtype=np.float64)
            out[key] = (w + delta(adapters, layer, w.shape)).astype(np.float32)
        else:
            out[key] = np.asarray(value)
    return out


def bytes_per_round(base: Mapping[str, np.ndarray], ranks: Mapping[str, int]) -> dict[str, int]:
    """fp32 bytes of the whole model and of the adapters (what a client trains and sends)."""
    full = sum(int(np.size(v)) for v in base.values())
    adapters = 0
    for layer, r in ranks.items():
        shape = np.shape(base[f"{layer}.weight"])
        adapters += r * (shape[0] + math.prod(shape[1:]))
    return {"model_bytes_dense": 4 * full, "adapter_bytes": 4 * adapters}


# ---- torch side: the adapted architecture -----------------------------------------------------


def _adapter_forward_hook(
    module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
) -> torch.Tensor:
    down, up = getattr(module, DOWN), getattr(module, UP)
    out: torch.Tensor = output + up(down(inputs[0]))
    return out


def check_supported(model: nn.Module) -> None:
    """Raise :class:`AdapterError` naming the first layer with a matrix (2+-D) parameter that
    is not a Linear or ungrouped Conv1d/Conv2d."""
    layer = unsupported_layer(model)
    if layer is not None:
        raise AdapterError(
            f"lowrank-adapter does not support layer {layer}; supported: Linear, Conv1d, Conv2d"
        )


def adapt_model(model: nn.Module, ranks: Mapping[str, int]) -> nn.Module:
    """Add the adapters for ``ranks`` to ``model`` (in place); the base's parameters get
    ``requires_grad = False``, the adapters' ``True``."""
    check_supported(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, rank in ranks.items():
        layer = ranked_layer(model, name, rank, "lowrank-adapter", AdapterError)
        down, up = thin_layers(layer, int(rank), up_bias=False)
        nn.init.zeros_(up.weight)  # type: ignore[arg-type]
        layer.add_module(DOWN, down)
        layer.add_module(UP, up)
        layer.register_forward_hook(_adapter_forward_hook)
    return model


@contextlib.contextmanager
def adapted_models(ranks: Mapping[str, int]) -> Iterator[None]:
    """Within this block every model built (:func:`~fedsqueeze.models.build_model`) carries
    the adapters for ``ranks`` (and a frozen base)."""
    ranks = dict(ranks)
    with model_build_scope(lambda model: adapt_model(model, ranks)):
        yield
