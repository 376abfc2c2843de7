"""Rewrites that cost the pirate nothing: the model's outputs stay the same, every carrier coordinate moves.

* ``permute``: shuffle the hidden units of every unit group (every tensor axis that carries them together).
* ``rescale``: multiply each hidden unit by a positive factor and divide its outgoing weights by it, in the
  groups that admit it (the units pass only positively homogeneous functions: ReLU, pooling, sums); after a
  norm, the norm's weight and bias carry the factor; and where a BatchNorm absorbs its writers' scale, the
  writers by another factor, the BatchNorm's weight divided by it.
* ``signflip``: negate units under their BatchNorm (the writers' rows, bias and running mean with the
  BatchNorm's weight), section by section (fingerprint.moves), in the groups that admit it.
* ``widen``: add units that feed nothing (random incoming weights, zero outgoing weights) and split units in
  two (the same incoming direction at another scale, the outgoing weights shared between them; only where a
  rescale is admitted and no norm sits between). Not in groups with a LayerNorm (a unit more changes its
  statistics) or attention heads (the head count is the model's).
* ``spike``: set a few weights far out (5-500x their tensor's std), at inputs that are dead on the pirate's
  data when there are any (then the outputs do not change either).
* ``obfuscate``: all of them.

Unit groups are the owner's own (fingerprint.graph from the model's graph, or fingerprint.groups for a
sequential chain): a pirate knows the architecture as well as the owner does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from securemark import models
from securemark.fingerprint import moves
from securemark.fingerprint.align import UnitGroup, chain_groups, from_units, to_units, units_of

StateDict = Mapping[str, torch.Tensor]
Arrays = dict[str, np.ndarray]
Groups = Sequence[UnitGroup] | None


def _rewritten(sd: StateDict, groups: Groups, change: Callable[[Arrays, UnitGroup], None]) -> dict[str, torch.Tensor]:
    """``change`` applied to every unit group (default: ``sd``'s chain), on float64 copies of the tensors the
    groups name (the unit views are align's own); the rest of ``sd`` is cloned as it is."""
    groups = chain_groups(sd) if groups is None else groups
    named = {m.tensor for g in groups for m in g.members}
    arrs = {k: sd[k].detach().to("cpu", torch.float64).numpy().copy() for k in named}
    for g in groups:
        change(arrs, g)
    return {k: torch.from_numpy(arrs[k]).to(v.dtype) if k in arrs else v.detach().clone() for k, v in sd.items()}


def permute(sd: StateDict, rng: np.random.Generator, groups: Groups = None) -> tuple[dict, dict]:
    count = 0

    def change(arrs: Arrays, g: UnitGroup) -> None:
        nonlocal count
        if "permute" in g.admits:
            moves.permute(arrs, g, rng.permutation(units_of(arrs, g)))
            count += 1

    out = _rewritten(sd, groups, change)
    return out, {"attack": "permute", "groups": count}


def rescale(
    sd: StateDict, rng: np.random.Generator, low: float = 0.25, high: float = 4.0, groups: Groups = None
) -> tuple[dict, dict]:
    """Each hidden unit x a, a log-uniform in [low, high]; its outgoing weights / a. Where a BatchNorm absorbs
    its writers' scale, the writers x another such factor too (the BatchNorm's weight / it)."""
    if not 0 < low <= high or not np.isfinite(high):
        raise ValueError(f"rescale needs 0 < low <= high (finite), got {low}, {high}")
    count = 0

    def factors(n: int) -> np.ndarray:
        return np.exp(rng.uniform(np.log(low), np.log(high), n))

    def change(arrs: Arrays, g: UnitGroup) -> None:
        nonlocal count
        n = units_of(arrs, g)
        if "rescale" in g.admits:
            moves.rescale(arrs, g, factors(n))
            count += 1
        if "absorb" in g.admits:
            moves.absorb(arrs, g, [factors(n) for _ in moves.sections(g)])

    out = _rewritten(sd, groups, change)
    return out, {"attack": "rescale", "low": low, "high": high, "groups": count}


def signflip(sd: StateDict, rng: np.random.Generator, share: float = 0.5, groups: Groups = None) -> tuple[dict, dict]:
    """Negate each unit with probability ``share`` under its BatchNorm, section by section (fingerprint.moves)."""
    if not 0 <= share <= 1:
        raise ValueError(f"signflip needs 0 <= share <= 1, got {share}")
    flipped = 0

    def change(arrs: Arrays, g: UnitGroup) -> None:
        nonlocal flipped
        if "signflip" not in g.admits:
            return
        n = units_of(arrs, g)
        signs = [np.where(rng.random(n) < share, -1.0, 1.0) for _ in moves.sections(g)]
        flipped += int(sum(np.sum(x < 0) for x in signs))
        moves.absorb(arrs, g, signs)

    out = _rewritten(sd, groups, change)
    return out, {"attack": "signflip", "share": share, "flipped": flipped}


def _widens(g: UnitGroup) -> bool:
    """Units can be added: the group admits it (checked on the model, fingerprint.verify: the forward runs at
    the new width with the same outputs), no LayerNorm statistics over them, not a head layout (outer > 1)."""
    layer_norm = g.norm and len(g.of("affine")) > len(g.of("mean"))
    return "widen" in g.admits and not layer_norm and all(m.outer == 1 for m in g.members)


def widen(
    sd: StateDict, rng: np.random.Generator, extra: int = 4, splits: int = 2, groups: Groups = None
) -> tuple[dict, dict]:
    """Per hidden layer, add ``extra`` units that feed nothing (zero outgoing weights) and split ``splits``
    units in two (layers without a norm that admit a rescale only: a split must be a sum of two ReLU outputs)."""
    if extra < 0 or splits < 0:
        raise ValueError(f"widen needs extra, splits >= 0, got {extra}, {splits}")

    def change(arrs: Arrays, g: UnitGroup) -> None:
        if not _widens(g):
            return
        n = units_of(arrs, g)
        can_split = not g.norm and "rescale" in g.admits
        chosen = rng.choice(n, size=min(splits, n), replace=False) if can_split else np.array([], dtype=int)
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

    return _rewritten(sd, groups, change), {"attack": "widen", "extra": extra, "splits": splits}


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
    sd: StateDict, rng: np.random.Generator, dead: Mapping[str, torch.Tensor] | None = None, groups: Groups = None
) -> tuple[dict, dict]:
    """spike (at dead inputs when known) > widen > rescale > sign flips > permute. ``groups`` are those of the
    model as it is; widening changes shapes, so the later steps use the same groups on the widened arrays."""
    out, r1 = spike(sd, rng, dead=dead)
    out, r2 = widen(out, rng, groups=groups)
    out, r3 = rescale(out, rng, groups=groups)
    out, r4 = signflip(out, rng, groups=groups)
    out, r5 = permute(out, rng, groups=groups)
    return out, {"attack": "obfuscate", "steps": [r1, r2, r3, r4, r5]}
