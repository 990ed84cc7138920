"""Quantization-aware training (int8) inside the federation, and the int8 model it produces.

The scheme (one, shared by training, the server's per-round int8 accuracy and the export):

- **weights**: per-output-channel symmetric int8 in ``[-127, 127]``, scale
  ``max|w_c| / 127`` — a function of the weights alone (:func:`weight_scales`), so nothing but
  the weights has to be federated for them;
- **activations**: the input of every quantized layer (``Linear``, ``Conv1d``, ``Conv2d``),
  per-tensor affine int8 in ``[-128, 127]`` with a scale and zero point from an observer.
  Clients train with torchao's ``FakeQuantize`` + ``MovingAverageMinMaxObserver`` (their own
  observers, per round, discarded after training); the int8 model's ranges are calibrated by
  the server (:func:`calibrate`, torchao's ``MinMaxObserver``) on its own calibration data —
  the data the edge export calibrates on.
- biases stay fp32 (onnxruntime folds them; they are a few hundred bytes).

Why torchao's observers and fake-quant modules, used eagerly, rather than torchao's QAT API or
``torch.ao.quantization``: ``torch.ao.quantization`` is being retired in favour of torchao, whose
``torchao.quantization.pt2e`` is its maintained home (the same ``FakeQuantize`` and observers).
torchao's module-swap QAT (``QATConfig``) covers ``Linear``/``Embedding`` only (no convolutions)
and fake-quantizes activations dynamically per token (no static scales an int8 artifact could
use); its PT2E QAT traces the model into a ``GraphModule``, whose state dict gains observer
buffers and whose batch shape is fixed at trace time. Here the model stays the user's module:
global forward hooks, active only inside :func:`qat_training`, fake-quantize the inputs and
weights of every quantized layer, so the model's ``state_dict`` — the arrays the federation
exchanges — keeps its names and shapes, and the pruning mask, FedProx and every codec act on
the same parameters as without QAT.

The int8 model (:func:`int8_model`) is the fp32 model with each quantized layer replaced by
one holding its int8 weights, per-channel scales and the activation's (scale, zero point),
computing ``quantize -> dequantize`` of its input and ``dequantize`` of its weights with
torchao's ``quantized_decomposed`` ops. The server evaluates it every round, and
``torch.onnx`` exports that same module as an ONNX QDQ graph with int8 weight initializers
(``fedsqueeze.models.export``), so the artifact computes what the federation reported.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedsqueeze.contracts.records import QAT_KEY
from fedsqueeze.models.zoo import ModelError

__all__ = [
    "QAT_KEY",
    "QATError",
    "calibrate",
    "check_supported",
    "int8_bytes",
    "int8_model",
    "qat_training",
    "weight_scales",
]

QUANTIZED = (nn.Linear, nn.Conv1d, nn.Conv2d)
WEIGHT_RANGE = (-127, 127)
ACT_RANGE = (-128, 127)
MIN_SCALE = float(torch.finfo(torch.float32).eps)
"""Smallest scale (an all-zero channel, e.g. one the pruning mask removed)."""


class QATError(ModelError):
    """A model QAT cannot quantize (names the layer), or scales that do not fit the model."""


def _torchao() -> Any:
    """torchao's pt2e quantization package (imported lazily: ~3 s; it also registers the
    ``quantized_decomposed`` ops). Its loader warns about CUDA kernels a CPU build lacks."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    import torchao.quantization.pt2e as pt2e
    import torchao.quantization.pt2e.fake_quantize
    import torchao.quantization.pt2e.observer  # noqa: F401

    return pt2e


def _unsupported(layer: str) -> str:
    return (
        f"qat: layer {layer} has weights qat cannot quantize; supported: Linear, Conv1d, "
        "Conv2d (and layers without weights)"
    )


def check_supported(model: nn.Module) -> None:
    """Raise :class:`QATError` naming the first layer with weights QAT cannot quantize."""
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZED):
            if isinstance(module, nn.Conv1d | nn.Conv2d) and module.padding_mode != "zeros":
                raise QATError(
                    f"qat: layer {name!r} ({type(module).__name__}) uses padding_mode="
                    f"{module.padding_mode!r}; only 'zeros' is supported"
                )
            continue
        if any(True for _ in module.parameters(recurse=False)):
            raise QATError(_unsupported(f"{name!r} ({type(module).__name__})"))


def weight_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric scales ``max|w_c| / 127`` (at least :data:`MIN_SCALE`)."""
    w = weight.detach()
    return (w.abs().reshape(w.shape[0], -1).amax(dim=1) / WEIGHT_RANGE[1]).clamp_min(MIN_SCALE)


def _fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    scale = weight_scales(weight).to(torch.float32)
    zero = torch.zeros(scale.shape, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, *WEIGHT_RANGE)


# ---- client side: training with fake quantization ----------------------------------------

_ACTIVE: contextvars.ContextVar[_QATScope | None] = contextvars.ContextVar(
    "fedsqueeze_qat", default=None
)


class _QATScope:
    """The fake quantizers of one training call, keyed by layer (see :func:`qat_training`)."""

    def __init__(self) -> None:
        self.pt2e = _torchao()
        self.act: dict[int, tuple[nn.Module, nn.Module]] = {}  # id -> (layer, FakeQuantize)
        self.checked: set[int] = set()

    def _act_quantizer(self, module: nn.Module) -> nn.Module:
        entry = self.act.get(id(module))
        if entry is None or entry[0] is not module:
            fq = self.pt2e.fake_quantize.FakeQuantize(
                observer=self.pt2e.observer.MovingAverageMinMaxObserver,
                quant_min=ACT_RANGE[0],
                quant_max=ACT_RANGE[1],
                dtype=torch.qint8,
                qscheme=torch.per_tensor_affine,
            )
            entry = self.act[id(module)] = (module, fq)
        return entry[1]

    def pre(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if _ACTIVE.get() is not self:
            return None
        if not isinstance(module, QUANTIZED):
            if id(module) not in self.checked:
                if any(True for _ in module.parameters(recurse=False)):
                    raise QATError(_unsupported(type(module).__name__))
                self.checked.add(id(module))
            return None
        # The layer's forward reads ``self.weight``: an instance attribute shadows the
        # parameter for this call only (removed by ``post``), so the state dict, the
        # optimizer and any mask hooks see the unchanged parameter; gradients reach it
        # through the straight-through estimator.
        object.__setattr__(module, "weight", _fake_quant_weight(module._parameters["weight"]))
        fq = self._act_quantizer(module)
        fq.train(module.training)
        return (fq(args[0]), *args[1:])

    def post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        module.__dict__.pop("weight", None)

    def close(self) -> None:
        for module, _ in self.act.values():
            module.__dict__.pop("weight", None)


@contextlib.contextmanager
def qat_training() -> Iterator[None]:
    """Within this block (this thread/context), every ``Linear``/``Conv1d``/``Conv2d`` forward
    fake-quantizes its weights (per-channel symmetric int8) and its input (per-tensor int8,
    a torchao observer per layer); any other layer with weights raises :class:`QATError`.

    The hooks are process-wide (``torch.nn`` offers no per-model scope without changing the
    model) but act only in the context that entered the block, and are removed on exit.
    """
    scope = _QATScope()
    token = _ACTIVE.set(scope)
    hooks = [
        nn.modules.module.register_module_forward_pre_hook(scope.pre),
        nn.modules.module.register_module_forward_hook(scope.post),
    ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        scope.close()
        _ACTIVE.reset(token)


# ---- server side: the int8 model ---------------------------------------------------------


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers the int8 model quantizes, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZED)]


@torch.no_grad()
def calibrate(
    model: nn.Module, x: np.ndarray, batch_size: int = 256
) -> dict[str, tuple[float, int]]:
    """Activation ``(scale, zero_point)`` per quantized layer: torchao's ``MinMaxObserver``
    (per-tensor affine int8) on the layer inputs of the fp32 model over ``x``."""
    check_supported(model)
    pt2e = _torchao()
    observers = {
        name: pt2e.observer.MinMaxObserver(
            dtype=torch.qint8,
            qscheme=torch.per_tensor_affine,
            quant_min=ACT_RANGE[0],
            quant_max=ACT_RANGE[1],
        )
        for name, _ in quantized_layers(model)
    }
    handles = [
        module.register_forward_pre_hook(lambda _m, args, obs=observers[name]: obs(args[0]))
        for name, module in quantized_layers(model)
    ]
    was_training = model.training
    model.eval()
    try:
        data = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        for start in range(0, len(data), batch_size):
            model(data[start : start + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for name, obs in observers.items():
        scale, zero = obs.calculate_qparams()
        out[name] = (float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0]))
    return out


class QDQLayer(nn.Module):
    """A ``Linear``/``Conv1d``/``Conv2d`` with int8 weights and a quantized input."""

    def __init__(self, layer: nn.Module, act_scale: float, act_zero: int) -> None:
        super().__init__()
        w = layer.weight.detach().to(torch.float32)
        scale = weight_scales(w)
        shape = (-1,) + (1,) * (w.dim() - 1)
        q = torch.clamp(torch.round(w / scale.reshape(shape)), *WEIGHT_RANGE).to(torch.int8)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero", torch.zeros(scale.shape, dtype=torch.int64))
        bias = None if layer.bias is None else layer.bias.detach().clone()
        self.register_buffer("bias", bias)
        if not (math.isfinite(act_scale) and act_scale > 0) or not -128 <= act_zero <= 127:
            raise QATError(f"invalid activation scale/zero point {act_scale}, {act_zero}")
        self.act_scale, self.act_zero = float(act_scale), int(act_zero)
        self.kind = type(layer).__name__
        if isinstance(layer, nn.Conv1d | nn.Conv2d):
            self.conv = {
                "stride": layer.stride,
                "padding": layer.padding,
                "dilation": layer.dilation,
                "groups": layer.groups,
            }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        s, z = self.act_scale, self.act_zero
        x = qd.quantize_per_tensor(x, s, z, ACT_RANGE[0], ACT_RANGE[1], torch.int8)
        x = qd.dequantize_per_tensor(x, s, z, ACT_RANGE[0], ACT_RANGE[1], torch.int8)
        w = qd.dequantize_per_channel(
            self.weight_int8,
            self.weight_scale,
            self.weight_zero,
            0,
            WEIGHT_RANGE[0],
            WEIGHT_RANGE[1],
            torch.int8,
        )
        if self.kind == "Linear":
            return F.linear(x, w, self.bias)
        conv = F.conv1d if self.kind == "Conv1d" else F.conv2d
        return conv(x, w, self.bias, **self.conv)


def int8_model(model: nn.Module, scales: Mapping[str, tuple[float, int]]) -> nn.Module:
    """A copy of ``model`` (eval mode) whose quantized layers are :class:`QDQLayer` s."""
    check_supported(model)
    _torchao()  # the quantized_decomposed ops
    layers = quantized_layers(model)
    missing = sorted({n for n, _ in layers} - set(scales))
    if missing:
        raise QATError(f"no activation scale for layer(s) {', '.join(missing)}")
    out = copy.deepcopy(model).eval()
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        s, z = scales[name]
        setattr(parent, child, QDQLayer(layer, float(s), int(z)))
    return out.eval()


def int8_bytes(model: nn.Module) -> int:
    """Bytes of the int8 model as stored: int8 weights of the quantized layers, their fp32
    per-channel scales and biases, the activation (scale, zero point) pairs, and any other
    parameters in fp32."""
    total = 0
    for _, layer in quantized_layers(model):
        w = layer.weight
        total += w.numel() + 4 * w.shape[0] + 8
        if layer.bias is not None:
            total += 4 * layer.bias.numel()
    quantized = {id(m.weight) for _, m in quantized_layers(model)}
    quantized |= {id(m.bias) for _, m in quantized_layers(model) if m.bias is not None}
    total += sum(4 * p.numel() for p in model.parameters() if id(p) not in quantized)
    return total
