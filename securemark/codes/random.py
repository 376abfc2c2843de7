"""Random +-1 code rows: the baseline with every bias at 1/2.

With p = 1/2 the Tardos soft score reduces to the plain correlation sum_l y_l b_jl, so the same scorer and
threshold serve. Such codes do well under averaging but fail under the minority attack (tests show it).
"""

from __future__ import annotations

import numpy as np


def uniform_bias(length: int) -> np.ndarray:
    """The bias vector of a random code: 1/2 at every position."""
    return np.full(length, 0.5)
