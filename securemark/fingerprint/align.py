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
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

StateDict = Mapping[str, torch.Tensor]
SPLIT_COSINE = 0.999  # an unmatched unit this parallel to the suspect's own unit for a base unit is its split
ROLES = ("rows", "bias", "cols", "mean", "var", "affine")
# A fit within this many standard errors of 1 (under the mark's own perturbation) is the mark's shadow, read as
# 1. The fits are many (every unit, twice), so the rule must be per-trace, not per-fit: 4 sigmas (6e-5 a fit)
# rescaled one unit of an intact copy in 1.7% of traces; 6 sigmas is 2e-9 a fit, ~2e-5 for a 10^4-unit model.
SHADOW_SIGMAS = 6.0


class AlignmentError(ValueError):
    """The suspect (or the base) has a shape alignment cannot map; the message says why."""


@dataclass(frozen=True)
class Member:
    """One tensor axis that a unit group permutes.

    role: ``rows`` a weight's own units (axis 0: the unit's incoming weights), ``bias`` their bias,
    ``cols`` the next layer's input axis (``block`` consecutive entries per unit: H*W after a flatten),
    ``mean``/``var`` BatchNorm running statistics, ``affine`` BatchNorm weight and bias.
    """

    tensor: str
    role: str
    axis: int = 0
    block: int = 1

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise AlignmentError(f"member {self.tensor!r}: role must be one of {ROLES}, got {self.role!r}")
        if not 0 <= self.axis < 64 or not 1 <= self.block < 2**40:
            raise AlignmentError(
                f"member {self.tensor!r}: needs 0 <= axis < 64 and block >= 1, got {self.axis}, {self.block}"
            )


@dataclass(frozen=True)
class UnitGroup:
    name: str
    members: tuple[Member, ...]
    norm: bool = False  # a BatchNorm sits between the rows and the cols

    def of(self, role: str) -> list[Member]:
        return [m for m in self.members if m.role == role]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "norm": self.norm,
            "members": [[m.tensor, m.role, m.axis, m.block] for m in self.members],
        }

    @classmethod
    def from_json(cls, obj: dict) -> UnitGroup:
        try:
            members = tuple(Member(str(t), str(r), int(a), int(b)) for t, r, a, b in obj["members"])
            return cls(str(obj["name"]), members, bool(obj.get("norm", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise AlignmentError(f"bad unit group {obj!r}: {exc}") from None


def load_groups(path: str | Path) -> list[UnitGroup]:
    """Unit groups from a JSON file: ``[{"name", "norm", "members": [[tensor, role, axis, block], ...]}]``."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AlignmentError(f"cannot read unit groups from {path}: {exc}") from None
    except UnicodeDecodeError:  # its message would quote a byte of the file
        raise AlignmentError(f"cannot read unit groups from {path}: not a UTF-8 text file") from None
    if not isinstance(raw, list):
        raise AlignmentError(f"{path}: expected a JSON list of unit groups")
    return [UnitGroup.from_json(g) for g in raw]


# --- the layer graph of a sequential chain --------------------------------------------------------------
def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass
class _Layer:
    prefix: str
    kind: str  # "weight" (linear/conv) or "norm"
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)


def _layers(sd: StateDict) -> list[_Layer]:
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, t in sd.items():
        prefix, _, leaf = name.rpartition(".")
        modules.setdefault(prefix, {})[leaf] = tuple(t.shape)
    layers = []
    for prefix in sorted(modules, key=_natural):
        leaves = modules[prefix]
        if "weight" not in leaves:
            raise AlignmentError(
                f"module {prefix!r} has no weight ({sorted(leaves)}): not a Linear/Conv/BatchNorm chain"
            )
        if len(leaves["weight"]) >= 2:
            layers.append(_Layer(prefix, "weight", leaves))
        elif "running_mean" in leaves:
            layers.append(_Layer(prefix, "norm", leaves))
        else:
            raise AlignmentError(
                f"module {prefix!r} has a 1-D weight without running statistics (LayerNorm/GroupNorm?): not covered "
                "by the derived chain; pass explicit unit groups"
            )
    return layers


def chain_groups(sd: StateDict) -> list[UnitGroup]:
    """The hidden unit groups of a sequential Linear / Conv (/ BatchNorm) chain, derived from shapes.

    Layers are ordered by name (numbers compared as numbers: ``features.10`` after ``features.9``), as
    ``nn.Sequential`` and modules defined in forward order (Flower's quickstart ``Net``) name them. Each layer
    must take what the previous one gives: the same width, or a multiple of it after a flatten
    (conv -> linear). Anything else is refused with the reason.
    """
    layers = _layers(sd)
    weights = [i for i, layer in enumerate(layers) if layer.kind == "weight"]
    groups = []
    for a, b in itertools.pairwise(weights):
        prev, nxt = layers[a], layers[b]
        out, fan_in = prev.tensors["weight"][0], nxt.tensors["weight"][1]
        conv_to_conv = len(prev.tensors["weight"]) > 2 and len(nxt.tensors["weight"]) > 2
        if fan_in % out or (conv_to_conv and fan_in != out):
            raise AlignmentError(
                f"layer {nxt.prefix!r} takes {fan_in} inputs but {prev.prefix!r} gives {out} units: not a "
                "sequential chain (residual or branching models need explicit unit groups)"
            )
        members = [Member(f"{prev.prefix}.weight", "rows")]
        if "bias" in prev.tensors:
            members.append(Member(f"{prev.prefix}.bias", "bias"))
        norms = [layers[k] for k in range(a + 1, b)]
        for norm in norms:
            if norm.tensors["weight"] != (out,):
                raise AlignmentError(
                    f"norm {norm.prefix!r} has {norm.tensors['weight'][0]} channels, {prev.prefix!r} gives {out}"
                )
            members += [Member(f"{norm.prefix}.running_mean", "mean"), Member(f"{norm.prefix}.running_var", "var"),
                        Member(f"{norm.prefix}.weight", "affine")]  # fmt: skip
            if "bias" in norm.tensors:
                members.append(Member(f"{norm.prefix}.bias", "affine"))
        members.append(Member(f"{nxt.prefix}.weight", "cols", axis=1, block=fan_in // out))
        groups.append(UnitGroup(prev.prefix, tuple(members), norm=bool(norms)))
    return groups


# --- alignment --------------------------------------------------------------------------------------------
def to_units(arr: np.ndarray, m: Member, units: int) -> np.ndarray:
    """(units, ...): the member's axis split into (units, block) and moved first."""
    shape = arr.shape
    if arr.ndim <= m.axis:
        raise AlignmentError(f"tensor {m.tensor!r} has {arr.ndim} dimensions, no axis {m.axis}")
    if units == 0 or shape[m.axis] != units * m.block:
        raise AlignmentError(
            f"tensor {m.tensor!r} has {shape[m.axis]} entries on axis {m.axis}, expected {units} units x {m.block}"
        )
    split = arr.reshape((*shape[: m.axis], units, m.block, *shape[m.axis + 1 :]))
    return np.moveaxis(split, m.axis, 0)


def from_units(u: np.ndarray, m: Member, like: tuple[int, ...]) -> np.ndarray:
    moved = np.moveaxis(u, 0, m.axis)
    return moved.reshape((*like[: m.axis], u.shape[0] * m.block, *like[m.axis + 1 :]))


def _row_median(x: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Per row, the median of the entries where ``ok`` (0 for a row with none)."""
    count = ok.sum(axis=1)
    srt = np.sort(np.where(ok, x, np.inf), axis=1)
    rows, last = np.arange(len(x)), np.maximum(count - 1, 0)
    med = 0.5 * (srt[rows, last // 2] + srt[rows, last - last // 2])
    return np.where(count > 0, med, 0.0)


def _scales(s: np.ndarray, b: np.ndarray, noise: float = 0.0, limit: float = 1e30) -> np.ndarray:
    """Per row i, the positive a minimizing |s_i - a b_i|^2 over the entries a robust first fit calls inliers;
    1 when b_i carries nothing. ``s``, ``b``: (n, k) paired rows, all fitted at once.

    The first fit is the median of s / b over the larger half of b's entries (the smaller ones' ratios are
    mostly noise): spikes in up to a quarter of the entries, even 2 of a 10-entry column or one on the
    largest weight, cannot move it, where a least-squares first fit is dragged by the spikes and then trims
    the wrong entries (and a |b|-weighted median breaks when the spike sits on a weight holding half the
    row's mass). Least squares on the entries within 4 robust standard deviations of that fit refines it.

    A fit within SHADOW_SIGMAS standard errors of 1 under perturbations of RMS ``noise`` per entry (the mark itself:
    std(a) = noise / |b|) is read as 1: rescaling an intact copy by its own mark's shadow would erase a little
    of the mark, and a pirate's rescaling that small moves the row by less than the mark does.

    Entries the suspect holds at exactly 0 are erasures (pruned weights, removed units read as zeros): they
    say nothing about the scale and are left out. A fit beyond [1 / limit, limit] is left alone (1)."""
    ok = (b != 0) & (s != 0)
    count = ok.sum(axis=1)
    large = ok & (np.abs(b) >= _row_median(np.abs(b), ok)[:, None])
    a = np.where(count > 0, _row_median(np.where(large, s / np.where(ok, b, 1.0), 0.0), large), 1.0)
    r = np.abs(s - a[:, None] * b)
    med = _row_median(r, ok)
    keep = ok & (r <= 4.0 * med[:, None] / 0.6745)
    den = np.sum(np.where(keep, b * b, 0.0), axis=1)
    fit = np.divide(np.sum(np.where(keep, s * b, 0.0), axis=1), den, out=a.copy(), where=den > 0)
    shadow = SHADOW_SIGMAS * noise / np.sqrt(np.maximum(np.sum(np.where(ok, b * b, 0.0), axis=1), 1e-300))
    absurd = (fit < 1 / limit) | (fit > limit)  # a hidden unit rescaled this far breaks float32: a wrong fit
    bad = (count == 0) | ~np.isfinite(fit) | absurd | (np.abs(fit - 1.0) <= shadow)
    return np.where(bad, 1.0, fit)


def _robust_scale(s: np.ndarray, b: np.ndarray, noise: float = 0.0) -> float:
    """:func:`_scales` of one pair of rows."""
    return float(_scales(s[None, :], b[None, :], noise)[0])


@dataclass
class AlignmentReport:
    groups: int = 0
    permuted: int = 0  # units not at their base position
    rescaled: int = 0  # units whose scale differed from 1 by more than 1%
    merged: int = 0  # split units folded back
    dropped: int = 0  # extra units dropped
    missing: int = 0  # base units the suspect lacks (read as zeros)


def _stack(arrs: dict[str, np.ndarray], members: list[Member], units: int) -> np.ndarray:
    """(units, entries): the members' per-unit entries side by side."""
    if not members:
        raise AlignmentError("a unit group lacks the members this step needs (a norm group without BatchNorm "
                             "weight/bias, or no cols)")  # fmt: skip
    return np.concatenate([to_units(arrs[m.tensor], m, units).reshape(units, -1) for m in members], axis=1)


def _unit_matrices(
    s: dict[str, np.ndarray], b: dict[str, np.ndarray], members: list[Member], m: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Suspect (m, k) and base (n, k) per-unit entries of ``members``. Units compare entry by entry, so an
    axis other than the units' that differs is one no unit group maps: refused, naming the tensor."""
    su, bu = _stack(s, members, m), _stack(b, members, n)
    if su.shape[1] != bu.shape[1]:
        t = next(x.tensor for x in members if s[x.tensor].size // m != b[x.tensor].size // n)
        raise AlignmentError(
            f"tensor {t!r} has shape {list(s[t].shape)}, the base {list(b[t].shape)}, and no unit group maps the "
            "difference"
        )
    return su, bu


def _directions(rows: np.ndarray) -> np.ndarray:
    """Unit-norm rows, with every entry beyond 5x the row's k-th largest magnitude dropped first (k = 5% of
    the row, at least 2), so that neither a spiked weight in a short row (a 3x3 kernel) nor a row mostly
    pruned to zeros turns a unit away from its base unit.

    Why dropping rather than capping: a spike capped at 5 robust standard deviations still outweighs the
    other 8 entries of a 3x3 kernel. Measured with a capped spike, the unit's cosine to its own base unit
    fell to -0.02 and the matcher paired it with an added dummy unit. With the spike dropped, the unit stays
    matched to its own base unit.

    Limit: a row's spikes are dropped only while there are fewer than k of them (k spikes make the k-th
    largest a spike). With k = 2 for rows up to 40 entries, two spikes in the same short row stay: a known
    gap, stated in the README ("Alignment", known gaps).

    Scale-free: a rescaled copy drops the same entries as the base."""
    mags = np.abs(rows)
    k = max(2, math.ceil(rows.shape[1] / 20))  # one spike per short row is never the k-th largest
    cap = 5.0 * np.sort(mags, axis=1)[:, -k][:, None] if rows.shape[1] >= k else np.zeros((len(rows), 1))
    f = np.where((cap > 0) & (mags > cap), 0.0, rows)
    norm = np.linalg.norm(f, axis=1, keepdims=True)
    return np.divide(f, norm, out=np.zeros_like(f), where=norm > 0)


def _similarity(fs: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """(m, n) cosines of suspect and base directions (:func:`_directions`) over the suspect's support: a
    pruned row is compared with the base row's entries it kept, not penalized for the ones it lost (zeros
    are erasures, not information)."""
    support_norm = np.sqrt((fs != 0).astype(np.float64) @ (fb**2).T)
    return np.divide(fs @ fb.T, support_norm, out=np.zeros_like(support_norm), where=support_norm > 0)


def _incoming(g: UnitGroup) -> list[Member]:
    return g.of("rows") + g.of("bias")


def _up(g: UnitGroup) -> list[Member]:
    """What sets a unit's activation scale: its rows and bias, or the BN affine parameters after a norm."""
    return g.of("affine") if g.norm else _incoming(g)


def _fits(su: np.ndarray, bu: np.ndarray, pairs: np.ndarray, noise: float) -> np.ndarray:
    """Per base unit j, the robust scale of suspect unit pairs[j] against base unit j (1 where missing)."""
    out = np.ones(len(pairs))
    ok = pairs >= 0
    if ok.any():
        out[ok] = _scales(su[pairs[ok]], bu[np.flatnonzero(ok)], noise)
    return out


def units_of(arrs: dict[str, np.ndarray], g: UnitGroup) -> int:
    lead = g.of("rows")
    if not lead:
        raise AlignmentError(f"unit group {g.name!r} has no rows member")
    if arrs[lead[0].tensor].ndim <= lead[0].axis:
        raise AlignmentError(f"tensor {lead[0].tensor!r} has {arrs[lead[0].tensor].ndim} dimensions, no axis "
                             f"{lead[0].axis}")  # fmt: skip
    return arrs[lead[0].tensor].shape[lead[0].axis] // lead[0].block


def _apply(s: dict[str, np.ndarray], g: UnitGroup, units: int, scale: dict[str, np.ndarray]) -> None:
    """Multiply each member's units by scale[role] (roles not named are left as they are)."""
    for mem in g.members:
        if mem.role in scale:
            u = to_units(s[mem.tensor], mem, units)
            f = scale[mem.role].reshape((units,) + (1,) * (u.ndim - 1))
            s[mem.tensor] = from_units(u * f, mem, s[mem.tensor].shape)


def _align_group(
    s: dict[str, np.ndarray], b: dict[str, np.ndarray], g: UnitGroup, rep: AlignmentReport, noise: float
) -> None:
    m, n = units_of(s, g), units_of(b, g)
    srows, brows = _unit_matrices(s, b, _incoming(g), m, n)
    fs = _directions(srows)
    cos = _similarity(fs, _directions(brows))  # (m, n)
    rows_idx, cols_idx = linear_sum_assignment(-cos)
    live = fs[rows_idx].any(axis=1)  # a unit with all-zero incoming weights is one removed in place
    rows_idx, cols_idx = rows_idx[live], cols_idx[live]
    source = np.full(n, -1)  # suspect unit feeding base unit j (-1: missing)
    source[cols_idx] = rows_idx
    conv = _fits(srows, brows, source, noise)
    # the activation scale, undone on the cols; under a norm the conv scale is absorbed by the BN statistics
    alpha = _fits(*_unit_matrices(s, b, _up(g), m, n), source, noise) if g.norm else conv
    extra = np.setdiff1d(np.arange(m), rows_idx)
    merges: list[tuple[int, int, float]] = []  # (suspect unit, base unit, its scale)
    for u in extra if not g.norm else ():  # a split of a unit under BN is not a sum of two ReLU outputs
        j = int(np.argmax(cos[u]))
        # parallel to its twin in the suspect itself: the mark (and laundering) moves both halves alike,
        # while either one's cosine to the base unit is lowered by the mark (0.9987 at the default budget)
        if source[j] >= 0 and fs[u] @ fs[source[j]] >= SPLIT_COSINE:
            merges.append((int(u), j, _robust_scale(srows[u], brows[j], noise)))
    rep.groups += 1
    rep.permuted += int(np.sum((source >= 0) & (source != np.arange(n))))
    rep.rescaled += int(np.sum(np.abs(alpha - 1.0) > 0.01))
    rep.merged += len(merges)
    rep.dropped += len(extra) - len(merges)
    rep.missing += int(np.sum(source < 0))
    for mem in g.members:  # permute (merge, drop, zero-fill) into base order
        arr = s[mem.tensor]
        u = to_units(arr, mem, m)
        out = np.zeros((n, *u.shape[1:]))
        ok = source >= 0
        out[ok] = u[source[ok]]
        if mem.role == "cols":
            for unit, j, a in merges:
                out[j] += (a / alpha[j]) * u[unit]  # ReLU(a r x) = a ReLU(r x); scaled by alpha[j] below
        s[mem.tensor] = from_units(out, mem, arr.shape)
    scale = {"rows": 1 / conv, "bias": 1 / conv}
    if g.norm:
        scale |= {"mean": 1 / conv, "var": 1 / conv**2, "affine": 1 / alpha}
    _apply(s, g, n, scale | {"cols": alpha})


def _balance(s: dict[str, np.ndarray], b: dict[str, np.ndarray], g: UnitGroup, noise: float) -> None:
    """After every group is in place, undo the scale error e left on each unit: its activation side (rows, or
    BN affine) reads e x base, its cols base / e. Both fits estimate log e, with variances noise^2 / |b|^2 of
    their own entries, so they are combined by precision: a 9-entry kernel row says little, the 288 entries of
    its outgoing channel say much (an equal-weight mean left a 3x3 kernel's units off by a third of the mark).
    An estimate within SHADOW_SIGMAS standard errors of 1 is the mark's own shadow and reads as 1."""
    n = units_of(b, g)
    same = np.arange(n)
    up_s, up_b = _unit_matrices(s, b, _up(g), n, n)
    cols_s, cols_b = _unit_matrices(s, b, g.of("cols"), n, n)
    p_up, p_cols = np.sum(up_b**2, axis=1), np.sum(cols_b**2, axis=1)
    total = p_up + p_cols
    votes = p_up * np.log(_fits(up_s, up_b, same, 0.0)) - p_cols * np.log(_fits(cols_s, cols_b, same, 0.0))
    log_e = np.divide(votes, total, out=np.zeros(n), where=total > 0)
    log_e[np.abs(log_e) <= SHADOW_SIGMAS * noise / np.sqrt(np.maximum(total, 1e-300))] = 0.0
    f = np.exp(-log_e)
    up = {"affine": f} if g.norm else {"rows": f, "bias": f}
    _apply(s, g, n, up | {"cols": 1 / f})
    if g.norm:  # the conv side under BN: rows and running statistics together
        r = _fits(*_unit_matrices(s, b, _incoming(g), n, n), same, noise)
        _apply(s, g, n, {"rows": 1 / r, "bias": 1 / r, "mean": 1 / r, "var": 1 / r**2})


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
    last = groups[-1].of("cols") if groups else []
    if not last or last[0].tensor in hidden:
        return
    w = last[0].tensor
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
    missing = [n for n in base if n not in suspect]
    if missing:
        raise AlignmentError(
            f"tensor {missing[0]!r} is missing from the suspect (expected shape {list(base[missing[0]].shape)})"
        )
    kind = [n for n in base if suspect[n].is_floating_point() != base[n].is_floating_point()]
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
        _align_group(s, b, g, rep, noise)
    _output_gauge(s, b, groups, noise)  # before balancing: a logit scale must not be pushed into hidden units
    for g in groups:
        _balance(s, b, g, noise)
    out: dict[str, torch.Tensor] = {}
    for name, t in base.items():
        if name not in s:
            out[name] = suspect[name]
            continue
        if s[name].shape != tuple(t.shape):
            raise AlignmentError(
                f"tensor {name!r} has shape {list(suspect[name].shape)}, the base {list(t.shape)}, "
                "and no unit group maps it"
            )
        out[name] = torch.from_numpy(s[name]).to(t.dtype)
    return out, rep
