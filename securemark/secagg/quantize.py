"""Fixed-point encoding of weighted updates so that integers mod 2^k sum exactly to the weighted sum.

A client with n_i examples and update x_i (floats) sends the integer vector

    [ n_i * q(x_i) (D values),  n_i,  clipped_i ]        q(x) = round_stochastic((clip(x) + c) / step)

with step = 2c / (2^bits - 1), so every q lies in [0, 2^bits - 1]. The unmasked sum gives
sum n_i q(x_i), sum n_i and sum clipped_i; the weighted mean of the quantized values is
sum n_i q_i / sum n_i * step - c (the affine map commutes with a weighted mean). The server never learns an
individual n_i or clip count. The modulus 2^32 or 2^64 is the smallest for which the declared bounds
(clients x max_weight x (2^bits - 1)) cannot wrap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EXTRA_SLOTS = 2  # weight, clipped count


class QuantizationError(ValueError):
    """An update cannot be encoded: non-finite values, a weight out of range, a wrong size."""


@dataclass(frozen=True)
class QuantConfig:
    clip: float = 1.0  # values are clipped to [-clip, clip]
    bits: int = 16
    max_weight: int = 1 << 16  # largest number of examples one client may declare
    max_clients: int = 1024

    def __post_init__(self) -> None:
        if not self.clip > 0 or not 1 <= self.bits <= 30 or self.max_weight < 1 or self.max_clients < 1:
            raise QuantizationError("need clip > 0, 1 <= bits <= 30, max_weight >= 1 and max_clients >= 1")
        if self.bound >= 1 << 64:
            raise QuantizationError(f"clients x max_weight x 2^bits = {self.bound} would wrap even mod 2^64")

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def step(self) -> float:
        return 2 * self.clip / self.levels

    @property
    def bound(self) -> int:
        """The largest value any slot of the sum can take."""
        return self.max_clients * self.max_weight * self.levels

    @property
    def modulus_bits(self) -> int:
        return 32 if self.bound < 1 << 32 else 64

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint32 if self.modulus_bits == 32 else np.uint64


def encode(x: np.ndarray, weight: int, cfg: QuantConfig, rng: np.random.Generator) -> np.ndarray:
    """The integer vector (D + 2,) a client masks; stochastic rounding draws from ``rng`` (unbiased)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise QuantizationError(f"update must be a flat vector, got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise QuantizationError(f"update has {bad} non-finite values (NaN or infinity); refusing to send it")
    if not 1 <= weight <= cfg.max_weight:
        raise QuantizationError(f"weight {weight} must lie in [1, {cfg.max_weight}]")
    clipped = int((np.abs(x) > cfg.clip).sum())
    scaled = (np.clip(x, -cfg.clip, cfg.clip) + cfg.clip) * (1.0 / cfg.step)  # in [0, levels]
    # stochastic rounding: floor(s + u), u ~ U[0, 1), rounds up with probability frac(s), so E[q] = s
    q = np.floor(scaled + rng.random(x.shape, dtype=np.float32))
    out = np.empty(len(x) + EXTRA_SLOTS, dtype=cfg.dtype)
    np.multiply(np.minimum(q, cfg.levels).astype(cfg.dtype), cfg.dtype(weight), out=out[: len(x)])
    out[-2:] = (weight, clipped)
    return out


@dataclass(frozen=True)
class Decoded:
    mean: np.ndarray  # weighted mean of the clients' (quantized) updates
    total_weight: int
    clipped: int


def decode(total: np.ndarray, cfg: QuantConfig) -> Decoded:
    """Turn the unmasked integer sum back into the weighted mean."""
    weight = int(total[-2])
    if weight == 0:
        raise QuantizationError("the sum carries zero total weight: nothing to average")
    mean = total[:-EXTRA_SLOTS].astype(np.float64) / weight * cfg.step - cfg.clip
    return Decoded(mean, weight, int(total[-1]))
