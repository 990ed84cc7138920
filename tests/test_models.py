"""Tests for fedsqueeze.models: shapes, gradients, size, Opacus compatibility, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from fedsqueeze.models import MODEL_NAMES, SMALL_MODELS, ModelError, build_model, count_parameters

DIGITS_SHAPE = (1, 8, 8)
MNIST1D_SHAPE = (1, 40)

# Every model on every dataset shape it is meant for.
CASES = [
    ("logreg", DIGITS_SHAPE),
    ("logreg", MNIST1D_SHAPE),
    ("mlp", DIGITS_SHAPE),
    ("mlp", MNIST1D_SHAPE),
    ("mlp-wide", DIGITS_SHAPE),
    ("cnn1d", MNIST1D_SHAPE),
    ("cnn2d", DIGITS_SHAPE),
    ("cnn1d-small", MNIST1D_SHAPE),
    ("cnn2d-small", DIGITS_SHAPE),
]
CASE_IDS = [f"{n}-{'x'.join(map(str, s))}" for n, s in CASES]
# Models stay small enough for an edge device; mlp-wide is ~10x mlp on purpose (a model on
# which secure aggregation's fixed per-client bytes do not dominate a compressed update).
MAX_PARAMS = {"mlp-wide": 250_000}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: intra-op threading only adds overhead (and contention on 2 cores).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_registry_names() -> None:
    assert set(MODEL_NAMES) == {
        "logreg",
        "mlp",
        "mlp-wide",
        "cnn1d",
        "cnn2d",
        "cnn1d-small",
        "cnn2d-small",
    }
    assert {n for n, _ in CASES} == set(MODEL_NAMES)
    assert set(SMALL_MODELS) <= set(MODEL_NAMES) and set(SMALL_MODELS.values()) <= set(MODEL_NAMES)


@pytest.mark.parametrize(("small", "full"), sorted(SMALL_MODELS.items()))
def test_small_models_are_5x_smaller_on_the_same_inputs(small: str, full: str) -> None:
    # A small model stands in for its full-size model (a student, a small device's model):
    # it takes every input shape the full model takes, at >= 5x fewer parameters.
    for shape in [s for n, s in CASES if n == full]:
        big, little = build_model(full, shape, 10), build_model(small, shape, 10)
        assert count_parameters(big) >= 5 * count_parameters(little), shape
        assert little(torch.randn(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize(("name", "shape"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("num_classes", [2, 10])
def test_logits_shape(name: str, shape: tuple[int, ...], num_classes: int) -> None:
    model = build_model(name, shape, num_classes, seed=0)
    out = model(torch.randn(5, *shape))
    assert out.shape == (5, num_classes)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize(("name", "shape"), CASES, ids=CASE_IDS)
def test_gradients_reach_every_parameter(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    model = build_model(name, shape, 10, seed=1)
    x, y = torch.randn(16, *shape), torch.randint(0, 10, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"no gradient reaches {pname}"


@pytest.mark.parametrize(("name", "shape"), CASES, ids=CASE_IDS)
def test_small_float32_and_stable_keys(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, shape, 10)
    n_params = count_parameters(model)
    assert n_params == sum(p.numel() for p in model.parameters())
    assert 0 < n_params <= MAX_PARAMS.get(name, 100_000)
    assert all(t.dtype == torch.float32 for t in model.state_dict().values())
    # keys depend on the model only: same keys for another input size / class count
    other = (*shape[:-1], shape[-1] * 2)
    assert list(build_model(name, other, 3).state_dict()) == list(model.state_dict())


def test_logreg_parameter_count_matches_formula() -> None:
    for shape, classes in [(DIGITS_SHAPE, 10), (MNIST1D_SHAPE, 4), ((3, 5, 7), 6)]:
        model = build_model("logreg", shape, classes)
        assert count_parameters(model) == math.prod(shape) * classes + classes


def test_count_parameters_trainable_only() -> None:
    model = build_model("mlp", MNIST1D_SHAPE, 10)
    total = count_parameters(model)
    model.fc1.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - model.fc1.weight.numel()
    assert count_parameters(model) == total


def test_float32_even_with_float64_default_dtype() -> None:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = build_model("cnn1d", MNIST1D_SHAPE, 10)
    finally:
        torch.set_default_dtype(old)
    assert all(t.dtype == torch.float32 for t in model.state_dict().values())


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize(("name", "shape"), CASES, ids=CASE_IDS)
def test_opacus_validator_and_per_sample_gradients(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, shape, 10, seed=2)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())

    # Opacus' per-sample gradients must equal gradients computed one sample at a time.
    gsm = GradSampleModule(model, loss_reduction="sum")
    x, y = torch.randn(3, *shape), torch.randint(0, 10, (3,))
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    reference = build_model(name, shape, 10, seed=2)
    for i in range(3):
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]).backward()
        for (pname, p), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert p.grad_sample.shape == (3, *p.shape), pname
            torch.testing.assert_close(p.grad_sample[i], ref.grad, rtol=1e-4, atol=1e-5)
    gsm._close()


def test_seed_is_reproducible_and_keeps_global_rng() -> None:
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    a = build_model("cnn2d", DIGITS_SHAPE, 10, seed=11)
    assert torch.equal(torch.rand(1), expected)  # global stream untouched
    b = build_model("cnn2d", DIGITS_SHAPE, 10, seed=11)
    c = build_model("cnn2d", DIGITS_SHAPE, 10, seed=12)
    for (k, va), vb, vc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(va, vb), k
        assert not torch.equal(va, vc), k


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn2d", "cnn2d-small"])
def test_models_learn_digits_subset(name: str) -> None:
    from sklearn.datasets import load_digits

    xs, ys = load_digits(return_X_y=True)
    x = torch.tensor(xs[:200] / 16.0, dtype=torch.float32).reshape(-1, *DIGITS_SHAPE)
    y = torch.tensor(ys[:200], dtype=torch.int64)
    chance = np.bincount(ys[:200]).max() / 200
    acc = _train(build_model(name, DIGITS_SHAPE, 10, seed=0), x, y, steps=40)
    assert acc > max(0.9, chance + 0.5)


@pytest.mark.parametrize("name", ["cnn1d", "cnn1d-small"])
def test_cnn1d_learns_position_task(name: str) -> None:
    # Class = which quarter of the sequence holds a bump; needs spatial features.
    gen = torch.Generator().manual_seed(0)
    n, length = 128, 40
    y = torch.randint(0, 4, (n,), generator=gen)
    x = 0.3 * torch.randn(n, 1, length, generator=gen)
    centers = y * 10 + 2 + torch.randint(0, 6, (n,), generator=gen)
    x[torch.arange(n), 0, centers] += 3.0
    acc = _train(build_model(name, (1, length), 4, seed=0), x, y, steps=40)
    assert acc > 0.9


def test_unknown_name_lists_valid_models() -> None:
    with pytest.raises(ModelError) as exc:
        build_model("resnet50", DIGITS_SHAPE, 10)
    for name in MODEL_NAMES:
        assert name in str(exc.value)


@pytest.mark.parametrize(
    ("name", "shape", "needle"),
    [
        ("cnn2d", MNIST1D_SHAPE, "(channels, height, width)"),
        ("cnn2d", (64,), "(channels, height, width)"),
        ("cnn1d", DIGITS_SHAPE, "(channels, length)"),
        ("cnn1d", (1, 3), "length >= 4"),
        ("cnn2d", (1, 3, 8), ">= 4"),
        ("mlp", (), "positive ints"),
        ("mlp", (1, 0), "positive ints"),
        ("logreg", (1, -4), "positive ints"),
        ("logreg", (1, 2.5), "positive ints"),
        ("logreg", 40, "tuple of ints"),
    ],
)
def test_bad_shape_raises_model_error(name: str, shape: object, needle: str) -> None:
    with pytest.raises(ModelError) as exc:
        build_model(name, shape, 10)  # type: ignore[arg-type]
    assert needle in str(exc.value)
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize("num_classes", [1, 0, True, 2.0])
def test_bad_num_classes(num_classes: object) -> None:
    with pytest.raises(ModelError, match="num_classes"):
        build_model("mlp", MNIST1D_SHAPE, num_classes)  # type: ignore[arg-type]


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(MODEL_NAMES),
    channels=st.integers(1, 3),
    side=st.integers(4, 40),
    classes=st.integers(2, 12),
)
def test_any_valid_shape_gives_logits(name: str, channels: int, side: int, classes: int) -> None:
    if name.startswith("cnn2d"):
        shape: tuple[int, ...] = (channels, side, max(4, side // 2))
    elif name.startswith("cnn1d"):
        shape = (channels, side * 2)
    else:
        shape = (channels, side)
    model = build_model(name, shape, classes)
    assert model(torch.randn(2, *shape)).shape == (2, classes)
    assert count_parameters(model) <= MAX_PARAMS.get(name, 100_000)
