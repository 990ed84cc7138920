"""quickstart_pytorch: the model, the data and the train/test loops (plain PyTorch, no Flower)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SEED = 0
TEST_FRACTION = 0.2
"""Share of the digits held out for the server's centralized evaluation."""


class Net(nn.Module):
    """A 64-32-10 MLP for the 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@lru_cache(maxsize=1)
def _digits() -> tuple[TensorDataset, TensorDataset]:
    """(train, test) digits, shuffled once with a fixed seed; pixels scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)  # ships with scikit-learn: no download
    order = np.random.default_rng(SEED).permutation(len(y))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.long)
    n_test = int(TEST_FRACTION * len(y))
    return TensorDataset(x[n_test:], y[n_test:]), TensorDataset(x[:n_test], y[:n_test])


def load_data(
    partition_id: int, num_partitions: int, batch_size: int = 32
) -> tuple[DataLoader, DataLoader]:
    """This client's IID slice of the training digits, split 80/20 into train/validation."""
    train, _ = _digits()
    part = np.array_split(np.arange(len(train)), num_partitions)[partition_id]
    n_train = int(0.8 * len(part))
    x, y = train.tensors
    generator = torch.Generator().manual_seed(SEED + partition_id)
    trainloader = DataLoader(
        TensorDataset(x[part[:n_train]], y[part[:n_train]]),
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
    )
    valloader = DataLoader(
        TensorDataset(x[part[n_train:]], y[part[n_train:]]), batch_size=batch_size
    )
    return trainloader, valloader


def load_centralized_testset(batch_size: int = 256) -> DataLoader:
    """The held-out digits the server evaluates the global model on."""
    return DataLoader(_digits()[1], batch_size=batch_size)


def train(net: Net, trainloader: DataLoader, epochs: int, lr: float) -> float:
    """SGD on the local data; returns the mean training loss of the last epoch."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    net.train()
    loss_sum, seen = 0.0, 0
    for _ in range(epochs):
        loss_sum, seen = 0.0, 0
        for x, y in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(x), y)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
    return loss_sum / max(seen, 1)


def test(net: Net, testloader: DataLoader) -> tuple[float, float]:
    """(mean loss, accuracy) on ``testloader``."""
    criterion = nn.CrossEntropyLoss(reduction="sum")
    net.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for x, y in testloader:
            logits = net(x)
            loss_sum += criterion(logits, y).item()
            correct += int((logits.argmax(dim=1) == y).sum())
            seen += len(y)
    return loss_sum / max(seen, 1), correct / max(seen, 1)
