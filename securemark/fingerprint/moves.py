"""The moves of a unit group that may leave a model's function unchanged, as pure numpy on its tensors.

* ``permute``: every member's units reordered alike.
* ``rescale``: the units' activation scale: the writers' rows and bias (after a norm: the norm's weight and
  bias) x a, the readers' columns / a. Function-preserving through positively homogeneous functions.
* ``absorb``: a BatchNorm absorbs its writers' scale: rows and bias x r, running mean x r, the BatchNorm's weight
  / r (exactly: BN(r y) with mean r mu and weight gamma / r is BN(y)).
* ``signflip``: the same with r = -1 (a negative scale is absorbed as well).
* ``widen``: units added that feed nothing (their readers' columns 0), when the model runs at the new width.

The last two act per *section*: each writer with its own BatchNorm after it (post-norm), and the writers
without one together with the BatchNorms that read the units (pre-norm: the stream of a pre-activation
ResNet). Which moves a model admits is checked on the model itself (fingerprint.graph: ``verify``); the
rewrite attacks (attacks.rewrite) and alignment (fingerprint.align) use the same sections.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from securemark.fingerprint.groups import Member, UnitGroup, from_units, to_units, units_of

Arrays = dict[str, np.ndarray]
NORM_ROLES = ("mean", "var", "affine", "shift")


def sections(g: UnitGroup) -> list[tuple[list[Member], list[Member]]]:
    """(writers, their bias and BatchNorm members) that scale and flip together; only sections with a
    BatchNorm (running mean) are returned. A group with one writer owns every unlinked member."""
    rows = g.of("rows")
    if len(rows) == 1:
        owned = [m for m in g.members if m.role == "bias" or m.role in NORM_ROLES]
        return [(rows, owned)] if any(m.role == "mean" for m in owned) else []
    with_bn = {m.of for m in g.members if m.role == "mean" and m.of}
    out = [([w], [m for m in g.members if m.of == w.tensor]) for w in rows if w.tensor in with_bn]
    free = [w for w in rows if w.tensor not in with_bn]
    names = {w.tensor for w in free}
    shared = [m for m in g.members if (m.role == "bias" and m.of in names) or (m.role in NORM_ROLES and not m.of)]
    if free and any(m.role == "mean" for m in shared):
        out.append((free, shared))
    return out


def scale_members(arrs: Arrays, members: Sequence[Member], n: int, factor: dict[str, np.ndarray]) -> None:
    """Multiply each member's units by factor[role] (roles not named are left as they are)."""
    for m in members:
        if m.role in factor:
            u = to_units(arrs[m.tensor], m, n)
            f = factor[m.role].reshape((n,) + (1,) * (u.ndim - 1))
            arrs[m.tensor] = from_units(u * f, m, arrs[m.tensor].shape)


def permute(arrs: Arrays, g: UnitGroup, perm: np.ndarray) -> None:
    n = units_of(arrs, g)
    for m in g.members:
        arrs[m.tensor] = from_units(to_units(arrs[m.tensor], m, n)[perm], m, arrs[m.tensor].shape)


def rescale(arrs: Arrays, g: UnitGroup, a: np.ndarray) -> None:
    up = {"affine": a, "shift": a} if g.norm else {"rows": a, "bias": a}
    scale_members(arrs, list(g.members), units_of(arrs, g), up | {"cols": 1 / a})


def absorb(arrs: Arrays, g: UnitGroup, r: list[np.ndarray]) -> None:
    """Section k's writers x r[k] (negative entries flip them), absorbed by its BatchNorms."""
    n = units_of(arrs, g)
    for (writers, members), f in zip(sections(g), r, strict=True):
        scale_members(arrs, writers + members, n, {"rows": f, "bias": f, "mean": f, "affine": 1 / f})


def widen(arrs: Arrays, g: UnitGroup, extra: int = 1) -> None:
    """``extra`` units added after the others: rows at the rows' scale (a fixed pattern: this is a probe, not an
    attack), readers' columns 0, BatchNorm statistics 0 and 1, norm weights 1 and biases 0."""
    n = units_of(arrs, g)
    fill = {"cols": 0.0, "mean": 0.0, "var": 1.0, "affine": 1.0, "shift": 0.0}
    for m in g.members:
        u = to_units(arrs[m.tensor], m, n)
        if m.role in fill:
            added = np.full((extra, *u.shape[1:]), fill[m.role])
        else:
            added = np.resize(u, (extra, *u.shape[1:])) * 0.5  # rows and bias: like a real unit's
        arrs[m.tensor] = from_units(np.concatenate([u, added]), m, arrs[m.tensor].shape)
