"""The positive scale that maps a suspect unit's entries onto its base unit's, as pure numpy on per-unit rows:
a robust first fit, trimmed least squares, and the mark's own shadow read as 1. fingerprint.align undoes the
scales these fits find.
"""

from __future__ import annotations

import numpy as np

# A fit within this many standard errors of 1 (under the mark's own perturbation) is the mark's shadow, read as
# 1. The fits are many (every unit, twice), so the rule must be per-trace, not per-fit: 4 sigmas (6e-5 a fit)
# rescaled one unit of an intact copy in 1.7% of traces; 6 sigmas is 2e-9 a fit, ~2e-5 for a 10^4-unit model.
SHADOW_SIGMAS = 6.0


def _row_median(x: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Per row, the median of the entries where ``ok`` (0 for a row with none)."""
    count = ok.sum(axis=1)
    if x.shape[1] == 0:  # rows of no entries (a group with no readers): no median
        return np.zeros(len(x))
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


def _fits(su: np.ndarray, bu: np.ndarray, pairs: np.ndarray, noise: float) -> np.ndarray:
    """Per base unit j, the robust scale of suspect unit pairs[j] against base unit j (1 where missing)."""
    out = np.ones(len(pairs))
    ok = pairs >= 0
    if ok.any():
        out[ok] = _scales(su[pairs[ok]], bu[np.flatnonzero(ok)], noise)
    return out
