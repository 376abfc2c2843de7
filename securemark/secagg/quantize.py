"""Fixed-point encoding of weighted updates so that integers mod 2^k sum exactly to the weighted sum.

A client with n_i examples and update x_i (floats) sends the integer vector

    [ n_i * q(x_i) (D values),  n_i,  clipped_i ]        q(x) = round_stochastic((clip(x) + c) / step)

with step = 2c / (2^bits - 1), so every q lies in [0, 2^bits - 1]. The unmasked sum gives
sum n_i q(x_i), sum n_i and sum clipped_i; the weighted mean of the quantized values is
sum n_i q_i / sum n_i * step - c (the affine map commutes with a weighted mean). The server never learns an
individual n_i or clip count. The modulus 2^32 or 2^64 is the smallest for which no slot can wrap: a value slot
sums at most clients x max_weight x (2^bits - 1), the weight slot clients x max_weight, the clipped slot
clients x D. ``decode`` refuses a sum that honest clients cannot produce (a weight below the number of
contributors or above their maximum, a value above weight x (2^bits - 1), more clipped values than exist).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from securemark.errors import SecureMarkError

EXTRA_SLOTS = 2  # weight, clipped count


class QuantizationError(SecureMarkError, ValueError):
    """An update cannot be encoded: non-finite values, a weight out of range, a wrong size."""


@dataclass(frozen=True)
class QuantConfig:
    clip: float = 1.0  # values are clipped to [-clip, clip]
    bits: int = 16
    max_weight: int = 1 << 16  # largest number of examples one client may declare
    max_clients: int = 1024
    size: int = 1 << 20  # D: the longest update (it bounds the clipped-count slot)

    def __post_init__(self) -> None:
        if not self.clip > 0 or not 1 <= self.bits <= 30 or self.max_weight < 1 or self.max_clients < 1:
            raise QuantizationError("need clip > 0, 1 <= bits <= 30, max_weight >= 1 and max_clients >= 1")
        if self.size < 1:
            raise QuantizationError(f"size (update length) must be >= 1, got {self.size}")
        if self.bound >= 1 << 64:
            raise QuantizationError(f"the largest slot sum {self.bound} would wrap even mod 2^64")

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def step(self) -> float:
        return 2 * self.clip / self.levels

    @property
    def bound(self) -> int:
        """The largest value any slot of the sum can take (values and weight; clipped counts)."""
        return self.max_clients * max(self.max_weight * self.levels, self.size)

    @property
    def modulus_bits(self) -> int:
        return 32 if self.bound < 1 << 32 else 64

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint32 if self.modulus_bits == 32 else np.uint64


def encode(x: np.ndarray, weight: int, cfg: QuantConfig, rng: np.random.Generator) -> np.ndarray:
    """The integer vector (D + 2,) a client masks; stochastic rounding draws from ``rng`` (unbiased)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or not 1 <= len(x) <= cfg.size:
        raise QuantizationError(f"update must be a flat vector of 1..{cfg.size} values, got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise QuantizationError(f"update has {bad} non-finite values (NaN or infinity); refusing to send it")
    if not 1 <= weight <= cfg.max_weight:
        raise QuantizationError(f"weight {weight} must lie in [1, {cfg.max_weight}]")
    s = np.clip(x, -cfg.clip, cfg.clip)  # one working array, changed in place (half the time of fresh ones)
    clipped = len(x) - int(np.count_nonzero(s == x))
    s += cfg.clip
    s *= 1.0 / cfg.step  # in [0, levels]
    # stochastic rounding: floor(s + u), u ~ U[0, 1), rounds up with probability frac(s), so E[q] = s
    s += rng.random(x.shape, dtype=np.float32)
    np.floor(s, out=s)
    np.minimum(s, cfg.levels, out=s)
    out = np.empty(len(x) + EXTRA_SLOTS, dtype=cfg.dtype)
    out[: len(x)] = s
    out[: len(x)] *= cfg.dtype(weight)  # in the integers: exact for every weight the modulus allows
    out[-2:] = (weight, clipped)
    return out


@dataclass(frozen=True)
class Decoded:
    mean: np.ndarray  # weighted mean of the clients' (quantized) updates
    total_weight: int
    clipped: int


def decode(total: np.ndarray, cfg: QuantConfig, contributors: int) -> Decoded:
    """Turn the unmasked integer sum of ``contributors`` encoded vectors back into the weighted mean; a sum no
    honest set of that many clients could produce (a wrong mask, a lying client) is refused, not averaged."""
    total = np.asarray(total)
    if total.ndim != 1 or len(total) < EXTRA_SLOTS + 1:
        raise QuantizationError(f"a sum must be a flat vector of D + {EXTRA_SLOTS} values, got shape {total.shape}")
    weight, clipped, values = int(total[-2]), int(total[-1]), total[:-EXTRA_SLOTS]
    if not 1 <= contributors <= cfg.max_clients:
        raise QuantizationError(f"contributors {contributors} must lie in [1, {cfg.max_clients}]")
    if not contributors <= weight <= contributors * cfg.max_weight:
        raise QuantizationError(
            f"impossible total weight for {contributors} clients (each declares 1..{cfg.max_weight}): "
            "the sum is corrupt (a client sent a wrong vector or mask)"
        )
    if clipped > contributors * len(values) or int(values.max()) > weight * cfg.levels:
        raise QuantizationError("impossible sum (a value or the clipped count exceeds its bound): the sum is corrupt")
    mean = values.astype(np.float64) / weight * cfg.step - cfg.clip
    return Decoded(mean, weight, clipped)
