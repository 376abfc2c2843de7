"""Reading a suspect's projection p = X v against a run's bases: the base, or the affine combination of a
few bases, that leaves the least energy.

A federation issues copies of every round's model, so a copy is read against the base it was made from: the
residual (p - h_r) / s_r then holds the mark and the pirate's changes only (h_r = X w_r, s_r its strength).
A customer who averages its own copies of rounds 1 and 100 holds (w_1 + w_100)/2 plus its mark: no single
base fits it, and half the training drift between the two would stay in the reading. So the reading is the
best affine combination h = sum a_j h_j (sum a_j = 1) of at most :data:`MOST` bases, chosen greedily: the
least-energy single base first, then the base whose addition lowers the energy most, while it lowers it by
at least :data:`GAIN` (and more than the best of R bases lowers it by chance on L coordinates, about
2 ln R / L). The weights are fitted by least squares on the coordinates the current reading does not
saturate as outliers (tracing.bound), so a pirate's spikes cannot pull them; a weight is held within
:data:`WEIGHTS`.

Why the weights are bounded: a round's model is trained from marked copies, so a base carries a trace of the
code rows of the customers who trained it (small: the update a marked copy trains is a little different
from an unmarked one's; the clients send the difference to the copy they received, so the mark itself
cancels). Read against the base a copy was made from, that trace cancels exactly; read against another base,
a trace of other customers' rows stays in the observation at its own small size. A combination with large
weights of opposite signs (an ill-conditioned fit of bases that differ by little) would multiply it, and
would eat the mark's own energy: in a test federation whose rounds barely moved, weights of -44, 28 and 17
accused two innocents. Within [-0.5, 1.5] the trace is at most 2.5 times what a single base leaves, and a
pirate's mixtures of its own rounds (convex, or extrapolating by half a step) are read. A reading that is
still rough (RMS above :data:`ROUGH`) then tries its main base and one other with free weights: a pirate
that extrapolates further, (1 + K) w_R - K w_r, keeps its accuracy for K up to 50 (an attack pass), and
there the drift it leaves is far above the mark, so a fit removes drift, not mark.

Why the bound still holds: every choice here (bases, weights, outlier mask) is a function of the suspect and
the bases alone, never of a code row. An innocent's row is independent of both, hence of the observation,
and the threshold certified for that observation holds unchanged (no multiple-testing correction). What a
fit costs the mark: the part of the mark inside the span of the bases chosen, about k/L of its energy for k
bases (code rows are independent of the models): measured in the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from securemark.tracing.bound import CLIP_SIGMAS, Observation, robust_observation

MOST = 3  # bases in one reading
GAIN = 0.01  # a base joins the reading only if it lowers the energy by at least this share (see _gain)
WEIGHTS = (-0.5, 1.5)  # the range of a weight in a combination (see the module docstring)
SCREEN = 4  # bases fitted in full per step, after a least-squares screen of every base
ROUGH = 1.5  # a reading whose RMS is above this (an intact copy's is 1) fits the bases badly: see read_bases


@dataclass(frozen=True)
class Reading:
    obs: Observation  # the robust observation y the scores are computed from
    parts: tuple[tuple[int, float], ...]  # (base index, weight); weights sum to 1, the main base first
    energy: float  # ||y||^2 of the observation


def read_bases(p: np.ndarray, refs: np.ndarray, strengths: np.ndarray, most: int = MOST, gain: float = GAIN) -> Reading:
    """The least-energy reading of projection ``p`` (L,) against bases ``refs`` (R, L) of ``strengths`` (R,):
    one base, or an affine combination of up to ``most`` (see the module docstring). Ties go to the later
    base (the current one is last)."""
    best: Reading | None = None
    for i in reversed(range(len(refs))):
        obs = robust_observation((p - refs[i]) / strengths[i])
        energy = float(obs.y @ obs.y)
        if best is None or energy < best.energy:
            best = Reading(obs, ((i, 1.0),), energy)
    if best is None:
        raise ValueError("no base to read against")
    seen = set()
    needed = _gain(gain, len(refs), len(p))
    while len(best.parts) < most and best.energy > 0 and frozenset(i for i, _ in best.parts) not in seen:
        seen.add(frozenset(i for i, _ in best.parts))
        wider = _widened(p, refs, strengths, best)
        if wider is None or wider.energy > (1 - needed) * best.energy:
            break
        best = _pruned(p, refs, strengths, wider, needed)
    best = _swapped(p, refs, strengths, best) if len(best.parts) > 1 else best
    return _extrapolated(p, refs, strengths, best) if best.energy > ROUGH**2 * len(p) else best


def _extrapolated(p: np.ndarray, refs: np.ndarray, strengths: np.ndarray, current: Reading) -> Reading:
    """For a rough reading only: the main base and one other with free weights, if that reads lower. A pirate
    who extrapolates between its own copies, (1 + K) w_R - K w_r, keeps its accuracy for K up to 50 and fits
    nothing within :data:`WEIGHTS`. Free weights are not used on a reading that is not rough: there they
    could only fit the mark itself and the faint code traces in the bases (module docstring)."""
    main = current.parts[0][0]
    inliers = _inliers(p, refs, strengths, current)
    fits = (
        _fit(p, refs, strengths, [main, j], inliers, free=True) for j in _screened(p, refs, [main], inliers, [main])
    )
    best = min((f for f in fits if f is not None), key=lambda f: f.energy, default=None)
    return best if best is not None and best.energy < current.energy else current


def _swapped(p: np.ndarray, refs: np.ndarray, strengths: np.ndarray, current: Reading) -> Reading:
    """``current`` with one base at a time swapped for another while that lowers the energy: the greedy
    order can settle on a base that only stood in for two others (at most :data:`MOST` passes)."""
    for _ in range(MOST):
        chosen = [i for i, _ in current.parts]
        inliers = _inliers(p, refs, strengths, current)
        fits = []
        for k in range(len(chosen)):
            rest = chosen[:k] + chosen[k + 1 :]
            fits += [_fit(p, refs, strengths, [*rest, j], inliers) for j in _screened(p, refs, rest, inliers, chosen)]
        better = min((f for f in fits if f is not None), key=lambda f: f.energy, default=None)
        if better is None or better.energy >= current.energy:
            break
        current = better
    return current


def _screened(p: np.ndarray, refs: np.ndarray, kept: list[int], inliers: np.ndarray, taken: list[int]) -> list[int]:
    """The :data:`SCREEN` bases (none of ``taken``) whose addition to the affine span of bases ``kept`` lowers
    the least-squares residual of ``p`` on ``inliers`` most, unbounded: which candidates are worth a full fit
    (the later base first on ties). One product of every base with the residual, not a fit per base."""
    origin = refs[kept[0]]
    residual = (p - origin)[inliers]
    others = (refs - origin)[:, inliers]  # (R, n)
    if len(kept) > 1:
        q, _ = np.linalg.qr(others[kept[1:]].T)  # (n, k - 1): the span the reading already has
        residual = residual - q @ (q.T @ residual)
        others = others - (others @ q) @ q.T
    norms = np.einsum("ij,ij->i", others, others)
    gains = np.where(norms > 0, (others @ residual) ** 2 / np.where(norms > 0, norms, 1), -1.0)
    gains[taken] = -np.inf
    order = len(refs) - 1 - np.argsort(-gains[::-1], kind="stable")  # the later base first among equals
    return [int(j) for j in order[:SCREEN] if np.isfinite(gains[j])]


def _gain(gain: float, bases: int, length: int) -> float:
    """The share of energy a base must remove to join: ``gain``, and four times what the best of ``bases``
    random directions removes from noise on ``length`` coordinates by chance (2 ln R / L): an intact copy is
    read against its own base alone."""
    return max(gain, 8 * math.log(max(bases, 2)) / length)


def _inliers(p: np.ndarray, refs: np.ndarray, strengths: np.ndarray, current: Reading) -> np.ndarray:
    """The coordinates ``current`` does not saturate as outliers: the only ones a wider fit is solved on."""
    idx = [i for i, _ in current.parts]
    w = np.array([w for _, w in current.parts])
    cap = max(1.0, CLIP_SIGMAS * current.obs.scale) * float(w @ strengths[idx])
    return np.abs(p - w @ refs[idx]) <= cap


def _fit(
    p: np.ndarray, refs: np.ndarray, strengths: np.ndarray, idx: list[int], inliers: np.ndarray, free: bool = False
) -> Reading | None:
    """The affine combination of bases ``idx`` closest to ``p`` on ``inliers`` (least squares, weights
    within :data:`WEIGHTS` unless ``free``: the weights a free fit puts outside are held at the nearer bound
    and the others fitted again), read; None when no such combination exists or its strengths cancel."""
    w = _weights(p, refs, idx, inliers, {})
    if w is not None and not free and (np.any(w < WEIGHTS[0]) or np.any(w > WEIGHTS[1])):
        held = {i: float(np.clip(x, *WEIGHTS)) for i, x in enumerate(w) if not WEIGHTS[0] <= x <= WEIGHTS[1]}
        w = _weights(p, refs, idx, inliers, held)
    if w is None or not np.all(np.isfinite(w)):
        return None
    if not free and (np.any(w < WEIGHTS[0] - 1e-9) or np.any(w > WEIGHTS[1] + 1e-9)):
        return None
    s = float(w @ strengths[idx])
    if not s > 0:
        return None
    obs = robust_observation((p - w @ refs[idx]) / s)
    parts = sorted(zip(idx, w.tolist(), strict=True), key=lambda iw: -abs(iw[1]))  # the heaviest base first
    return Reading(obs, tuple(parts), float(obs.y @ obs.y))


def _weights(
    p: np.ndarray, refs: np.ndarray, idx: list[int], inliers: np.ndarray, held: dict[int, float]
) -> np.ndarray | None:
    """Least-squares weights (summing to 1) of bases ``idx`` for ``p`` on ``inliers``, those at the positions
    in ``held`` fixed to the values given; None when nothing is left free."""
    free = [k for k in range(len(idx)) if k not in held]
    if not free:
        return None
    first, rest = free[0], free[1:]
    fixed = sum(held.values())
    target = p - sum(v * refs[idx[k]] for k, v in held.items()) - (1 - fixed) * refs[idx[first]]
    d = (refs[[idx[k] for k in rest]] - refs[idx[first]]).T  # (L, free - 1): directions away from the first
    beta = np.linalg.lstsq(d[inliers], target[inliers], rcond=None)[0] if rest else np.zeros(0)
    w = np.empty(len(idx))
    for k, v in held.items():
        w[k] = v
    w[first] = 1 - fixed - beta.sum()
    w[rest] = beta
    return w


def _widened(p: np.ndarray, refs: np.ndarray, strengths: np.ndarray, current: Reading) -> Reading | None:
    """The best reading with one more base than ``current`` (the later base wins ties), or None."""
    chosen = [i for i, _ in current.parts]
    inliers = _inliers(p, refs, strengths, current)
    fits = (_fit(p, refs, strengths, [*chosen, j], inliers) for j in _screened(p, refs, chosen, inliers, chosen))
    return min((f for f in fits if f is not None), key=lambda f: f.energy, default=None)


def _pruned(p: np.ndarray, refs: np.ndarray, strengths: np.ndarray, current: Reading, gain: float) -> Reading:
    """``current`` without the bases it does not need: one whose removal raises the energy by less than
    ``gain`` would not have been added (a greedy first choice that the later ones made redundant)."""
    while len(current.parts) > 2:
        chosen = [i for i, _ in current.parts]
        inliers = _inliers(p, refs, strengths, current)
        fits = (_fit(p, refs, strengths, [i for i in chosen if i != drop], inliers) for drop in chosen)
        smaller = min((f for f in fits if f is not None), key=lambda f: f.energy, default=None)
        if smaller is None or (1 - gain) * smaller.energy > current.energy:
            break
        current = smaller
    return current
