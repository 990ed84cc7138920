"""Channel pruning: structured masks, and the physically smaller model they leave."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedsqueeze.compression.masked import apply_mask, kept_count
from fedsqueeze.models import build_model, count_parameters
from fedsqueeze.models.channels import channel_masks, kept_channels, shrink
from fedsqueeze.models.pruning import PruningError
from fedsqueeze.models.weights import load_numpy_state, state_to_numpy

MODELS = {"mlp": (1, 8, 8), "cnn1d": (1, 40), "cnn2d": (1, 8, 8)}


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(sorted(MODELS)), sparsity=st.floats(0.0, 0.95), seed=st.integers(0, 99))
def test_the_shrunk_model_computes_what_the_masked_model_computes(
    name: str, sparsity: float, seed: int
) -> None:
    shape = MODELS[name]
    model = build_model(name, shape, 10, seed=seed)
    arrays = state_to_numpy(model)
    masks = channel_masks(arrays, sparsity)
    load_numpy_state(model, apply_mask(arrays, masks))
    small = shrink(model, kept_channels(arrays, sparsity))
    assert count_parameters(small) == kept_count(masks)
    x = torch.from_numpy(np.random.default_rng(seed).normal(size=(5, *shape)).astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_channel_masks_drop_whole_rows_by_norm_and_keep_the_classifier() -> None:
    arrays = state_to_numpy(build_model("mlp", (1, 8, 8), 10, seed=0))
    arrays["fc1.weight"][3] *= 1e-3  # the weakest neuron of fc1
    masks = channel_masks(arrays, 0.5)
    assert not masks["fc1.weight"][3].any() and not masks["fc1.bias"][3]
    assert not masks["fc2.weight"][:, 3].any()  # nobody reads it any more
    assert masks["fc1.weight"].all(axis=1).sum() == 64  # half of 128 rows, whole rows
    assert masks["fc3.weight"].any(axis=1).all() and masks["fc3.bias"].all()


def test_a_channel_pruned_once_stays_pruned() -> None:
    arrays = state_to_numpy(build_model("cnn1d", (1, 40), 10, seed=0))
    first = channel_masks(arrays, 0.25)
    moved = {k: v + 1.0 for k, v in arrays.items()}
    second = channel_masks(moved, 0.5, previous=first)
    for k in first:
        assert not (second[k] & ~first[k]).any()


def test_an_unsupported_layer_is_a_one_line_error_naming_it() -> None:
    model = nn.Sequential(
        OrderedDict([("fc1", nn.Linear(4, 8)), ("norm", nn.LayerNorm(8)), ("fc2", nn.Linear(8, 2))])
    )
    with pytest.raises(PruningError, match="'norm'") as err:
        shrink(model, kept_channels(state_to_numpy(model), 0.5))
    assert "\n" not in str(err.value)


def test_the_export_model_of_a_channel_pruned_run_is_physically_smaller(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``load_run_model`` (what ``fedsqueeze export`` exports) drops the zero channels that
    channel pruning left in ``model.pt``; the outputs are unchanged."""
    import torch as _torch

    from fedsqueeze.config import resolve_config, to_toml
    from fedsqueeze.models import build_model as _build
    from fedsqueeze.models.channels import channel_masks as _masks
    from fedsqueeze.models.export import load_run_model
    from fedsqueeze.models.weights import load_numpy_state, state_to_numpy

    cfg = resolve_config({"dataset": "digits", "model": "cnn2d", "prune": "channel"})
    dense = _build("cnn2d", (1, 8, 8), 10, seed=0)
    arrays = state_to_numpy(dense)
    masks = _masks(arrays, 0.5)
    pruned = {k: v * masks[k] for k, v in arrays.items()}
    load_numpy_state(dense, pruned)
    (tmp_path / "config.toml").write_text(to_toml(cfg))
    _torch.save({k: _torch.from_numpy(v) for k, v in pruned.items()}, tmp_path / "model.pt")
    model, _, _ = load_run_model(tmp_path)
    n_dense = sum(p.numel() for p in dense.parameters())
    n_small = sum(p.numel() for p in model.parameters())
    assert n_small == sum(int(m.sum()) for m in masks.values())
    assert n_small < 0.5 * n_dense
    x = _torch.randn(5, 1, 8, 8)
    with _torch.no_grad():
        _torch.testing.assert_close(model(x), dense.eval()(x), atol=1e-5, rtol=1e-4)
