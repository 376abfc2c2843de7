"""Tardos codes with the arcsine bias and the symmetric soft score (Skoric et al.).

Pure functions of uniforms: the caller draws them from a seeded ``np.random.Generator`` (simulation) or from
the owner's ChaCha20 keystream (issued codes), so nothing here decides where randomness comes from.
"""

from __future__ import annotations

import math

import numpy as np


def cutoff(max_colluders: int) -> float:
    """Bias cutoff t = 1/(300 c_max): biases live in [t, 1 - t]."""
    if max_colluders < 1:
        raise ValueError(f"max_colluders must be >= 1, got {max_colluders}")
    return 1.0 / (300.0 * max_colluders)


def arcsine_bias(u: np.ndarray, max_colluders: int) -> np.ndarray:
    """Map uniforms u in [0, 1) to biases p = sin^2(r), r uniform on [t', pi/2 - t'], t' = arcsin(sqrt(t)).

    That is the arcsine density 1/(pi sqrt(p(1-p))) restricted to [t, 1 - t].
    """
    t_prime = math.asin(math.sqrt(cutoff(max_colluders)))
    r = t_prime + np.asarray(u, dtype=np.float64) * (math.pi / 2 - 2 * t_prime)
    return np.sin(r) ** 2


def draw_rows(bias: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Code bits x_jl = [u_jl < p_l] for uniforms u of shape (n, L): each symbol is 1 with probability p_l."""
    return np.asarray(u) < bias


def score_weights(y: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, float]:
    """Rewrite the symmetric soft score S_j = sum_l y_l (x_jl - p_l)/sqrt(p_l(1-p_l)) as x_j . w - offset.

    Scoring many users is then one product of their packed bits with ``w``: w_l = y_l / sqrt(p_l(1-p_l))
    and offset = sum_l p_l w_l.
    """
    w = np.asarray(y, dtype=np.float64) / np.sqrt(bias * (1.0 - bias))
    return w, float(np.dot(bias, w))


def soft_scores_reference(rows: np.ndarray, y: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Slow, obvious S_j for bits ``rows`` (n, L); the fast packed path is checked against this."""
    g = (rows.astype(np.float64) - bias) / np.sqrt(bias * (1.0 - bias))  # (n, L)
    return g @ np.asarray(y, dtype=np.float64)


def length_for(customers: int, max_colluders: int, eps: float) -> int:
    """The code length the symmetric Tardos code needs to catch a coalition of ``max_colluders`` among
    ``customers`` with P(any innocent accused) <= eps (Skoric et al. 2008): L >= pi^2/2 c^2 ln(n/eps)."""
    if customers < 1 or max_colluders < 1 or not 0 < eps < 1:
        raise ValueError("need customers >= 1, max_colluders >= 1 and 0 < eps < 1")
    return math.ceil(math.pi**2 / 2 * max_colluders**2 * math.log(customers / eps))


def customers_for(length: int, max_colluders: int, eps: float) -> int:
    """The most customers a code of ``length`` serves by that rule, n <= eps e^(2L/(pi^2 c^2)) (0: none)."""
    if length < 1 or max_colluders < 1 or not 0 < eps < 1:
        raise ValueError("need length >= 1, max_colluders >= 1 and 0 < eps < 1")
    exponent = 2 * length / (math.pi**2 * max_colluders**2)
    return int(min(eps * math.exp(min(exponent, 700.0)), 2**62))
