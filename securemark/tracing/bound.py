"""A false-accusation bound that holds for every observation y, and a robust reading of y.

An innocent's code bits are drawn independently of the pirate copy, so given the observation y its soft score
S = sum_l w_l (x_l - p_l), w_l = y_l / sqrt(p_l (1 - p_l)), x_l ~ Bernoulli(p_l) independent, has an exactly
known law. The first tracer compared S / ||y|| with a Gaussian quantile; that is a bound only while no few
terms dominate. One spiked weight makes y one huge coordinate, S collapses to a two-point variable, and the
Gaussian threshold accused innocents in 27 of 200 trials at eps = 1e-3. Here the threshold comes from the
law itself, per suspect:

* **Chernoff.** With the cumulant generating function K(lam) = log E e^{lam S} (exact: a sum of L two-point
  terms), P(S >= tau) <= exp(K(lam) - lam tau) for every lam > 0. At the saddle point K'(lam) = tau.
* **Berry-Esseen correction of the tilted law** (strict, not asymptotic). Writing P(S >= tau) =
  e^{K - lam tau} E_lam[e^{-lam Z} 1{Z >= 0}], Z = S - tau under the exponentially tilted law, which has mean 0
  and variance sigma^2 = K''(lam) at the saddle point. Integrating by parts, E_lam[...] <= psi(lam sigma) +
  2 Delta, where psi(a) = e^{a^2/2} P(N(0,1) > a) is the Gaussian value and Delta <= C0 rho / sigma^3 is the
  Berry-Esseen distance of the tilted sum (C0 = 0.5600 for non-identical summands, Shevtsova 2010). The
  factor is also <= P(Z >= 0) <= 1/2 + Delta and <= 1. For a long, spread-out y it is ~1/(lam sigma sqrt(2 pi))
  and the threshold lands within ~2% of the Gaussian z; for a spike Delta is large, the factor is 1, and the
  plain Chernoff bound (which then equals the exact two-point tail) decides.

Accusing j when S_j > tau with bound(tau) <= eps / n keeps P(any innocent accused) <= eps by the union bound,
for any y whatsoever: adversarial, heavy-tailed, spiked or all zero.

The bound protects innocents; it does nothing for catching. A spike also inflates the threshold until the real
signal is lost below it, so the observation is read robustly first: coordinates beyond max(1, ``clip`` robust
standard deviations (median |y| / 0.6745)) are saturated. The floor 1 is the largest value any copy or merge
of copies shows (+-1 rows and their convex combinations): the signal itself is never clipped, only noise and
spikes beyond it. ``clip`` = 2 is Huber's 95%-efficient point for Gaussian noise (1.345 sigma of the noise
sits at ~2 sigma of the signal-plus-noise that y is); at 3, one clipped spike at a rare-symbol position
(bias p ~ 1e-3, weight sqrt((1 - p) / p) ~ 30) still lifted a short code's certified threshold past an intact
leaker's score (2 in 600 obfuscated leaks at L = 256). Clipping is a function of y alone, so the bound still
holds for the clipped observation.

The observation is then **centred on the code's expected row**. Any merge of c colluders' rows that decides
each position from their bits there (average, median, interleave, extremes, majority) has, at bias p,
expectation f(p) = sum over bit patterns of (merge value) p^k (1 - p)^(c - k): a polynomial of degree <= c in
p, the same at every position of equal bias. That part of y is the code's expected row, not any colluder's:
it meets an innocent's row at sum_l f(p_l) (x_l - p_l) / sqrt(p_l (1 - p_l)), which for one fixed code is an
offset of that customer's own, the same in every trace (measured on one registry's code: offsets spread
with standard deviation 0.81 of the innocents' unit spread, and one customer at +3.06 was accused in 12 of
7,600 traces). :func:`centred` removes y's least-squares fit by polynomials of degree ``c_max`` in p (at
every position, zeros included: see there), so every coalition up to the code's c_max leaves no expected
row, and a larger one little. The fit is a function of y and the bias alone, so an innocent's row is still
independent of the centred observation and the bound above holds for it unchanged. It costs the colluders
degree + 1 of the L dimensions (9 of 4,096 at c_max = 8) and removes roughly half of y's energy (the arcsine
bias puts most positions near 0 or 1, where 2p - 1 is near +-1). What is left weighs the positions where a
colluder holds the rare symbol, so the innocent law's tail is heavier and the normalized threshold rises
(4.4-4.7 to 4.9-5.6 at n = 1,000, L = 2048, c = 5); colluders' normalized scores rise by more under most
merges (the weakest of 2 averaging colluders 20.7 to 28.7 at L = 4096, noise 0.5; all five of a majority
coalition named in every trial against 0.68), less under the minority merge, which keeps catching but names
fewer (docs/explanations/codes-and-bound.md; tests/tracing/test_centred.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.special import erfcx, expit, log_expit

BERRY_ESSEEN_C0 = 0.5600  # Shevtsova (2010), independent non-identically distributed summands
CLIP_SIGMAS = 2.0
MAX_OBSERVATION = 1e100  # squares and tilts of larger values overflow float64; no honest reading comes near
_MAD_TO_SIGMA = 0.6744897501960817  # median |N(0,1)|


@dataclass(frozen=True)
class Law:
    """The exact law of an innocent's score S = sum_l w_l (x_l - p_l) given the observation."""

    w: np.ndarray  # (L,) weights y_l / sqrt(p_l (1 - p_l)), terms with w_l = 0 dropped
    p: np.ndarray  # (L,) bias of each term

    @classmethod
    def of(cls, y: np.ndarray, bias: np.ndarray) -> Law:
        y = np.asarray(y, dtype=np.float64)
        bias = np.asarray(bias, dtype=np.float64)
        if y.shape != bias.shape:
            raise ValueError(f"observation has shape {y.shape}, bias {bias.shape}")
        if not np.all(np.isfinite(y)):
            raise ValueError("the observation holds non-finite values")
        top = float(np.max(np.abs(y), initial=0.0))
        if top > MAX_OBSERVATION:
            raise ValueError(f"the observation holds values beyond {MAX_OBSERVATION:g}: no verdict (absurd input)")
        keep = (y != 0) if top >= 1.0 / MAX_OBSERVATION else np.zeros(y.shape, bool)
        return cls(y[keep] / np.sqrt(bias[keep] * (1.0 - bias[keep])), bias[keep])

    @cached_property
    def std(self) -> float:
        """sqrt(Var S) = ||y||."""
        return float(np.sqrt(np.sum(self.w**2 * self.p * (1 - self.p))))

    @cached_property
    def maximum(self) -> float:
        """The largest value S can take: P(S > maximum) = 0."""
        return float(np.sum(np.maximum(self.w * (1 - self.p), -self.w * self.p)))

    @cached_property
    def _logit(self) -> np.ndarray:
        return np.log(self.p) - np.log1p(-self.p)

    def _tilt(self, lam: float) -> tuple[float, float, float, float]:
        """K(lam), K'(lam), K''(lam) and the tilted third absolute central moment sum rho(lam)."""
        w, p = self.w, self.p
        t = self._logit + lam * w
        q = expit(t)  # tilted P(x_l = 1)
        # K_l = log(p e^{lam w (1-p)} + (1-p) e^{-lam w p}) = log(1-p) - lam w p + log(1 + e^{t}), computed stably
        k = float(np.sum(np.log1p(-p) - lam * w * p - log_expit(-t)))
        v = q * (1 - q)
        rho = float(np.sum(np.abs(w) ** 3 * v * (q**2 + (1 - q) ** 2)))
        return k, float(np.sum(w * (q - p))), float(np.sum(w**2 * v)), rho

    def _first(self, reached: Callable[[float], bool]) -> tuple[float, float] | None:
        """(lo, hi) around the smallest lam > 0 where ``reached`` turns true (it is monotone in lam): doubling
        from 1 / std, then bisection to 1e-9. None when every tilted bit saturates first (lam max|w| > 1e4)."""
        lo, hi = 0.0, 1.0 / self.std
        if not 0.0 < hi < math.inf:  # Law.of refuses observations this large or small; never loop on them
            raise ValueError(f"observation norm {self.std:g} is out of range for the bound")
        while not reached(hi):
            lo, hi = hi, 2.0 * hi
            if hi * float(np.max(np.abs(self.w))) > 1e4:
                return None
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if reached(mid) else (mid, hi)
            if hi - lo <= 1e-9 * hi:
                break
        return lo, hi

    def log_bound_at(self, lam: float) -> tuple[float, float]:
        """(tau, log of an upper bound on P(S >= tau)) at the saddle point tau = K'(lam), lam > 0."""
        k, k1, k2, rho = self._tilt(lam)
        if k2 <= 0:  # every term saturated: S = maximum almost surely under the tilt
            return k1, k - lam * k1
        sigma = math.sqrt(k2)
        delta = BERRY_ESSEEN_C0 * rho / sigma**3 if sigma**3 > 0 else math.inf
        gaussian = 0.5 * float(erfcx(lam * sigma / math.sqrt(2.0)))  # e^{a^2/2} P(N > a), a = lam sigma
        factor = min(1.0, 0.5 + delta, gaussian + 2.0 * delta)
        return k1, k - lam * k1 + math.log(factor)

    def certify(self, alpha: float) -> tuple[float, float]:
        """(tau, bound): a score tau with P(S > tau) <= bound <= alpha, the smallest tau this bound certifies
        (bisection on lam).

        Falls back to :attr:`maximum` (P(S > maximum) = 0) when no saddle point certifies alpha, as for a lone
        spike at a position whose bias exceeds alpha.
        """
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
        if len(self.w) == 0:
            return 0.0, 0.0
        target = math.log(alpha)
        found = self._first(lambda lam: self.log_bound_at(lam)[1] <= target)
        if found is None:
            return self.maximum, 0.0
        tau, log_bound = self.log_bound_at(found[1])
        return (tau, math.exp(log_bound)) if tau < self.maximum else (self.maximum, 0.0)

    def threshold(self, alpha: float) -> float:
        """The score of :meth:`certify`: P(S > threshold) <= alpha."""
        return self.certify(alpha)[0]

    def tail_bound(self, score: float) -> float:
        """An upper bound on P(S >= score): a conservative p-value for one customer's score."""
        if len(self.w) == 0 or score <= 0:
            return 1.0
        if score > self.maximum + 1e-9 * float(np.sum(np.abs(self.w))):  # beyond rounding: impossible
            return 0.0
        score = min(score, self.maximum)  # a tie at the maximum, summed in another order, is a tie
        found = self._first(lambda lam: self._tilt(lam)[1] >= score)  # K' rises from 0 to the maximum
        if found is None:  # saturated: the bound at the largest lam tried, whose saddle point is below score
            lam = 1e4 / float(np.max(np.abs(self.w)))
            return min(1.0, math.exp(self.log_bound_at(lam)[1]))
        return min(1.0, math.exp(self.log_bound_at(found[0])[1]))  # K'(lo) <= score: a bound at a lower tau


@dataclass(frozen=True)
class Observation:
    """A soft code read robustly: the clipped observation and what clipping did."""

    y: np.ndarray  # (L,) clipped
    scale: float  # robust standard deviation of the raw y
    clipped: int  # coordinates saturated


def robust_observation(y: np.ndarray, clip: float = CLIP_SIGMAS) -> Observation:
    """Saturate coordinates beyond max(1, ``clip`` robust standard deviations) (see the module docstring).

    The scale is median |y| / 0.6745 (consistent for Gaussian noise); when more than half of y is exactly 0
    the nonzero coordinates give it. A non-finite coordinate is an error, never a verdict.
    """
    y = np.asarray(y, dtype=np.float64)
    if not np.all(np.isfinite(y)):
        raise ValueError("the extracted code holds non-finite values")
    mags = np.abs(y)
    nonzero = mags[mags > 0]
    if len(nonzero) == 0:
        return Observation(y.copy(), 0.0, 0)
    med = float(np.median(mags))
    scale = (med if med > 0 else float(np.median(nonzero))) / _MAD_TO_SIGMA
    cap = max(1.0, clip * scale)
    return Observation(np.clip(y, -cap, cap), scale, int(np.sum(mags > cap)))


def centred(y: np.ndarray, bias: np.ndarray, degree: int) -> np.ndarray:
    """``y`` less its least-squares fit by polynomials of degree ``degree`` in the bias (see the module
    docstring), fitted and removed at every position, zeros included.

    A zero is a reading too: colluders who erase every position where their copies differ (pruning the
    weights there, read as erasures) leave y = 0 exactly where the rare symbol of one of them sits. A fit on
    the nonzero positions alone would remove nearly all of what they kept (their shared symbol is almost a
    function of p) and let every one of them escape; fitted over all positions, the centred zeros point at
    the colluders who hold the rare symbol there. The degree is capped at L / 16 - 1.
    """
    y = np.asarray(y, dtype=np.float64)
    bias = np.asarray(bias, dtype=np.float64)
    if y.shape != bias.shape or y.ndim != 1:
        raise ValueError(f"observation has shape {y.shape}, bias {bias.shape}: need two equal 1-d shapes")
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    degree = min(degree, len(y) // 16 - 1)
    if degree < 0 or not np.any(y):
        return y.copy()
    # Chebyshev polynomials are orthogonal under the arcsine law, which is the law of 2p - 1 for Tardos biases:
    # the normal equations are near-diagonal and cost two products with the (L x degree + 1) basis
    basis = np.polynomial.chebyshev.chebvander(2.0 * bias - 1.0, degree)
    vals, vecs = np.linalg.eigh(basis.T @ basis)
    keep = vals > vals[-1] * 1e-12  # a constant bias (random codes) spans one direction only
    coef = vecs[:, keep] @ ((vecs[:, keep].T @ (basis.T @ y)) / vals[keep])
    return y - basis @ coef
