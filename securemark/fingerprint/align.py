"""Align a suspect to the base it was made from, undoing rewrites that leave the model's function unchanged.

A pirate acts on the function, not on our coordinates: permuting the hidden units of a layer (with the next
layer's input axis), rescaling a unit by a positive factor through ReLU (rows x a, next columns / a), adding
units that feed nothing, or splitting a unit in two leaves every output the same and moves every carrier
weight. The owner holds the base, so it can put the suspect back into the base's coordinates before reading:

1. **Units.** A :class:`UnitGroup` is one hidden layer's units: the tensors (and axes) permuted together.
   For sequential chains of Linear / Conv / BatchNorm layers the groups follow from the base's state_dict
   (:func:`chain_groups`); other architectures (residual streams) pass their groups explicitly (JSON).
2. **Matching.** Groups are aligned in order, input side first, so a layer's incoming weights are already in
   base coordinates when its units are matched: cosine similarity of each unit's incoming weights and bias
   (scale-free), then an optimal assignment (scipy's ``linear_sum_assignment``). Unmatched suspect units are
   merged into the unit they duplicate (a split: cosine >= 0.999) or dropped (units that feed nothing); base
   units the suspect lacks are read as zeros.
3. **Scales.** Each matched unit's positive scale is a trimmed least-squares fit of its incoming weights to
   the base's (a spike cannot move it), undone function-preservingly (next columns x a), then balanced
   against the fit of its outgoing weights. With BatchNorm the conv scale is absorbed by the running
   statistics and the outgoing scale by the BN affine parameters: each is undone on its own side.

Every step uses the suspect and the base only, never a code row: an innocent's score stays independent of
the aligned observation, so the tracer's bound still holds.

The parts live apart: the unit groups and their layout on tensors in fingerprint.groups (derived from a
model's graph in fingerprint.graph), the directions and cosines the matching compares in fingerprint.matching,
the robust scale fits in fingerprint.scales, what norms let a pirate move (BatchNorm signs and absorbed scales,
LayerNorm-read streams) in fingerprint.norms. This module runs the steps on the suspect's arrays, group by group
in dataflow order: a group is matched on the writers whose own inputs are aligned already.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from securemark.fingerprint.groups import (
    AlignmentError,
    Member,
    StateDict,
    UnitGroup,
    _unit_matrices,
    chain_groups,
    from_units,
    load_groups,
    to_units,
    units_of,
)
from securemark.fingerprint.matching import _directions, _similarity
from securemark.fingerprint.moves import scale_members as scale
from securemark.fingerprint.norms import _has_bn, _linked, _provisional, _section_scales, _stream_scale, _unflip
from securemark.fingerprint.scales import SHADOW_SIGMAS, _fits, _robust_scale, _scales

# the unit groups and their layout (fingerprint.groups) stay importable from here, where callers take them
__all__ = [
    "AlignmentError",
    "AlignmentReport",
    "Member",
    "UnitGroup",
    "align",
    "chain_groups",
    "from_units",
    "load_groups",
    "to_units",
    "units_of",
]

SPLIT_COSINE = 0.999  # an unmatched unit this parallel to the suspect's own unit for a base unit is its split


@dataclass
class AlignmentReport:
    groups: int = 0
    permuted: int = 0  # units not at their base position
    rescaled: int = 0  # units whose scale differed from 1 by more than 1%
    merged: int = 0  # split units folded back
    dropped: int = 0  # extra units dropped
    missing: int = 0  # base units the suspect lacks (read as zeros)
    flipped: int = 0  # writers' units whose sign was flipped under their BatchNorm


def _incoming(g: UnitGroup) -> list[Member]:
    return g.of("rows") + g.of("bias")


def _up(g: UnitGroup) -> list[Member]:
    """What sets a unit's activation scale: its rows and bias, or the norm's affine parameters after a norm."""
    return g.of("affine") + g.of("shift") if g.norm else _incoming(g)


class _Order:
    """Which tensor axes belong to which group, and which groups are in base coordinates already: a writer's
    rows say which base unit it is only once every other unit axis of its tensor has been aligned."""

    def __init__(self, groups: Sequence[UnitGroup]) -> None:
        self.groups = list(groups)
        self.axes: dict[str, dict[int, int]] = {}
        for i, g in enumerate(self.groups):
            for m in g.members:
                self.axes.setdefault(m.tensor, {})[m.axis] = i
        self.done: set[int] = set()

    def ready(self, m: Member, i: int) -> bool:
        return all(j in self.done for a, j in self.axes.get(m.tensor, {}).items() if a != m.axis)

    def next(self) -> tuple[int, list[Member]]:
        """The next group to match, and the members to match its units on: its writers whose inputs are aligned
        (with their biases), else its readers whose outputs are, else (a cycle) every writer."""
        pending = [i for i in range(len(self.groups)) if i not in self.done]
        for role in ("rows", "cols"):
            for i in pending:
                g = self.groups[i]
                ready = [m for m in g.of(role) if self.ready(m, i)]
                if ready:
                    if role == "rows":
                        ready += [b for w in ready for b in _linked(g, w) if b.role == "bias"]
                    return i, ready
        return pending[0], _incoming(self.groups[pending[0]])


def _similarity_of(
    s: dict[str, np.ndarray], b: dict[str, np.ndarray], g: UnitGroup, on: list[Member], m: int, n: int
) -> np.ndarray:
    """(m, n) cosines of the units' entries in ``on``; under a BatchNorm, where writers' signs are free, the
    mean of each writer's absolute cosines (the writers flip independently)."""
    writers = [w for w in on if w.role == "rows"]
    if not _has_bn(g) or not writers:
        su, bu = _unit_matrices(s, b, on, m, n)
        return _similarity(_directions(su), _directions(bu))
    total = np.zeros((m, n))
    for w in writers:
        own = [x for x in _linked(g, w) if x in on]
        su, bu = _unit_matrices(s, b, own, m, n)
        total += np.abs(_similarity(_directions(su), _directions(bu)))
    return total / len(writers)


def _align_group(
    s: dict[str, np.ndarray], b: dict[str, np.ndarray], g: UnitGroup, on: list[Member], rep: AlignmentReport,
    noise: float,
) -> None:  # fmt: skip
    m, n = units_of(s, g), units_of(b, g)
    srows, brows = _unit_matrices(s, b, on, m, n)
    fs = _directions(srows)
    cos = _similarity_of(s, b, g, on, m, n)  # (m, n)
    rows_idx, cols_idx = linear_sum_assignment(-cos)
    live = fs[rows_idx].any(axis=1)  # a unit with all-zero incoming weights is one removed in place
    rows_idx, cols_idx = rows_idx[live], cols_idx[live]
    source = np.full(n, -1)  # suspect unit feeding base unit j (-1: missing)
    source[cols_idx] = rows_idx
    writers = [w for w in on if w.role == "rows"]
    extra = np.setdiff1d(np.arange(m), rows_idx)
    merges: list[tuple[int, int, float]] = []  # (suspect unit, base unit, its scale)
    for u in extra if not g.norm and writers else ():  # a split of a unit under BN is not a sum of two ReLU outputs
        j = int(np.argmax(cos[u]))
        # parallel to its twin in the suspect itself: the mark (and laundering) moves both halves alike,
        # while either one's cosine to the base unit is lowered by the mark (0.9987 at the default budget)
        if source[j] >= 0 and fs[u] @ fs[source[j]] >= SPLIT_COSINE:
            merges.append((int(u), j, _robust_scale(srows[u], brows[j], noise)))
    rep.groups += 1
    rep.permuted += int(np.sum((source >= 0) & (source != np.arange(n))))
    rep.merged += len(merges)
    rep.dropped += len(extra) - len(merges)
    rep.missing += int(np.sum(source < 0))
    shares: list[tuple[Member, int, np.ndarray]] = []  # a split's outgoing weights, in base scale
    for mem in g.members:  # permute (merge, drop, zero-fill) into base order
        arr = s[mem.tensor]
        u = to_units(arr, mem, m)
        out = np.zeros((n, *u.shape[1:]))
        ok = source >= 0
        out[ok] = u[source[ok]]
        if mem.role == "cols":
            shares += [(mem, j, a * u[unit]) for unit, j, a in merges]  # ReLU(a r x) = a ReLU(r x)
        s[mem.tensor] = from_units(out, mem, arr.shape)
    same = np.arange(n)
    if g.norm:  # each writer's scale is absorbed by its BatchNorm; the cols see the norm's affine scale
        if _has_bn(g):
            rep.flipped += _unflip(s, b, g, n, writers)
            _section_scales(s, b, g, writers, n, noise)
        _stream_scale(s, b, g, writers, noise)
        up = _up(g)  # a norm without affine parameters fixes the activation scale: nothing to read or undo
        alpha = (
            _fits(*_unit_matrices(_provisional(s, b, g, writers, n), b, up, n, n), same, noise) if up else np.ones(n)
        )
        scale(s, g.members, n, {"affine": 1 / alpha, "shift": 1 / alpha, "cols": alpha})
    elif writers:  # the writers share the units' scale, and the cols see it; read on those already aligned
        incoming = [x for x in on if x.role in ("rows", "bias")]
        alpha = _fits(*_unit_matrices(s, b, incoming, n, n), same, noise)
        scale(s, g.members, n, {"rows": 1 / alpha, "bias": 1 / alpha, "cols": alpha})
    else:  # matched on the readers: the scale waits for the balance
        alpha = np.ones(n)
    for mem, j, share in shares:  # added once the twin's cols are in base scale
        u = to_units(s[mem.tensor], mem, n)
        u[j] += share
        s[mem.tensor] = from_units(u, mem, s[mem.tensor].shape)
    rep.rescaled += int(np.sum(np.abs(alpha - 1.0) > 0.01))


def _balance(s: dict[str, np.ndarray], b: dict[str, np.ndarray], g: UnitGroup, noise: float) -> None:
    """After every group is in place, undo the scale error e left on each unit: its activation side (rows, or
    norm affine) reads e x base, its cols base / e. Both fits estimate log e, with variances noise^2 / |b|^2 of
    their own entries, so they are combined by precision: a 9-entry kernel row says little, the 288 entries of
    its outgoing channel say much (an equal-weight mean left a 3x3 kernel's units off by a third of the mark).
    An estimate within SHADOW_SIGMAS standard errors of 1 is the mark's own shadow and reads as 1."""
    n = units_of(b, g)
    same = np.arange(n)
    if _has_bn(g):  # the writers' side under BatchNorm first, section by section, now that every writer is aligned
        _section_scales(s, b, g, g.of("rows"), n, noise)
    if not _up(g):  # no affine parameters after the norm: the activation scale is fixed
        return
    _stream_scale(s, b, g, g.of("rows"), noise)
    up_s, up_b = _unit_matrices(s, b, _up(g), n, n)
    cols_s, cols_b = _unit_matrices(s, b, g.of("cols"), n, n) if g.of("cols") else (up_s[:, :0], up_b[:, :0])
    p_up, p_cols = np.sum(up_b**2, axis=1), np.sum(cols_b**2, axis=1)
    total = p_up + p_cols
    votes = p_up * np.log(_fits(up_s, up_b, same, 0.0)) - p_cols * np.log(_fits(cols_s, cols_b, same, 0.0))
    log_e = np.divide(votes, total, out=np.zeros(n), where=total > 0)
    log_e[np.abs(log_e) <= SHADOW_SIGMAS * noise / np.sqrt(np.maximum(total, 1e-300))] = 0.0
    f = np.exp(-log_e)
    up = {"affine": f, "shift": f} if g.norm else {"rows": f, "bias": f}
    scale(s, g.members, n, up | {"cols": 1 / f})


def _erase_tiny(arr: np.ndarray) -> None:
    """Entries below 1e-9 of the tensor's 95th-percentile magnitude become exact zeros (erasures): a pruner
    that writes 1e-12 instead of 0 must not pass for a row of real weights (nor overflow the scale fits). The
    percentile ignores both a few spikes and a majority of pruned entries."""
    mags = np.abs(arr)
    nonzero = mags[mags > 0]
    if nonzero.size:
        arr[mags <= 1e-9 * float(np.quantile(nonzero, 0.95))] = 0.0


def _output_gauge(
    s: dict[str, np.ndarray], b: dict[str, np.ndarray], groups: Sequence[UnitGroup], noise: float
) -> None:
    """Undo what a softmax (or an argmax) cannot see on the output layer: the same vector added to every class
    row (and the same constant to every class bias), and a positive factor on all logits. Per input, suspect
    and base are centred over the classes (erased entries left out and kept as erasures), the common scale is
    fitted on the centred entries and undone, and the base's class mean is put back. A shift within SHADOW_SIGMAS
    standard errors of the mark's own class mean is the mark's and is left; a pirate's larger one takes the mark's
    class-mean component with it (1 / classes of that layer's share)."""
    hidden = {m.tensor for g in groups for m in g.of("rows")}
    heads = {m.tensor for g in groups for m in g.of("cols")} - hidden
    if len(heads) != 1:  # no output layer that reads hidden units (or several): nothing to undo
        return
    w = heads.pop()
    if s[w].shape != b[w].shape or s[w].shape[0] < 2:  # a misshapen one is refused by align's final check
        return
    names = [w]
    bias = w.removesuffix("weight") + "bias"
    if w.endswith("weight") and bias in s and s[bias].shape == b[bias].shape == s[w].shape[:1]:
        names.append(bias)
    kept = {n: s[n] != 0 for n in names}  # erased entries stay erasures
    centred: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for n in names:  # per input, both sides centred over the classes the suspect kept
        count = np.maximum(kept[n].sum(axis=0, keepdims=True), 1)
        mb = np.where(kept[n], b[n], 0.0).sum(axis=0, keepdims=True) / count
        ms = np.where(kept[n], s[n], 0.0).sum(axis=0, keepdims=True) / count
        ms = np.where(np.abs(ms - mb) <= SHADOW_SIGMAS * noise / np.sqrt(count), mb, ms)  # the mark's own class mean
        centred[n] = (np.where(kept[n], s[n] - ms, 0.0), np.where(kept[n], b[n] - mb, 0.0), mb)
    flat_s = np.concatenate([centred[n][0].ravel() for n in names])
    flat_b = np.concatenate([centred[n][1].ravel() for n in names])
    # the logit scale, fitted shift-free; any factor that keeps the weights finite keeps the argmax
    c = float(_scales(flat_s[None, :], flat_b[None, :], noise, limit=1e36)[0])
    for n in names:
        sc, _, mb = centred[n]
        s[n] = np.where(kept[n], sc / c + mb, 0.0)


def align(
    suspect: StateDict, base: StateDict, groups: Sequence[UnitGroup] | None = None, noise: float = 0.0
) -> tuple[dict[str, torch.Tensor], AlignmentReport]:
    """The suspect in the base's coordinates: same tensor names and shapes as ``base``.

    ``noise`` is the RMS per weight of what legitimately separates a copy from the base (the mark): scale
    fits within its shadow are read as 1 (see :func:`_scales`).

    ``groups`` default to :func:`chain_groups` of the base. The layer the last group feeds, when no group
    permutes its own units (the output layer), has its softmax gauge undone too (a vector added to every class
    row, a positive factor on the logits; for another layer this only reads it a little coarser). Entries below
    1e-9 of their tensor's typical magnitude read as exact zeros. Tensors of the base missing from the suspect, or of a
    shape no group explains, raise :class:`AlignmentError`; tensors the base does not have are ignored.
    """
    groups = chain_groups(base) if groups is None else list(groups)
    missing = [n for n in base if n not in suspect and base[n].is_floating_point()]
    if missing:
        raise AlignmentError(
            f"tensor {missing[0]!r} is missing from the suspect (expected shape {list(base[missing[0]].shape)})"
        )
    kind = [n for n in base if base[n].is_floating_point() and not suspect[n].is_floating_point()]
    if kind:
        raise AlignmentError(
            f"tensor {kind[0]!r} is {suspect[kind[0]].dtype} in the suspect, {base[kind[0]].dtype} in the base"
        )
    s = {k: suspect[k].detach().to("cpu", torch.float64).numpy().copy() for k in base if base[k].is_floating_point()}
    b = {k: base[k].detach().to("cpu", torch.float64).numpy() for k in base if base[k].is_floating_point()}
    for arr in s.values():
        _erase_tiny(arr)
    rep = AlignmentReport()
    for g in groups:
        unknown = [m.tensor for m in g.members if m.tensor not in b]
        if unknown:
            raise AlignmentError(f"unit group {g.name!r} names {unknown[0]!r}, which the base does not hold as floats")
    order = _Order(groups)
    while len(order.done) < len(groups):
        i, on = order.next()
        _align_group(s, b, groups[i], on, rep, noise)
        order.done.add(i)
    _output_gauge(s, b, groups, noise)  # before balancing: a logit scale must not be pushed into hidden units
    for g in groups:
        _balance(s, b, g, noise)
    out: dict[str, torch.Tensor] = {}
    for name, t in base.items():
        if name not in s:  # an integer buffer (num_batches_tracked): the suspect's, or the base's if it dropped it
            out[name] = suspect.get(name, t)
            continue
        if s[name].shape != tuple(t.shape):
            raise AlignmentError(
                f"tensor {name!r} has shape {list(suspect[name].shape)}, the base {list(t.shape)}, "
                "and no unit group maps it"
            )
        out[name] = torch.from_numpy(s[name]).to(t.dtype)
    return out, rep
