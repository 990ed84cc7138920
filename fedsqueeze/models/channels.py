"""Channel (structured) pruning: whole neurons / filters, and the smaller model they leave.

:func:`channel_masks` removes, in every hidden Linear/Conv layer, the fraction of output
channels whose weight rows have the smallest L2 norm (Li et al. 2017 rank filters by norm),
together with their bias entries and the input columns of the next layer that read them.
The result is an ordinary mask, so everything of magnitude pruning applies unchanged in the
federation (server-decided mask, masked training, kept-values-only updates); a pruned channel
outputs exactly ``act(0 + 0)`` = 0 for ReLU-style activations, so the next layer never sees it.

:func:`shrink` then builds the physically smaller model: the same ``nn.Sequential`` with
those channels gone — fewer parameters, fewer multiply-adds, not only more zeros — whose
outputs equal the masked model's.

The chain of layers is read from the ``state_dict`` order of an ``nn.Sequential`` whose
weighted layers are Linear/Conv (the model zoo's, and any user model of that shape); a
``Flatten`` between a conv and a Linear layer is recognised by the input width being a
multiple of the channel count (channel-major flattening). The last layer (the classifier) keeps
its outputs. Other shapes raise :class:`~fedsqueeze.models.pruning.PruningError` naming the
layer.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedsqueeze.models.pruning import PruningError

_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _layers(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Names (prefixes) of the weighted layers, in order."""
    names = [
        k[: -len(".weight")] for k, v in arrays.items() if k.endswith(".weight") and np.ndim(v) >= 2
    ]
    if len(names) < 2:
        raise PruningError("channel pruning needs at least two Linear/Conv layers")
    return names


def kept_channels(
    arrays: Mapping[str, np.ndarray],
    sparsity: float,
    previous: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Per hidden layer, the indices of its kept output channels (by L2 norm of the rows)."""
    out = {}
    for layer in _layers(arrays)[:-1]:
        w = np.asarray(arrays[f"{layer}.weight"], dtype=np.float64)
        norms = np.sqrt((w.reshape(w.shape[0], -1) ** 2).sum(axis=1))
        if previous is not None:  # channels pruned before stay pruned
            alive = previous[f"{layer}.weight"].reshape(w.shape[0], -1).any(axis=1)
            norms = np.where(alive, norms, -1.0)
        n_drop = min(int(np.floor(sparsity * w.shape[0])), w.shape[0] - 1)
        order = np.argsort(norms, kind="stable")
        out[layer] = np.sort(order[n_drop:])
    return out


def channel_masks(
    arrays: Mapping[str, np.ndarray],
    sparsity: float,
    previous: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Masks (True = kept) removing ``sparsity`` of each hidden layer's output channels."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    masks = {k: np.ones(np.shape(v), dtype=bool) for k, v in arrays.items()}
    layers = _layers(arrays)
    kept = kept_channels(arrays, sparsity, previous)
    for layer, nxt in itertools.pairwise(layers):
        w = masks[f"{layer}.weight"]
        drop = np.setdiff1d(np.arange(w.shape[0]), kept[layer])
        w[drop] = False
        if f"{layer}.bias" in masks:
            masks[f"{layer}.bias"][drop] = False
        nw = masks[f"{nxt}.weight"]
        factor, rest = divmod(nw.shape[1], w.shape[0])
        if rest or factor < 1:
            raise PruningError(
                f"layer {nxt!r} takes {nw.shape[1]} inputs, not a multiple of the "
                f"{w.shape[0]} channels of {layer!r}"
            )
        cols = (drop[:, None] * factor + np.arange(factor)[None, :]).ravel()
        nw[:, cols] = False
    return masks


def _slice_layer(
    layer: nn.Module, out_idx: np.ndarray | None, in_idx: np.ndarray | None
) -> nn.Module:
    w = layer.weight.detach()
    if out_idx is not None:
        w = w[torch.from_numpy(out_idx)]
    if in_idx is not None:
        w = w[:, torch.from_numpy(in_idx)]
    bias = layer.bias.detach() if layer.bias is not None else None
    if bias is not None and out_idx is not None:
        bias = bias[torch.from_numpy(out_idx)]
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    else:
        conv = type(layer)
        new = conv(
            w.shape[1],
            w.shape[0],
            kernel_size=layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            bias=bias is not None,
        )
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def shrink(model: nn.Sequential, kept: Mapping[str, np.ndarray]) -> nn.Sequential:
    """A copy of ``model`` without the pruned channels (``kept`` from :func:`kept_channels`)."""
    if not isinstance(model, nn.Sequential):
        raise PruningError(f"shrink needs an nn.Sequential, got {type(model).__name__}")
    children = list(model.named_children())
    weighted = [n for n, m in children if hasattr(m, "weight") and m.weight is not None]
    for name, module in children:
        if name in weighted and not isinstance(module, _SUPPORTED):
            raise PruningError(
                f"channel pruning does not support layer {name!r} ({type(module).__name__})"
            )
        if name in weighted and getattr(module, "groups", 1) != 1:
            raise PruningError(f"channel pruning does not support grouped convolution {name!r}")
    new_children: list[tuple[str, nn.Module]] = []
    in_idx: np.ndarray | None = None
    prev_channels = 0
    for name, module in children:
        if name not in weighted:
            new_children.append((name, module))
            continue
        cols = None
        if in_idx is not None:
            factor = module.weight.shape[1] // prev_channels
            cols = (in_idx[:, None] * factor + np.arange(factor)[None, :]).ravel()
        out_idx = kept.get(name)
        new_children.append((name, _slice_layer(module, out_idx, cols)))
        prev_channels = module.weight.shape[0]
        in_idx = out_idx
    return nn.Sequential(OrderedDict(new_children))


def shrink_zero_channels(model: nn.Sequential) -> nn.Sequential:
    """:func:`shrink` with the kept channels read off the weights: a hidden channel whose weight
    row and bias entry are exactly zero (what channel pruning leaves) is removed. This is how
    the export of a channel-pruned run gets the physically smaller model from ``model.pt``."""
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    kept = {}
    for layer in _layers(arrays)[:-1]:
        w = arrays[f"{layer}.weight"].reshape(arrays[f"{layer}.weight"].shape[0], -1)
        alive = w.any(axis=1)
        if f"{layer}.bias" in arrays:
            alive |= arrays[f"{layer}.bias"] != 0
        if not alive.any():
            alive[0] = True  # keep the layer connected
        kept[layer] = np.flatnonzero(alive)
    return shrink(model, kept)
