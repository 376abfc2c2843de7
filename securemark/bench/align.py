"""Benchmark of aligning an obfuscated suspect to its base: the quickstart CNN, a 10^7-parameter MLP, and
users' architectures as their references write them (ResNet-18 at full size, 11.7M parameters, and a ViT in
timm's vit_tiny layout, 5.5M), whose unit groups come from their graphs (fingerprint.graph).

For each model a copy is made the way the owner makes one (base + a perturbation of RMS ``budget`` x the
weights' RMS, standing in for the mark), obfuscated the way a pirate would (a spike, added and split units,
positive rescaling, sign flips under BatchNorm, permutation: ``attacks.rewrite.obfuscate``, each where the
model's groups admit it), then aligned back. Reported per model: the
parameter count, seconds to obfuscate and to align (best of ``repeats``, measured side by side in one run),
and how much of the mark alignment gives back (the last repeat's: coordinates back in place, and the mark's
cosine; 1.0 when every coordinate is back, a spike costs one).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from securemark import corpus, models
from securemark.attacks.rewrite import obfuscate
from securemark.errors import InputError
from securemark.fingerprint.align import UnitGroup, align
from securemark.fingerprint.graph import derive

StateDict = dict[str, torch.Tensor]


def mlp_10m() -> nn.Module:
    """784 -> 2048 -> 2048 -> 2048 -> 10 (10.0M parameters)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
        nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10),
    )  # fmt: skip


def _recovered(aligned: StateDict, copy: StateDict, base: StateDict, keys: list[str], rms: float) -> dict:
    """How much of the mark alignment gives back, over the >= 2-D weights.

    The share of coordinates back within half the mark's RMS (a unit's scale is known to about
    noise / |unit|: a large weight in a short row moves by a fraction of the mark even when its scale is
    fitted as well as the mark allows), and cos(aligned - base, copy - base) with the read saturated at
    5 RMS (a spike is one coordinate, as the tracer's robust reading makes it)."""

    def flat(sd: StateDict) -> torch.Tensor:
        return torch.cat([(sd[k] - base[k]).double().reshape(-1) for k in keys])

    a, c = flat(aligned), flat(copy)
    return {
        "mark_coordinates_recovered": round(float(((a - c).abs() <= 0.5 * rms).double().mean()), 5),
        "mark_cosine": round(float(torch.nn.functional.cosine_similarity(a.clamp(-5 * rms, 5 * rms), c, dim=0)), 5),
    }


def _with_statistics(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """BatchNorm running statistics from one batch (as training leaves them: not 0 and 1), then eval mode."""
    model.train()
    with torch.no_grad():
        model(torch.rand(shape, generator=torch.Generator().manual_seed(0)))
    return model.eval()


def corpus_model(name: str, **kwargs: object) -> tuple[nn.Module, list[UnitGroup]]:
    """A corpus model on 3x32x32 inputs with its unit groups from its graph."""
    torch.manual_seed(0)
    model = _with_statistics(corpus.CORPUS[name](**kwargs), (16, 3, 32, 32))
    return model, derive(model, torch.zeros(1, 3, 32, 32)).groups


def bench_model(
    name: str, model: nn.Module, budget: float, repeats: int, seed: int, groups: list[UnitGroup] | None = None
) -> dict[str, object]:
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weights = [k for k in base if base[k].dim() >= 2]
    rms = budget * float(torch.cat([base[k].reshape(-1) for k in weights]).pow(2).mean().sqrt())
    rng = np.random.default_rng(seed)  # not torch's generator: seeded like the models' init, it is their stream
    copy = {k: v + rms * torch.from_numpy(rng.standard_normal(tuple(v.shape))).to(v.dtype) if k in weights else v
            for k, v in base.items()}  # fmt: skip
    rewrite_s, align_s, recovered = [], [], {}
    for _ in range(repeats):
        t = time.perf_counter()
        suspect, _ = obfuscate(copy, rng, dead={}, groups=groups)
        rewrite_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        aligned, rep = align(suspect, base, groups, noise=rms)  # the tracer passes its mark's RMS the same way
        align_s.append(time.perf_counter() - t)
        recovered = _recovered(aligned, copy, base, weights, rms)
    return {
        "model": name,
        "params": sum(v.numel() for v in base.values()),
        "obfuscate_seconds": round(min(rewrite_s), 4),
        "align_seconds": round(min(align_s), 4),
        "align_seconds_median": round(float(np.median(align_s)), 4),
        **recovered,
        "units_permuted": rep.permuted,
        "units_merged": rep.merged,
        "units_dropped": rep.dropped,
        "units_flipped": rep.flipped,
    }


def bench_align(repeats: int = 3, budget: float = 0.05, seed: int = 0, large: bool = True) -> dict[str, object]:
    """The quickstart CNN (28x28, width 16) and, with ``large``, the 10^7-parameter MLP, ResNet-18 and the ViT
    at full size (else ResNet-18 at base width 8 and a 2-block ViT of width 32)."""
    if repeats < 1 or not budget > 0:
        raise InputError("need repeats >= 1 and budget > 0")
    rows = [bench_model("quickstart-cnn", models.build("cnn", (1, 28, 28), 10), budget, repeats, seed)]
    sizes = {"resnet18": {} if large else {"width": 8},
             "vit-tiny": {} if large else {"dim": 32, "depth": 2, "heads": 2, "patch": 8}}  # fmt: skip
    if large:
        rows.append(bench_model("mlp-10M", mlp_10m(), budget, repeats, seed))
    for name, kwargs in sizes.items():
        model, groups = corpus_model(name, **kwargs)
        rows.append(bench_model(name, model, budget, repeats, seed, groups))
    return {"repeats": repeats, "budget": budget, "models": rows}
