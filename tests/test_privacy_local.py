"""Local DP-SGD with Opacus: accountant carried across rounds, re-wrapping models."""

from __future__ import annotations

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsqueeze.privacy import InvalidPrivacyParameter
from fedsqueeze.privacy.local import engine_history, local_epsilon, make_private, unwrap_model

NOISE, CLIP, DELTA = 1.0, 1.0, 1e-5
N_SAMPLES, BATCH = 64, 16  # q = 1/4, 4 steps per epoch

# Opacus hooks the first layer, whose input needs no gradient; torch says so on every backward.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def _train_round(
    model: nn.Module, history: list[float] | None
) -> tuple[nn.Module, list[float], int]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    private_model, private_opt, loader, engine = make_private(
        model, optimizer, _loader(), NOISE, CLIP, history
    )
    steps = 0
    for x, y in loader:
        private_opt.zero_grad()
        loss = nn.functional.cross_entropy(private_model(x), y)
        loss.backward()
        private_opt.step()
        steps += 1
    return private_model, engine_history(engine), steps


def test_epsilon_accumulates_across_rounds_and_matches_one_accountant() -> None:
    torch.manual_seed(0)
    history: list[float] | None = None
    epsilons, total_steps = [], 0
    for _ in range(3):
        # As in the glue: a fresh model per round, built from the global weights.
        _, history, steps = _train_round(nn.Linear(4, 2), history)
        total_steps += steps
        epsilons.append(local_epsilon(history, DELTA))
    assert epsilons[0] < epsilons[1] < epsilons[2]
    reference = RDPAccountant()
    for _ in range(total_steps):
        reference.step(noise_multiplier=NOISE, sample_rate=BATCH / N_SAMPLES)
    assert total_steps == 12
    assert epsilons[-1] == pytest.approx(reference.get_epsilon(delta=DELTA), rel=1e-9)
    # Without the carried history a round would claim only its own (smaller) epsilon.
    _, fresh, _ = _train_round(nn.Linear(4, 2), None)
    assert local_epsilon(fresh, DELTA) == pytest.approx(epsilons[0], rel=1e-9)


def test_same_module_can_be_wrapped_every_round() -> None:
    torch.manual_seed(1)
    model = nn.Linear(4, 2)
    before = model.weight.detach().clone()
    wrapped, history, _ = _train_round(model, None)
    # Round 2 with the wrapper itself, round 3 with the plain module whose wrapper was
    # dropped without cleanup: neither may install per-sample hooks twice.
    wrapped2, history, _ = _train_round(wrapped, history)
    _, history, _ = _train_round(model, history)
    assert local_epsilon(history, DELTA) > 0
    plain = unwrap_model(wrapped2)
    assert plain is model
    assert not hasattr(plain, "autograd_grad_sample_hooks")
    assert set(plain.state_dict()) == {"weight", "bias"}
    assert not torch.equal(plain.weight, before)  # training really updated the weights


def test_make_private_rejects_bad_parameters() -> None:
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(InvalidPrivacyParameter):
        make_private(model, opt, _loader(), 0.0, CLIP, None)
    with pytest.raises(InvalidPrivacyParameter):
        make_private(model, opt, _loader(), NOISE, -1.0, None)
    with pytest.raises(InvalidPrivacyParameter):
        make_private(model, opt, _loader(), NOISE, CLIP, [1.0, 0.25])
    with pytest.raises(InvalidPrivacyParameter):
        make_private(model, opt, _loader(), NOISE, CLIP, None, mechanism="gdp")  # type: ignore[arg-type]
