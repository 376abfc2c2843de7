"""The collusion channel in the code domain: what c colluders can make of their +-1 code rows.

Discrete attacks obey the marking assumption (a position where all colluders agree is passed on unchanged);
averaging is the linear attack on real-valued fingerprints. Gaussian noise of std ``noise`` may follow any of
them. ``rng`` is an explicit generator: these are simulations, never secrets.
"""

from __future__ import annotations

import numpy as np

ATTACKS = ("average", "majority", "minority", "interleave", "coin-flip", "all-1", "all-0")


def _coin(rng: np.random.Generator, shape: int | tuple[int, ...]) -> np.ndarray:
    return np.where(rng.random(shape) < 0.5, -1.0, 1.0)


def collude(rows: np.ndarray, attack: str, rng: np.random.Generator, noise: float = 0.0) -> np.ndarray:
    """Combine the coalition's +-1 rows (c, L) into one observation y (L,)."""
    rows = np.asarray(rows, dtype=np.float64)
    c, length = rows.shape
    total = rows.sum(axis=0)  # (L,)
    detectable = np.abs(total) < c  # the colluders disagree here
    if attack == "average":
        y = total / c
    elif attack == "interleave":
        y = rows[rng.integers(0, c, size=length), np.arange(length)]
    else:
        y = np.sign(total)  # where all agree this is the shared symbol
        if attack == "majority":
            y = np.where(total == 0, _coin(rng, length), y)
        elif attack == "minority":
            y = np.where(total == 0, _coin(rng, length), -y)
            y = np.where(detectable, y, np.sign(total))
        elif attack == "coin-flip":
            y = np.where(detectable, _coin(rng, length), y)
        elif attack == "all-1":
            y = np.where(detectable, 1.0, y)
        elif attack == "all-0":
            y = np.where(detectable, -1.0, y)
        else:
            raise ValueError(f"unknown collusion attack {attack!r}; choose one of {', '.join(ATTACKS)}")
    if noise > 0:
        y = y + noise * rng.standard_normal(length)
    return y
