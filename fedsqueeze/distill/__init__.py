"""Server-side knowledge distillation: FedDF ensemble distillation and teacher → student."""

from fedsqueeze.distill.core import (
    BUILTIN_TRANSFER,
    DistillError,
    distill,
    ensemble_probs,
    load_transfer_data,
    teacher_probs,
)

__all__ = [
    "BUILTIN_TRANSFER",
    "DistillError",
    "distill",
    "ensemble_probs",
    "load_transfer_data",
    "teacher_probs",
]
