"""Model zoo: ``build_model(name, input_shape, num_classes)`` and friends."""

from fedsqueeze.models.zoo import (
    MODEL_NAMES,
    SMALL_MODELS,
    ModelError,
    build_model,
    count_parameters,
)

__all__ = ["MODEL_NAMES", "SMALL_MODELS", "ModelError", "build_model", "count_parameters"]
