"""BIBD AND anti-collusion codes from projective planes PG(2, q), as DeepMarks used them.

PG(2, q) for prime q is a (v, k, 1)-BIBD with v = q^2 + q + 1 points and as many lines, k = q + 1 points a
line, and any two lines meeting in exactly one point. User j gets the complement of line j's incidence
column: x_jl = 0 when point l lies on line j. Averaging K <= k - 1 = q copies leaves +1 exactly on the points
that lie on no colluder's line, and because an innocent's line meets each colluder line in one point only,
it can never be covered: the AND detector identifies the coalition exactly.
"""

from __future__ import annotations

import itertools

import numpy as np


def is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def plane_order_for(max_colluders: int) -> int:
    """Smallest prime q with q >= max_colluders (the code resists up to k - 1 = q colluders)."""
    q = max(2, max_colluders)
    while not is_prime(q):
        q += 1
    return q


def _normalized_points(q: int) -> list[tuple[int, int, int]]:
    """Points of PG(2, q): nonzero vectors of GF(q)^3 whose first nonzero coordinate is 1."""
    pts = [(1, a, b) for a in range(q) for b in range(q)]
    pts += [(0, 1, b) for b in range(q)]
    pts.append((0, 0, 1))
    return pts


def incidence(q: int) -> np.ndarray:
    """(v, v) boolean matrix: entry [point, line] is True when the point lies on the line (dual coordinates)."""
    if not is_prime(q):
        raise ValueError(f"PG(2, q) is built here for prime q only, got {q}")
    pts = np.array(_normalized_points(q))  # lines use the same normalized coordinates
    return (pts @ pts.T) % q == 0


def code_rows(q: int) -> np.ndarray:
    """Code bits (users = lines, length = points): the complement of each line's incidence."""
    return ~incidence(q).T


def and_detector(y: np.ndarray, rows: np.ndarray, max_colluders: int) -> np.ndarray:
    """Users whose every 0-position is 0 in the thresholded AND of the (averaged, +-1) observation y.

    A position is read as 1 when y_l > 1 - 1/c_max: averaging K <= c_max rows gives exactly 1 where all
    colluders hold 1 and at most 1 - 2/K elsewhere.
    """
    anded = np.asarray(y) > 1.0 - 1.0 / max_colluders  # (L,)
    zeros_covered = ~(~rows & anded)  # a user's 0-position must be 0 in the AND
    return np.flatnonzero(zeros_covered.all(axis=-1))


def soft_scores(y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Soft detector: the mean 'zero-ness' (1 - y_l)/2 over each user's own line (its 0-positions).

    Under averaging by K colluders the zero-ness at a point is the share of colluders whose line holds it, so
    an innocent line (meeting each colluder line once) scores exactly 1/k, and a colluder scores
    (k + K - 1)/(k K). Averaging over k positions makes this far steadier under noise than the hard AND.
    """
    zero = (1.0 - np.asarray(y, dtype=np.float64)) / 2.0
    line = ~rows  # (n, L)
    return (line @ zero) / line.sum(axis=1)


def soft_threshold(q: int, max_colluders: int) -> float:
    """Midway between an innocent's score 1/k and the lowest colluder score (k + c - 1)/(k c)."""
    k = q + 1
    return 0.5 * (1.0 / k + (k + max_colluders - 1) / (k * max_colluders))


def all_coalitions(users: int, size: int) -> np.ndarray:
    """Every coalition of ``size`` users as an (N, size) index array (for exhaustive checks)."""
    return np.array(list(itertools.combinations(range(users), size)), dtype=np.int64)
