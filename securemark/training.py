"""Local training and evaluation loops (plain torch), shared by the owner demo, Flower clients and attacks."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from securemark import models
from securemark.data import Dataset


def pick_device() -> torch.device:
    """CUDA when this process can see a GPU (e.g. a Ray actor given a GPU fraction), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def client_generator(seed: int, round_no: int, partition_id: int) -> torch.Generator:
    """The batch-order generator of one client in one round: reproducible, distinct per client and round."""
    return torch.Generator().manual_seed(seed * 100_003 + round_no * 1009 + partition_id)


def fresh_generator() -> torch.Generator:
    """A batch-order generator seeded from the operating system: training that nobody else can make repeat, so a
    model sent twice is not trained into the same update twice (the shipped ClientApp's)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def train(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int = 1,
    lr: float = 0.05,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> float:
    """SGD with momentum for ``epochs``; returns the mean training loss of the last epoch."""
    device = device or pick_device()
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    last = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(data), batch_size):
            idx = order[start : start + batch_size]
            x, y = data.x[idx].to(device), data.y[idx].to(device)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        last = total / max(count, 1)
    return last


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, device: torch.device | None = None, batch_size: int = 512) -> float:
    device = device or pick_device()
    model.to(device).eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x, y = data.x[start : start + batch_size].to(device), data.y[start : start + batch_size].to(device)
        correct += int((model(x).argmax(1) == y).sum())
    return correct / max(len(data), 1)


def accuracy_of(model: nn.Module, weights: Mapping[str, torch.Tensor], data: Dataset) -> float:
    """Accuracy of ``model`` after loading ``weights`` (the model object is reused, its weights replaced)."""
    models.load_weights(model, weights)
    return accuracy(model, data)


# --- updates as flat vectors (what masked aggregation sums) --------------------------------------------
def float_names(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors, in a fixed order; integer buffers (counters) are not averaged."""
    return sorted(n for n, t in sd.items() if t.is_floating_point())


def flatten(sd: Mapping[str, torch.Tensor], names: list[str]) -> np.ndarray:
    return np.concatenate([sd[n].detach().to("cpu", torch.float64).reshape(-1).numpy() for n in names])


def add_flat(sd: Mapping[str, torch.Tensor], names: list[str], delta: np.ndarray) -> dict[str, torch.Tensor]:
    """A new state_dict with ``delta`` (in ``flatten`` order) added to the named tensors."""
    out, pos = dict(sd), 0
    for n in names:
        t = sd[n]
        step = torch.from_numpy(delta[pos : pos + t.numel()]).reshape(t.shape)
        out[n] = (t.detach().to("cpu", torch.float64) + step).to(t.dtype)
        pos += t.numel()
    if pos != len(delta):
        raise ValueError(f"update has {len(delta)} values, the model {pos}")
    return out
