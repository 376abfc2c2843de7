"""Which suspect unit is which base unit, as pure numpy on per-unit rows: each unit's direction (spikes
dropped, norm 1) and the cosines between suspect and base directions over the suspect's support. The
assignment on these cosines, and what is done with it, is fingerprint.align's.
"""

from __future__ import annotations

import math

import numpy as np


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
    gap, stated in docs/explanations/alignment.md (known gaps).

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
