"""Laundering a single copy: magnitude pruning, quantization round trips, Gaussian noise, fine-tuning."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from securemark import models, training
from securemark.data import Dataset
from securemark.errors import InputError

StateDict = Mapping[str, torch.Tensor]


def _weights(sd: StateDict) -> list[str]:
    """The tensors these attacks touch: floating-point weights with >= 2 dims (conv, linear)."""
    return [n for n, t in sd.items() if t.is_floating_point() and t.dim() >= 2]


def prune(sd: StateDict, ratio: float, scope: str = "global") -> tuple[dict, dict]:
    """Zero the ``ratio`` share of weights with the smallest magnitude, over all layers or per layer."""
    if not 0.0 <= ratio < 1.0:
        raise InputError(f"prune ratio must lie in [0, 1), got {ratio}")
    if scope not in ("global", "layer"):
        raise InputError(f"prune scope must be 'global' or 'layer', got {scope!r}")
    out = dict(sd)
    names = _weights(sd)
    if scope == "global":  # a model without such weights is left as it is, as in every scope and attack here
        flat = [sd[n].detach().abs().reshape(-1).to(torch.float64) for n in names]
        mags = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64)
        k = int(ratio * mags.numel())
        cut = mags.kthvalue(k).values if k > 0 else torch.tensor(-1.0, dtype=torch.float64)
        cuts = dict.fromkeys(names, cut)
    else:
        cuts = {}
        for n in names:
            mags = sd[n].detach().abs().reshape(-1).to(torch.float64)
            k = int(ratio * mags.numel())
            cuts[n] = mags.kthvalue(k).values if k > 0 else torch.tensor(-1.0, dtype=torch.float64)
    zeroed = 0
    for n in names:
        keep = sd[n].detach().abs().to(torch.float64) > cuts[n]
        zeroed += int((~keep).sum())
        out[n] = sd[n] * keep.to(sd[n].dtype)
    total = sum(sd[n].numel() for n in names)
    return out, {"attack": "prune", "ratio": ratio, "scope": scope, "zeroed": zeroed, "of": total}


def quantize(sd: StateDict, bits: int = 8) -> tuple[dict, dict]:
    """Round trip through symmetric per-tensor integers of ``bits`` bits (8 or 4), or float16 for bits=16."""
    if bits not in (4, 8, 16):
        raise InputError(f"quantize supports 4, 8 (integer) and 16 (float16) bits, got {bits}")
    out = dict(sd)
    for n in _weights(sd):
        t = sd[n].detach()
        if bits == 16:
            out[n] = t.to(torch.float16).to(t.dtype)
            continue
        levels = 2 ** (bits - 1) - 1
        scale = t.abs().max() / levels
        out[n] = t if scale == 0 else (torch.round(t / scale).clamp(-levels, levels) * scale).to(t.dtype)
    return out, {"attack": "quantize", "bits": bits}


def add_noise(sd: StateDict, std: float, rng: np.random.Generator) -> tuple[dict, dict]:
    """Add N(0, std^2) to every weight (absolute std, in the weights' own units)."""
    if std < 0:
        raise InputError(f"noise std must be >= 0, got {std}")
    gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
    out = dict(sd)
    for n in _weights(sd):
        t = sd[n].detach()
        out[n] = t + std * torch.randn(t.shape, generator=gen, dtype=t.dtype)
    return out, {"attack": "noise", "std": std}


def finetune(
    sd: StateDict,
    model: torch.nn.Module,
    data: Dataset,
    *,
    epochs: int = 1,
    lr: float = 0.01,
    fraction: float = 1.0,
    rng: np.random.Generator,
) -> tuple[dict, dict]:
    """Train ``sd`` (loaded into ``model``) on a random ``fraction`` of the attacker's own ``data``."""
    if epochs < 0 or lr <= 0:
        raise ValueError(f"fine-tuning needs epochs >= 0 and lr > 0, got {epochs}, {lr}")
    subset = data.sample(fraction, rng)
    models.load_weights(model, sd)
    gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
    loss = training.train(model, subset, epochs=epochs, lr=lr, generator=gen) if epochs else float("nan")
    out = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    return out, {"attack": "finetune", "epochs": epochs, "lr": lr, "examples": len(subset), "loss": loss}


def overwrite(sd: StateDict, length: int, budget: float, rng: np.random.Generator) -> tuple[dict, dict]:
    """The attacker embeds its own random fingerprint with its own fresh key (same scheme, same budget)."""
    from securemark.fingerprint.carrier import CarrierSpec
    from securemark.fingerprint.embed import Fingerprinter
    from securemark.fingerprint.keys import OwnerSecret

    fp = Fingerprinter.create(OwnerSecret.generate(), CarrierSpec(), sd, length)
    bits = rng.integers(0, 2, length).astype(bool)
    out = fp.embed(sd, bits, fp.strength_for_budget(sd, budget))
    return out, {"attack": "overwrite", "length": length, "budget": budget}


def distill(
    sd: StateDict,
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    unlabeled: Dataset,
    *,
    epochs: int = 5,
    lr: float = 0.05,
    temperature: float = 2.0,
    rng: np.random.Generator,
) -> tuple[dict, dict]:
    """Train a freshly initialized ``student`` to match the teacher's soft labels on ``unlabeled`` inputs
    (their labels are never read). The result shares no weights with the copy: its fingerprint is gone,
    at whatever accuracy the attacker's data buys."""
    models.load_weights(teacher, sd)
    teacher.eval()
    with torch.no_grad():
        soft = torch.softmax(teacher(unlabeled.x) / temperature, dim=1)
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
    student.train()
    for _ in range(epochs):
        order = torch.randperm(len(unlabeled), generator=gen)
        for start in range(0, len(order), 32):
            idx = order[start : start + 32]
            logp = torch.log_softmax(student(unlabeled.x[idx]) / temperature, dim=1)
            loss = torch.nn.functional.kl_div(logp, soft[idx], reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = {k: v.detach().clone() for k, v in student.state_dict().items()}
    return out, {"attack": "distill", "epochs": epochs, "examples": len(unlabeled), "temperature": temperature}
