"""Users' own models: ``model = "module:factory"`` and ``register_model``, with one-line errors,
and low-rank factorization of a user's model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsqueeze.config import resolve_config
from fedsqueeze.models import ModelError, build_model
from fedsqueeze.models.lowrank import LowRankError, choose_ranks, factorize, factorized_models
from fedsqueeze.models.user import register_model
from fedsqueeze.models.weights import load_numpy_state, state_to_numpy


class Tiny(nn.Module):
    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(width, 32), nn.ReLU())
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def tiny(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return Tiny(int(np.prod(input_shape)), num_classes)


def not_a_module(input_shape: tuple[int, ...], num_classes: int) -> object:
    return object()


def wrong_output(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return Tiny(int(np.prod(input_shape)), num_classes + 1)


def with_embedding(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    model = tiny(input_shape, num_classes)
    model.add_module("unused", nn.Embedding(4, 4))
    return model


HERE = __name__


def test_a_module_factory_spec_builds_the_users_model() -> None:
    model = build_model(f"{HERE}:tiny", (1, 8, 8), 10, seed=0)
    assert isinstance(model, Tiny)
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert resolve_config({"model": f"{HERE}:tiny"})["model"] == f"{HERE}:tiny"
    again = build_model(f"{HERE}:tiny", (1, 8, 8), 10, seed=0)
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)  # seeded like the zoo's models


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_package_x.models:tiny", "cannot import 'no_such_package_x.models'"),
        (f"{HERE}:missing", "has no callable 'missing'"),
        (f"{HERE}:not_a_module", "returned object, not an nn.Module"),
        (f"{HERE}:wrong_output", r"output \(2, 11\) for input \(2, 1, 8, 8\), expected \(2, 10\)"),
    ],
)
def test_a_broken_user_model_is_a_one_line_error(spec: str, message: str) -> None:
    with pytest.raises(ModelError, match=message) as info:
        build_model(spec, (1, 8, 8), 10)
    assert "\n" not in str(info.value) and spec in str(info.value)


def test_register_model_names_a_factory() -> None:
    register_model("my-tiny", tiny)
    assert isinstance(build_model("my-tiny", (1, 8, 8), 10), Tiny)
    assert resolve_config({"model": "my-tiny"})["model"] == "my-tiny"
    with pytest.raises(ModelError, match="has ':'"):
        register_model("a:b", tiny)


def test_a_users_model_is_factorized_and_an_unsupported_layer_is_named() -> None:
    dense = state_to_numpy(build_model(f"{HERE}:tiny", (1, 8, 8), 10, seed=0))
    ranks = choose_ranks(dense, 4)
    assert set(ranks) == {"body.1", "head"}
    with factorized_models(ranks):
        model = build_model(f"{HERE}:tiny", (1, 8, 8), 10)
    load_numpy_state(model, factorize(dense, ranks))
    with (
        factorized_models({"head": 2}),
        pytest.raises(LowRankError, match="'unused' \\(Embedding\\)"),
    ):
        build_model(f"{HERE}:with_embedding", (1, 8, 8), 10)
