"""The scales and signs a norm lets a pirate move, undone on a suspect already permuted into base order (the
steps of fingerprint.align that read BatchNorm and LayerNorm): sign flips and absorbed scales section by
section (fingerprint.moves), the scale-free stream of LayerNorm readers, and the provisional norm weights the
activation scale is fitted on before every writer is aligned."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from securemark.fingerprint import moves
from securemark.fingerprint.groups import Member, UnitGroup, _unit_matrices, to_units, units_of
from securemark.fingerprint.moves import scale_members as scale
from securemark.fingerprint.scales import _fits, _scales

Arrays = dict[str, np.ndarray]


def _has_bn(g: UnitGroup) -> bool:
    """A BatchNorm on these units: its writers' signs and scales are free (fingerprint.moves sections)."""
    return bool(g.of("mean"))


def _linked(g: UnitGroup, writer: Member) -> list[Member]:
    """The writer and its bias (``of`` links; a group with one writer owns every unlinked bias)."""
    alone = len(g.of("rows")) == 1
    return [writer] + [m for m in g.of("bias") if m.of == writer.tensor or (alone and not m.of)]


def _unflip(s: Arrays, b: Arrays, g: UnitGroup, n: int, ready: Sequence[Member]) -> int:
    """Undo sign flips section by section (fingerprint.moves: writers, bias, running mean and BatchNorm weight
    negated together); how many. The sign is read off the section's BatchNorm weights (a positive scale never
    changes it), in base order as soon as the group is, whether or not the writers' own inputs are; off the
    rows where those weights are 0 and the rows are aligned."""
    flipped = 0
    for writers, members in moves.sections(g):
        weights = [x for x in members if x.role == "affine"]
        su, bu = _unit_matrices(s, b, weights or writers[:1], n, n)
        dot = np.sum(su * bu, axis=1)
        if weights:  # a weight near 0 may cross 0 in fine-tuning: there the rows say, once aligned, or nothing
            size = np.abs(bu).sum(axis=1)
            firm = size > 0.1 * np.median(size)
            aligned = all(s[w.tensor].shape == b[w.tensor].shape for w in writers) and all(w in ready for w in writers)
            rows = np.zeros(n)
            if aligned:
                rs, rb = _unit_matrices(s, b, writers, n, n)
                rows = np.sum(rs * rb, axis=1)
            dot = np.where(firm, dot, rows)
        sign = np.where(dot < 0, -1.0, 1.0)
        scale(s, writers + members, n, {"rows": sign, "bias": sign, "mean": sign, "affine": sign})
        flipped += int(np.sum(sign < 0))
    return flipped


def _norm_pairs(members: Sequence[Member]) -> list[tuple[Member, list[Member]]]:
    """Each BatchNorm's running variance with its own weight (members of one module)."""

    def module(m: Member) -> str:
        return m.tensor.rpartition(".")[0]

    return [(v, [w for w in members if w.role == "affine" and module(w) == module(v)])
            for v in members if v.role == "var"]  # fmt: skip


def _var_ratio(s: Arrays, b: Arrays, var: Member, n: int, default: np.ndarray) -> np.ndarray:
    """Per unit, the suspect's running variance over the base's (``default`` where either is not positive)."""
    vs, vb = to_units(s[var.tensor], var, n).reshape(n), to_units(b[var.tensor], var, n).reshape(n)
    return np.divide(vs, vb, out=default.copy(), where=(vb > 0) & (vs > 0))


def _section_scales(s: Arrays, b: Arrays, g: UnitGroup, ready: Sequence[Member], n: int, noise: float) -> None:
    """A BatchNorm absorbs its writers' scale r, in its running mean (x r) and either its variance (x s^2) or
    its weight (x s / r): undo r on the writers, bias and mean, and, where r is not 1, the variance's s
    (read off the statistics, which no mark touches) and the weight's s / r. Sections whose writers are not all
    aligned yet wait for the balance."""
    same = np.arange(n)
    for writers, members in moves.sections(g):
        if not all(w in ready for w in writers):
            continue
        own = writers + [x for x in members if x.role == "bias"]
        r = _fits(*_unit_matrices(s, b, own, n, n), same, noise)
        scale(s, writers + members, n, {"rows": 1 / r, "bias": 1 / r, "mean": 1 / r})
        if np.all(r == 1.0):
            continue
        for var, weight in _norm_pairs(members):
            ratio = _var_ratio(s, b, var, n, r**2)
            scale(s, [var, *weight], n, {"var": 1 / ratio, "affine": r / np.sqrt(ratio)})


def _stream_scale(s: Arrays, b: Arrays, g: UnitGroup, ready: Sequence[Member], noise: float) -> None:
    """A stream read only through LayerNorms is scale-free: its writers times one factor c change no output
    (LayerNorm(c x) = LayerNorm(x)); a depthwise convolution on the stream passes c on, so its own rows keep
    theirs. Each aligned writer's factor is fitted as one number over all its entries (and its bias), and
    undone on it; a factor within the mark's shadow is read as 1."""
    if not g.of("affine") or _has_bn(g):
        return
    n = units_of(b, g)
    for w in (x for x in g.of("rows") if x in ready):
        own = _linked(g, w)
        fs, fb = _unit_matrices(s, b, own, n, n)
        c = float(_scales(fs.reshape(1, -1), fb.reshape(1, -1), noise)[0])
        if c != 1.0:
            scale(s, own, n, {"rows": np.full(n, 1 / c), "bias": np.full(n, 1 / c)})


def _provisional(s: Arrays, b: Arrays, g: UnitGroup, ready: Sequence[Member], n: int) -> dict[str, np.ndarray]:
    """The suspect's arrays with the BatchNorm weights of sections whose writers are not aligned yet read as
    if their absorbed scale were undone: r from the running means, s from the variances (statistics no mark
    touches), weight x r / s. Only to fit the activation scale the cols see now; the writers' rows are fitted
    once they are aligned (_section_scales)."""
    out = dict(s)
    for writers, members in moves.sections(g):
        if all(w in ready for w in writers):
            continue
        mean = [x for x in members if x.role == "mean"]
        r = _fits(*_unit_matrices(s, b, mean, n, n), np.arange(n), 0.0)
        for var, weight in _norm_pairs(members):
            scale(out, weight, n, {"affine": r / np.sqrt(_var_ratio(s, b, var, n, np.ones(n)))})
    return out
