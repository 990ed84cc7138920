"""Users' own models: ``model = "package.module:factory"`` in the run config, or a name given
to :func:`register_model` by code that builds apps in Python.

``factory(input_shape, num_classes)`` returns a ``torch.nn.Module`` producing
``(batch, num_classes)`` logits. Every way it can be wrong is a :class:`ModelError` of one
line naming the spec: the module cannot be imported, it has no such attribute, the attribute
is not callable, the factory raises, what it returns is not an ``nn.Module``, or its output
for a batch of two zero samples has the wrong shape. The model then goes through the same
build scopes as the zoo's (pruning masks, low-rank factors), which name any layer they do
not support.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from fedsqueeze.models.errors import ModelError

Factory = Callable[[tuple[int, ...], int], nn.Module]

_REGISTERED: dict[str, Factory] = {}


def register_model(name: str, factory: Factory) -> None:
    """Make ``model = name`` build ``factory(input_shape, num_classes)`` in this process
    (a built-in name, such as ``mlp``, keeps building the built-in model)."""
    if not name or ":" in name:
        raise ModelError(f"cannot register model {name!r}: empty, or has ':'")
    if not callable(factory):
        raise ModelError(f"cannot register model {name!r}: the factory is not callable")
    _REGISTERED[name] = factory


def is_user_model(spec: str) -> bool:
    return spec in _REGISTERED or ":" in spec


def user_factory(spec: str) -> Factory | None:
    """The factory ``spec`` names (registered, or ``module:attribute``); None if neither."""
    if spec in _REGISTERED:
        return _REGISTERED[spec]
    if ":" not in spec:
        return None
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import failure is the user's: say which and why, in a line
        raise ModelError(f"model = {spec!r}: cannot import {module_name!r} ({err!r})") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelError(f"model = {spec!r}: {module_name!r} has no callable {attr!r}")
    return factory  # type: ignore[no-any-return]


def build_user_model(
    spec: str, factory: Factory, shape: tuple[int, ...], classes: int
) -> nn.Module:
    """``factory(shape, classes)``, checked to be an ``nn.Module`` with the right output."""
    try:
        model = factory(shape, classes)
    except Exception as err:
        raise ModelError(f"model = {spec!r}: the factory raised {err!r}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model = {spec!r}: the factory returned {type(model).__name__}, not an nn.Module"
        )
    try:
        with torch.no_grad():
            out = model.to(torch.float32).eval()(torch.zeros(2, *shape))
    except Exception as err:
        raise ModelError(
            f"model = {spec!r}: forward on input {(2, *shape)} failed ({err!r})"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"model = {spec!r}: output {got} for input {(2, *shape)}, expected (2, {classes})"
        )
    return model.train()
