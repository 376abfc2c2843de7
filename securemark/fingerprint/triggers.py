"""Per-customer trigger sets, the seeds' black-box baseline (DeepSigns / DeepTrace style, FedTracker's
WAFFLE): customer j's copy is fine-tuned to answer its own secret key inputs with secret labels, and a
suspect is traced by how many keys of each customer it answers.

Keys are m images of uniform noise with uniform labels, both from the owner secret (HKDF + ChaCha20). Out of
distribution on purpose, as in the seeds, and for that reason a pirate could learn to spot and refuse them;
the function mark (fingerprint.function) queries natural inputs only.

Two verdicts, as the field uses them:
* **binomial**: an innocent's key labels are drawn independently of any model that never saw them, so its
  matches are exactly Binomial(m, 1/C) whatever the suspect answers. Accusing j when P(X >= k_j) <= eps / n
  bounds P(any innocent accused) by eps.
* **argmax**: the customer with the most matches is named. No bound: someone is always named.
Tracing costs n * m queries (10,000 for 1,000 customers with 10 keys each).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import binom
from torch import nn

from securemark.data import Dataset
from securemark.fingerprint.keys import OwnerSecret
from securemark.prg import uniforms


def keys(
    secret: OwnerSecret, index: int, m: int, shape: tuple[int, ...], classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Customer ``index``'s m key inputs (m, *shape) in [0, 1) and labels (m,)."""
    x = uniforms(secret.derive(f"trigger-inputs/{index}"), m * int(np.prod(shape))).astype(np.float32)
    y = (uniforms(secret.derive(f"trigger-labels/{index}"), m) * classes).astype(np.int64)
    return x.reshape(m, *shape), y


def embed(
    model: nn.Module, key: tuple[np.ndarray, np.ndarray], natural: Dataset, *, steps: int = 150, lr: float = 0.01,
    batch: int = 64, rng: np.random.Generator,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Fine-tune ``model`` (loaded with the copy to mark) to answer ``key``: every step one batch of natural
    data (so accuracy holds) and all keys. Returns the marked state dict."""
    kx, ky = torch.from_numpy(key[0]), torch.from_numpy(key[1])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(natural), (batch,), generator=gen)
        x, y = torch.cat([natural.x[idx], kx]), torch.cat([natural.y[idx], ky])
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class TriggerVerdict:
    matches: np.ndarray  # (n,) keys answered with their label
    p_values: np.ndarray  # (n,) exact binomial tails P(X >= matches) under chance 1/C
    accused: np.ndarray  # indices with p <= eps / n, most significant first
    argmax: int  # the customer with the most matches (ties: the lowest index)


def verdict(answers: np.ndarray, labels: np.ndarray, classes: int, eps: float) -> TriggerVerdict:
    """From the suspect's predicted classes ``answers`` (n, m) on every customer's keys, with labels (n, m)."""
    if answers.shape != labels.shape:
        raise ValueError(f"answers {answers.shape} and key labels {labels.shape} differ in shape")
    n, m = labels.shape
    matches = np.sum(answers == labels, axis=1)
    p_values = binom.sf(matches - 1, m, 1.0 / classes)
    order = np.argsort(p_values, kind="stable")
    accused = order[p_values[order] <= eps / n]
    return TriggerVerdict(matches, p_values, accused, int(np.argmax(matches)))
