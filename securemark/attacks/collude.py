"""Coalitions merge their copies weight by weight."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from securemark.errors import InputError

COLLUSION_METHODS = (
    "average", "median", "interleave", "layer-interleave", "extreme", "erase", "extrapolate", "convex",
)  # fmt: skip
StateDict = Mapping[str, torch.Tensor]


def collude(
    copies: Sequence[StateDict], method: str, rng: np.random.Generator, alpha: float = 0.5
) -> tuple[dict, dict]:
    """Merge ``copies`` by ``method``:

    average: the mean; median: the per-weight median; interleave: each weight from a random copy;
    layer-interleave: each tensor from a random copy; extreme: each weight the min or the max of the copies,
    chosen at random (randomized min/max); erase: the copies' shared value where they all agree, 0 wherever
    they differ (the weights a fingerprint changes are removed: read back as erasures, those code positions
    are 0 exactly); extrapolate: w_a + alpha (w_a - w_b) for the first two copies
    (walking away from b's fingerprint); convex: a random convex combination (weights ~ Dirichlet(1)).
    Non-float tensors (counters) are taken from the first copy.
    """
    if method not in COLLUSION_METHODS:
        raise InputError(f"unknown collusion method {method!r}; choose one of {', '.join(COLLUSION_METHODS)}")
    if len(copies) < 2:
        raise InputError(f"collusion needs at least 2 copies, got {len(copies)}")
    names = list(copies[0])
    for i, sd in enumerate(copies[1:], start=1):
        if list(sd) != names or any(sd[n].shape != copies[0][n].shape for n in names):
            raise InputError(f"copy {i} does not have the same tensors as copy 0")
    gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
    mix = torch.from_numpy(rng.dirichlet(np.ones(len(copies))))  # convex weights, one draw for all tensors
    record: dict = {"attack": "collude", "method": method, "copies": len(copies)}
    if method == "extrapolate":
        record["alpha"] = alpha
    if method == "convex":
        record["weights"] = [round(float(w), 4) for w in mix]
    out: dict[str, torch.Tensor] = {}
    for name in names:
        first = copies[0][name]
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        stack = torch.stack([sd[name].to(torch.float64) for sd in copies])  # (k, *shape)
        if method == "average":
            merged = stack.mean(0)
        elif method == "median":
            merged = stack.median(0).values if len(copies) % 2 else stack.quantile(0.5, dim=0)
        elif method == "interleave":
            pick = torch.randint(len(copies), first.shape, generator=gen)
            merged = stack.gather(0, pick.unsqueeze(0)).squeeze(0)
        elif method == "layer-interleave":
            merged = stack[int(torch.randint(len(copies), (1,), generator=gen))]
        elif method == "extrapolate":
            merged = stack[0] + alpha * (stack[0] - stack[1])
        elif method == "convex":
            merged = torch.tensordot(mix, stack, dims=1)
        elif method == "erase":
            merged = torch.where((stack == stack[0]).all(0), stack[0], torch.zeros_like(stack[0]))
        else:
            use_max = torch.rand(first.shape, generator=gen) < 0.5
            merged = torch.where(use_max, stack.max(0).values, stack.min(0).values)
        out[name] = merged.to(first.dtype)
    return out, record


def mix_rounds(
    copies: Sequence[StateDict], rng: np.random.Generator, weights: Sequence[float] | np.ndarray | None = None
) -> tuple[dict, dict]:
    """One customer's own copies of several rounds merged: sum_j weights_j x copy_j (equal weights by default;
    any real weights summing to 1: a pirate may extrapolate too). Such a model matches none of the bases its
    copies were made from; the tracer reads it against a combination of bases (tracing.mixture)."""
    w = np.full(len(copies), 1 / max(len(copies), 1)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(copies) < 2 or w.shape != (len(copies),) or not np.all(np.isfinite(w)) or abs(w.sum() - 1) > 1e-9:
        raise InputError(f"mix-rounds needs 2 or more copies and one finite weight each summing to 1, got {w}")
    weighted = torch.from_numpy(w)
    merged, _ = collude(copies, "average", rng)  # the same tensors checked, counters from the first copy
    for name, first in copies[0].items():
        if first.is_floating_point():
            stack = torch.stack([sd[name].to(torch.float64) for sd in copies])
            merged[name] = torch.tensordot(weighted, stack, dims=1).to(first.dtype)
    return merged, {"attack": "mix-rounds", "copies": len(copies), "weights": [round(float(x), 4) for x in w]}
