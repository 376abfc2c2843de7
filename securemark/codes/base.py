"""Shared pieces of every code: bit packing, the Gaussian accusation threshold and p-values.

Bits are stored as {0, 1} (``x``); the embedded symbol is the antipodal value ``b = 2x - 1``.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

CODE_KINDS = ("tardos", "random", "bibd")


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack a (..., L) boolean array into (..., ceil(L/8)) uint8, big-endian within each byte."""
    return np.packbits(np.asarray(bits, dtype=bool), axis=-1)


def unpack_bits(packed: np.ndarray, length: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` for code length ``length``."""
    return np.unpackbits(packed, axis=-1, count=length).astype(bool)


def accusation_threshold(users: int, eps: float) -> float:
    """z = Phi^-1(1 - eps/users): accusing when a normalized score exceeds z keeps P(any innocent) <= eps.

    Each innocent's normalized score is (close to) standard normal, so by the union bound over ``users``
    innocents the chance of accusing any of them is at most eps.
    """
    if users < 1:
        raise ValueError(f"users must be >= 1, got {users}")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1), got {eps}")
    return -NormalDist().inv_cdf(eps / users)  # -Phi^-1(eps/n) keeps precision for tiny eps/n


def gaussian_sf(z: np.ndarray | float) -> np.ndarray:
    """Upper tail P(N(0,1) > z), accurate far into the tail (via erfc)."""
    erfc = np.vectorize(math.erfc, otypes=[np.float64])
    return 0.5 * erfc(np.asarray(z, dtype=np.float64) / math.sqrt(2.0))
