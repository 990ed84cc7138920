"""Compact student architectures for teacher → student distillation.

``student-model`` takes any registry model (``fedsqueeze.models``) or one of these, which
exist only as distillation targets: the clients never train them.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from fedsqueeze.models import MODEL_NAMES, ModelError, build_model


def _cnn1d_small(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``cnn1d``'s layout at a quarter of its width: ~3.5k parameters against ~29.6k."""
    if len(input_shape) != 2 or input_shape[1] < 4:
        raise ModelError(
            f"student 'cnn1d-small' needs input_shape (channels, length >= 4), got {input_shape}"
        )
    channels, length = input_shape
    out_len = min(length // 4, 10)
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv1d(channels, 8, kernel_size=5, padding=2)),
                ("act1", nn.ReLU()),
                ("pool1", nn.MaxPool1d(2)),
                ("conv2", nn.Conv1d(8, 8, kernel_size=5, padding=2)),
                ("act2", nn.ReLU()),
                ("pool2", nn.MaxPool1d(2)),
                ("conv3", nn.Conv1d(8, 8, kernel_size=3, padding=1)),
                ("act3", nn.ReLU()),
                ("pool3", nn.AdaptiveAvgPool1d(out_len)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(8 * out_len, 32)),
                ("act4", nn.ReLU()),
                ("fc2", nn.Linear(32, num_classes)),
            ]
        )
    )


_STUDENTS = {"cnn1d-small": _cnn1d_small}

STUDENT_NAMES: tuple[str, ...] = (*MODEL_NAMES, *_STUDENTS)
"""Valid ``student-model`` values."""


def build_student(
    name: str, input_shape: tuple[int, ...], num_classes: int, seed: int | None = None
) -> nn.Module:
    """A registry model or a student architecture, float32."""
    if name not in _STUDENTS:
        return build_model(name, input_shape, num_classes, seed=seed)
    import torch

    if seed is None:
        return _STUDENTS[name](tuple(input_shape), num_classes).to(torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _STUDENTS[name](tuple(input_shape), num_classes).to(torch.float32)
