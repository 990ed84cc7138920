"""Model zoo: ``build_model(name, input_shape, num_classes)`` and friends."""

from fedsqueeze.models.zoo import MODEL_NAMES, ModelError, build_model, count_parameters

__all__ = ["MODEL_NAMES", "ModelError", "build_model", "count_parameters"]
