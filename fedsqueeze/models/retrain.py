"""Retraining a deployed model: where it starts (``init-model``) and what it may change
(``train-layers``). Plain torch/numpy; the Flower glue is ``fedsqueeze.server.layers``
(server) and ``fedsqueeze.client.layers`` (client).

``init-model = PATH`` accepts

- a ``model.pt`` written by an earlier run (a ``torch.save`` of named tensors), or the run
  directory holding it;
- an ``export.json`` written by ``fedsqueeze export`` (the artifact's source: the run
  directory it names, whose ``model.pt`` is the float model the artifact was made from);
- an ``.npz`` of named float arrays (the model's ``state_dict`` names).

Its names and shapes must be exactly those of the run's ``model`` for the run's dataset,
and every value finite; otherwise :class:`InitModelError` (a ``ConfigError``: one line,
exit status 2, before any run directory exists).

``train-layers`` names what fine-tuning may change:

- ``"all"``: every tensor (the default; nothing changes);
- ``"last"``: the tensors of the last module that has parameters (the classifier head);
- ``"NAME,NAME"``: modules (``fc2`` selects ``fc2.weight`` and ``fc2.bias``) or single
  tensors (``fc2.bias``) by their ``state_dict`` names.

The contract (what the wrappers guarantee): only the selected tensors travel in the train
messages' model record and in the replies; every uplink stage — compression, clipping,
central/distributed DP noise, SecAgg masking — sees and acts on the selected tensors only;
on the client the other parameters have ``requires_grad = False``, so DP-SGD clips and
noises only the selected ones; the frozen tensors reach the device once per train message
in a separate record (:data:`FROZEN_KEY`) and are never changed by a round.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsqueeze.contracts.checks import ConfigError

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "FROZEN_KEY",
    "SPEC_CLASSES",
    "SPEC_SHAPE",
    "TRAIN_TENSORS",
    "InitModelError",
    "decode_arrays",
    "encode_arrays",
    "load_init_model",
    "resolve_train_layers",
    "set_trainable",
]

FROZEN_KEY = "fedsqueeze.frozen"
"""ConfigRecord of a train message with the tensors the round does not train (``payload``:
an uncompressed ``.npz`` of them)."""

TRAIN_TENSORS = "train-tensors"
"""Key in a train message's ``config`` record: the tensors the handler may change."""

SPEC_SHAPE = "model-input-shape"
SPEC_CLASSES = "model-num-classes"
"""Keys in train/evaluate ``config`` records: the federation model's input shape and number
of classes, so that a device with its own data builds the model without the run's dataset."""


class InitModelError(ConfigError):
    """``init-model`` cannot start this run (missing, unreadable, or another architecture)."""


def _state_file(path: Path) -> Path:
    if path.is_dir():
        return path / "model.pt"
    if path.name.endswith(".json"):
        try:
            report = json.loads(path.read_text())
            return Path(str(report["run_dir"])) / "model.pt"
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InitModelError(
                f"init-model = {str(path)!r}: not an export.json naming its run ({err!r})"
            ) from None
    return path


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    where = f"init-model = {str(path)!r}"
    if not path.is_file():
        raise InitModelError(f"{where}: file not found")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: np.asarray(npz[k]) for k in npz.files}
        import torch  # only a model.pt needs it; the ClientApp imports this module torch-free

        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InitModelError(f"{where}: not a model file ({reason[:200]})") from None
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise InitModelError(f"{where}: expected a dict of named tensors (a model.pt)")
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def load_init_model(path: str | Path, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights at ``path`` as float32 arrays in ``reference``'s order, after checking
    they are the same architecture (names, shapes) and finite.

    Raises
    ------
    InitModelError
        One line naming the path and the first mismatch.
    """
    src = Path(str(path)).expanduser()
    arrays = _read_arrays(_state_file(src))
    where = f"init-model = {str(path)!r}"
    missing = [k for k in reference if k not in arrays]
    extra = [k for k in arrays if k not in reference]
    if missing or extra:
        raise InitModelError(
            f"{where}: another architecture than this run's model (missing: "
            f"{', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(extra[:3]) or 'none'})"
        )
    out: dict[str, np.ndarray] = {}
    for name, ref in reference.items():
        arr = arrays[name]
        if tuple(arr.shape) != tuple(ref.shape):
            raise InitModelError(
                f"{where}: {name} has shape {tuple(arr.shape)}, this run's model needs "
                f"{tuple(ref.shape)}"
            )
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise InitModelError(f"{where}: {name} has dtype {arr.dtype}, expected floats")
        value = arr.astype(np.float32)
        if not np.all(np.isfinite(value)):
            raise InitModelError(f"{where}: {name} holds NaN or Inf")
        out[name] = value
    return out


def resolve_train_layers(spec: str, names: Sequence[str], parameters: Sequence[str]) -> list[str]:
    """The state entries ``spec`` selects, in ``names`` (state_dict) order.

    ``parameters`` are the names of the trainable parameters (not buffers): ``"last"`` is
    the module of the last of them. Raises ``ConfigError`` for an unknown name or an empty
    selection.
    """
    spec = str(spec).strip()
    if spec == "all":
        return list(names)
    if spec == "last":
        if not parameters:
            raise ConfigError("train-layers = 'last': the model has no parameters")
        modules = [parameters[-1].rpartition(".")[0]]
    else:
        modules = [m.strip() for m in spec.split(",") if m.strip()]
        if not modules:
            raise ConfigError(f"train-layers = {spec!r}: name at least one layer")
    chosen: list[str] = []
    for module in modules:
        hits = [n for n in names if n == module or (module and n.startswith(module + "."))]
        if not hits:
            raise ConfigError(
                f"train-layers = {spec!r}: the model has no layer or tensor {module!r} "
                f"(tensors: {', '.join(names)})"
            )
        chosen += hits
    return [n for n in names if n in set(chosen)]


def model_train_layers(model: nn.Module, spec: str) -> list[str]:
    """:func:`resolve_train_layers` for a built model."""
    params = [n for n, p in model.named_parameters() if p.requires_grad]
    return resolve_train_layers(spec, list(model.state_dict()), params)


def set_trainable(model: nn.Module, tensors: Sequence[str] | None) -> None:
    """Freeze every parameter not in ``tensors`` (None: leave the model as it is)."""
    if tensors is None:
        return
    keep = set(tensors)
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Named float32 arrays as an uncompressed ``.npz`` (no pickles)."""
    buf = io.BytesIO()
    named: dict[str, Any] = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
    np.savez(buf, **named)
    return buf.getvalue()


def decode_arrays(payload: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_arrays`; raises ``ValueError`` on anything else."""
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            out = {k: np.asarray(npz[k]) for k in npz.files}
    except Exception as err:  # zipfile / numpy format errors
        raise ValueError(f"not a frozen-tensor payload ({type(err).__name__})") from None
    for name, arr in out.items():
        if arr.dtype != np.float32 or not np.all(np.isfinite(arr)):
            raise ValueError(f"frozen tensor {name} is not finite float32")
    return out


def spec_config(input_shape: Sequence[int], num_classes: int) -> dict[str, list[int] | int]:
    """The ``config`` entries announcing the federation's model shape."""
    return {SPEC_SHAPE: [int(d) for d in input_shape], SPEC_CLASSES: int(num_classes)}


def read_spec(config: Mapping[str, object]) -> tuple[tuple[int, ...], int] | None:
    """``(input_shape, num_classes)`` from a message's config, or None if not announced."""
    if SPEC_SHAPE not in config or SPEC_CLASSES not in config:
        return None
    shape = tuple(int(d) for d in config[SPEC_SHAPE])  # type: ignore[attr-defined]
    classes = int(config[SPEC_CLASSES])  # type: ignore[call-overload]
    if not shape or any(d < 1 for d in shape) or classes < 2 or math.prod(shape) > 2**31:
        raise ValueError(f"implausible model spec {shape}, {classes} classes")
    return shape, classes
