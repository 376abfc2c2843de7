"""The app's own model, data and training: nothing here knows about securemark.

Model: a ResNet-8 written as torchvision writes its ResNets (BasicBlocks with BatchNorm, 1x1-conv downsample
shortcuts, names conv1, bn1, layer1..3, fc), width 16, for 3x32x32 images.
Data: scikit-learn's 1,797 digits (offline), upsampled to 32x32 and repeated over three colour channels, shuffled
once with a fixed seed. The last 297 are the server's held-out set; the other 1,500 are split among the clients,
each keeping a fifth of its share for local evaluation.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

HELD_OUT = 297


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet8(nn.Module):
    """conv1-bn1-relu, three stages of one BasicBlock (16, 32, 64 channels), global average pool, fc."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(width, width, 1)
        self.layer2 = self._stage(width, 2 * width, 2)
        self.layer3 = self._stage(2 * width, 4 * width, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    @staticmethod
    def _stage(inplanes: int, planes: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        return nn.Sequential(BasicBlock(inplanes, planes, stride, downsample))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    order = np.random.default_rng(42).permutation(len(d.target))
    x = torch.tensor(d.images[order] / 16.0, dtype=torch.float32).unsqueeze(1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - 0.3) / 0.3, torch.tensor(d.target[order], dtype=torch.int64)


def load_data(partition_id: int, num_partitions: int, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    """This client's train and test loaders (an IID share of the 1,500 training digits)."""
    x, y = _digits()
    idx = np.arange(len(x) - HELD_OUT)[partition_id::num_partitions]
    cut = int(0.8 * len(idx))
    train, test = idx[:cut], idx[cut:]
    trainloader = DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True)
    return trainloader, DataLoader(TensorDataset(x[test], y[test]), batch_size=256)


def load_centralized_dataset() -> DataLoader:
    x, y = _digits()
    return DataLoader(TensorDataset(x[-HELD_OUT:], y[-HELD_OUT:]), batch_size=256)


def save_held_out(path: str) -> None:
    """The server's held-out set as an .npz of inputs x and labels y."""
    x, y = _digits()
    np.savez(path, x=x[-HELD_OUT:].numpy(), y=y[-HELD_OUT:].numpy())


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
