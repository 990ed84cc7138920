"""Model zoo: ``build_model(name, input_shape, num_classes)`` and friends.

The zoo (and with it torch) is imported on first use of one of these names, not with the
package: a ClientApp process imports ``fedsqueeze.models.retrain`` for its record keys in
every message, but only a message that builds a model should pay for torch (a deployed
SuperNode starts a fresh process per message; :mod:`fedsqueeze.client.app`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsqueeze.models.zoo import (
        MODEL_NAMES,
        SMALL_MODELS,
        ModelError,
        build_model,
        count_parameters,
    )

__all__ = ["MODEL_NAMES", "SMALL_MODELS", "ModelError", "build_model", "count_parameters"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("fedsqueeze.models.zoo"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
