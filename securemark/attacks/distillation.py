"""Distillation: the pirate trains a fresh model on a leaked model's answers and keeps none of its weights.

Soft labels (the teacher's probabilities at a temperature) or hard labels (its top-1 only), into a model of
the same or another architecture, from the pirate's own unlabeled inputs (their labels are never read). A
coalition distills from the average of its copies' probabilities. The teacher is anything that maps inputs to
logits: a copy, an average of copies, a prediction API.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from securemark.data import Dataset

Teacher = Callable[[torch.Tensor], torch.Tensor]  # inputs -> log-probabilities (or logits)


def ensemble(models: Sequence[nn.Module]) -> Teacher:
    """The coalition's teacher: log of the mean of its copies' probabilities."""
    for m in models:
        m.eval()

    def answer(x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x), dim=1) for m in models]).mean(dim=0)
        return torch.log(probs.clamp_min(1e-45))

    return answer


@torch.no_grad()
def labels_of(teacher: Teacher, x: torch.Tensor, temperature: float, hard: bool, batch: int = 1024) -> torch.Tensor:
    """What the pirate trains on: probabilities at ``temperature``, or one-hot top-1 labels."""
    out = torch.cat([teacher(x[i : i + batch]) for i in range(0, len(x), batch)])
    if hard:
        return torch.nn.functional.one_hot(out.argmax(dim=1), out.shape[1]).float()
    return torch.softmax(out / temperature, dim=1)


def distill(
    teacher: Teacher,
    student: nn.Module,
    unlabeled: Dataset,
    *,
    temperature: float = 2.0,
    hard: bool = False,
    epochs: int = 20,
    lr: float = 0.01,
    batch_size: int = 64,
    rng: np.random.Generator,
) -> tuple[dict, dict]:
    """Train ``student`` (fresh) on the teacher's labels for ``unlabeled.x`` with Adam; the loss is the KL
    divergence at ``temperature`` (times T^2, Hinton's scaling), or cross-entropy on hard labels."""
    if not temperature > 0 or epochs < 1 or not lr > 0:
        raise ValueError(f"distillation needs temperature > 0, epochs >= 1, lr > 0; got {temperature}, {epochs}, {lr}")
    targets = labels_of(teacher, unlabeled.x, temperature, hard)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
    t = 1.0 if hard else temperature
    student.train()
    last = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(unlabeled), generator=gen)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            logp = torch.log_softmax(student(unlabeled.x[idx]) / t, dim=1)
            loss = -(targets[idx] * logp).sum(dim=1).mean() * t * t  # KL up to the teacher's entropy
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        last = total / len(order)
    student.eval()
    out = {k: v.detach().clone() for k, v in student.state_dict().items()}
    record = {"attack": "distill", "labels": "hard" if hard else "soft", "temperature": None if hard else temperature,
              "epochs": epochs, "examples": len(unlabeled), "loss": last}  # fmt: skip
    return out, record
