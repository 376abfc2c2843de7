"""Rewrites that cost the pirate nothing: the model's outputs stay the same, every carrier coordinate moves.

* ``permute``: shuffle the hidden units of every layer (with the next layer's input axis).
* ``rescale``: multiply each hidden unit by a positive factor and divide its outgoing weights by it (ReLU and
  max-pooling are positively homogeneous); with BatchNorm, the BN affine parameters carry the factor.
* ``widen``: add units that feed nothing (random incoming weights, zero outgoing weights) and split units in
  two (the same incoming direction at another scale, the outgoing weights shared between them).
* ``spike``: set a few weights far out (5-500x their tensor's std), at inputs that are dead on the pirate's
  data when there are any (then the outputs do not change either).
* ``obfuscate``: all of them.

Unit groups come from :mod:`securemark.fingerprint.align` (the same layer graph the owner aligns with).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from securemark import models
from securemark.fingerprint.align import UnitGroup, chain_groups, from_units, to_units, units_of

StateDict = Mapping[str, torch.Tensor]
Arrays = dict[str, np.ndarray]


def _rewritten(sd: StateDict, change: Callable[[Arrays, UnitGroup], None]) -> dict[str, torch.Tensor]:
    """``change`` applied to every hidden unit group of ``sd``'s chain, on float64 copies of the tensors the
    groups name (the unit views are align's own); the rest of ``sd`` is cloned as it is."""
    groups = chain_groups(sd)
    named = {m.tensor for g in groups for m in g.members}
    arrs = {k: sd[k].detach().to("cpu", torch.float64).numpy().copy() for k in named}
    for g in groups:
        change(arrs, g)
    return {k: torch.from_numpy(arrs[k]).to(v.dtype) if k in arrs else v.detach().clone() for k, v in sd.items()}


def permute(sd: StateDict, rng: np.random.Generator) -> tuple[dict, dict]:
    def change(arrs: Arrays, g: UnitGroup) -> None:
        n = units_of(arrs, g)
        perm = rng.permutation(n)
        for m in g.members:
            arrs[m.tensor] = from_units(to_units(arrs[m.tensor], m, n)[perm], m, arrs[m.tensor].shape)

    return _rewritten(sd, change), {"attack": "permute", "groups": len(chain_groups(sd))}


def rescale(sd: StateDict, rng: np.random.Generator, low: float = 0.25, high: float = 4.0) -> tuple[dict, dict]:
    """Each hidden unit x a, a log-uniform in [low, high]; its outgoing weights / a."""
    if not 0 < low <= high or not np.isfinite(high):
        raise ValueError(f"rescale needs 0 < low <= high (finite), got {low}, {high}")

    def change(arrs: Arrays, g: UnitGroup) -> None:
        n = units_of(arrs, g)
        a = np.exp(rng.uniform(np.log(low), np.log(high), n))
        up = ("affine",) if g.norm else ("rows", "bias")
        for m in g.members:
            if m.role in up or m.role == "cols":
                u = to_units(arrs[m.tensor], m, n)
                f = (a if m.role in up else 1 / a).reshape((n,) + (1,) * (u.ndim - 1))
                arrs[m.tensor] = from_units(u * f, m, arrs[m.tensor].shape)

    return _rewritten(sd, change), {"attack": "rescale", "low": low, "high": high}


def widen(sd: StateDict, rng: np.random.Generator, extra: int = 4, splits: int = 2) -> tuple[dict, dict]:
    """Per hidden layer, add ``extra`` units that feed nothing (zero outgoing weights) and split ``splits``
    units in two (layers without BatchNorm only: a split under BN is not a sum of two ReLU outputs)."""
    if extra < 0 or splits < 0:
        raise ValueError(f"widen needs extra, splits >= 0, got {extra}, {splits}")

    def change(arrs: Arrays, g: UnitGroup) -> None:
        n = units_of(arrs, g)
        chosen = rng.choice(n, size=min(splits, n), replace=False) if not g.norm else np.array([], dtype=int)
        scale = rng.uniform(0.5, 2.0, len(chosen))  # the split's incoming scale t
        share = rng.uniform(0.2, 0.8, len(chosen))  # the split's share c of the outgoing weights
        for m in g.members:
            u = to_units(arrs[m.tensor], m, n).copy()
            shape = (len(chosen),) + (1,) * (u.ndim - 1)
            new = u[chosen].copy()
            if m.role in ("rows", "bias"):
                new = new * scale.reshape(shape)
            elif m.role == "cols":
                u[chosen] = new * (1 - share.reshape(shape))
                new = new * (share / scale).reshape(shape)  # t ReLU(r x) (c / t) col = c col ReLU(r x)
            added_shape = (extra, *u.shape[1:])
            if m.role == "cols":
                added = np.zeros(added_shape)  # the added units feed nothing: outputs unchanged
            elif m.role == "var":
                added = np.ones(added_shape)  # a valid BatchNorm variance
            else:
                std = float(u.std()) if u.size > 1 else 1.0
                added = std * rng.standard_normal(added_shape)  # look like real units
            u = np.concatenate([u, new, added])
            arrs[m.tensor] = from_units(u, m, arrs[m.tensor].shape)

    return _rewritten(sd, change), {"attack": "widen", "extra": extra, "splits": splits}


def dead_inputs(model: torch.nn.Module, sd: StateDict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """For each Linear/Conv weight, a mask of the entries whose input is zero on every example of ``x``."""
    models.load_weights(model, sd)
    model.eval()
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear | torch.nn.Conv2d):

            def hook(_m: torch.nn.Module, args: tuple, _out: torch.Tensor, name: str = name) -> None:
                a = args[0].detach().abs()
                live = a.sum(0) if a.dim() == 2 else a.sum(dim=(0, 2, 3))  # per input feature / channel
                seen[name] = seen[name] + live if name in seen else live

            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    masks = {}
    for name, live in seen.items():
        w = sd[f"{name}.weight"]
        dead = live == 0  # (in,)
        shape = (1, -1) + (1,) * (w.dim() - 2)
        masks[f"{name}.weight"] = dead.reshape(shape).expand_as(w)
    return masks


def spike(
    sd: StateDict, rng: np.random.Generator, count: int = 0, low: float = 5.0, high: float = 500.0,
    dead: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict, dict]:  # fmt: skip
    """Add +-k std to ``count`` weights (0: 1 to 3 at random), k log-uniform in [low, high]; at dead inputs
    when ``dead`` offers some, anywhere in a >= 2-D weight otherwise."""
    if count < 0 or not 0 < low <= high:
        raise ValueError(f"spike needs count >= 0 and 0 < low <= high, got {count}, {low}, {high}")
    count = count or int(rng.integers(1, 4))
    out = {k: v.detach().clone() for k, v in sd.items()}
    names = [n for n, t in sd.items() if t.is_floating_point() and t.dim() >= 2]
    pool = {n: m for n, m in (dead or {}).items() if n in names and bool(m.any())}
    placed = []
    for _ in range(count):
        name = str(rng.choice(sorted(pool or names)))
        t = out[name]
        flat = torch.nonzero(pool[name].reshape(-1)).reshape(-1) if pool else torch.arange(t.numel())
        index = int(flat[int(rng.integers(len(flat)))])
        k = float(np.exp(rng.uniform(np.log(low), np.log(high)))) * float(rng.choice([-1.0, 1.0]))
        t.view(-1)[index] += k * float(sd[name].float().std())
        placed.append({"tensor": name, "index": index, "stds": round(k, 1)})
    return out, {"attack": "spike", "spikes": placed, "dead": bool(pool)}


def obfuscate(
    sd: StateDict, rng: np.random.Generator, dead: Mapping[str, torch.Tensor] | None = None
) -> tuple[dict, dict]:
    """spike (at dead inputs when known) > widen > rescale > permute."""
    out, r1 = spike(sd, rng, dead=dead)
    out, r2 = widen(out, rng)
    out, r3 = rescale(out, rng)
    out, r4 = permute(out, rng)
    return out, {"attack": "obfuscate", "steps": [r1, r2, r3, r4]}
