"""Fixed-point encoding of weighted updates so that integers mod 2^k sum exactly to the weighted sum.

An update is cut into parts (one per tensor of a state_dict), part p with its own range [-c_p, c_p]. A client with
n_i examples and update x_i (floats) sends the integer vector

    [ n_i * q(x_i) (D values),  n_i,  clipped_i,1 .. clipped_i,P ]
    q(x) = round_stochastic((clip(x, c_p) + c_p) / step_p),   step_p = 2 c_p / (2^bits - 1)

so every q lies in [0, 2^bits - 1]. The unmasked sum gives sum n_i q(x_i), sum n_i and, per part, the number
of values clipped; the weighted mean of part p is sum n_i q_i / sum n_i * step_p - c_p (the affine map commutes
with a weighted mean), within one step_p of the weighted mean of the clipped updates. A client learns nothing
from the ranges and the server learns nothing new: the ranges are public (``secagg.ranges`` makes them from the
global model and earlier sums only), the same for every node of a round, and bound into every key the round
derives (``RoundConfig.encoding`` holds :meth:`QuantConfig.digest`), so nodes given different ranges make
masks that never cancel. The server never learns an individual n_i or clip count within a round.

Wrap bound: the modulus 2^32 or 2^64 is the smallest for which no slot can wrap: a value slot sums at most
clients x max_weight x (2^bits - 1), the weight slot clients x max_weight, a clipped slot clients x D.
``decode`` refuses a sum that honest clients cannot produce (a weight below the number of contributors or
above their maximum, a value above weight x (2^bits - 1), more clipped values than a part holds). Within
those checks a client that lies about its vector can still move part p's mean anywhere in [-c_p, c_p], whatever
weight it declares (2 c_p at most, where an honest client of weight w moves it 2 c_p w / W at most): wider ranges
widen what one dishonest client can do. Contributions bounded by their weight need input validation (zero-
knowledge range proofs, as in ACORN): not done.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from securemark.errors import SecureMarkError

EXTRA_SLOTS = 2  # weight and clipped count of a vector sent as one part
SMALLEST_RANGE, LARGEST_RANGE = 2.0**-40, 2.0**64  # a part's range: its step stays a normal float, its values finite


class QuantizationError(SecureMarkError, ValueError):
    """An update cannot be encoded: non-finite values, a weight out of range, a wrong size."""


@dataclass(frozen=True)
class QuantConfig:
    clip: float = 1.0  # the range of an update sent as one part: values are clipped to [-clip, clip]
    bits: int = 16
    max_weight: int = 1 << 16  # largest number of examples one client may declare
    max_clients: int = 1024
    size: int = 1 << 20  # D: the longest update (it bounds the clipped-count slots)
    parts: tuple[tuple[int, float], ...] = ()  # (length, range) of each part in order; () = one part, clip

    def __post_init__(self) -> None:
        for length, rng in self.parts:
            if not (isinstance(length, int) and length >= 0 and SMALLEST_RANGE <= rng <= LARGEST_RANGE):
                raise QuantizationError(
                    f"a part needs a length >= 0 and a range in [2^-40, 2^64], got ({length}, {rng})"
                )
        if (
            not SMALLEST_RANGE <= self.clip <= LARGEST_RANGE
            or not 1 <= self.bits <= 32
            or self.max_weight < 1
            or self.max_clients < 1
        ):
            raise QuantizationError("need clip in [2^-40, 2^64], 1 <= bits <= 32, max_weight >= 1, max_clients >= 1")
        if self.size < 1:
            raise QuantizationError(f"size (update length) must be >= 1, got {self.size}")
        if self.parts and sum(n for n, _ in self.parts) != self.size:  # (size >= 1: some part is not empty)
            raise QuantizationError("the parts' lengths must add up to size (use QuantConfig.of_parts)")
        if self.bound >= 1 << 64:
            raise QuantizationError(f"the largest slot sum {self.bound} would wrap even mod 2^64")

    @classmethod
    def of_parts(
        cls, parts: tuple[tuple[int, float], ...], bits: int, max_weight: int, max_clients: int
    ) -> QuantConfig:
        """An update of ``len(parts)`` parts, each (length, range): D is their total length."""
        if not parts:
            raise QuantizationError("an update needs at least one part")
        parts = tuple((int(n), float(r)) for n, r in parts)
        return cls(max(r for _, r in parts), bits, max_weight, max_clients, sum(n for n, _ in parts), parts)

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def step(self) -> float:
        """The step of the range ``clip`` (one part)."""
        return 2 * self.clip / self.levels

    @property
    def n_parts(self) -> int:
        return max(1, len(self.parts))

    @property
    def extra(self) -> int:
        """Slots after the values: the weight, then one clipped count per part."""
        return 1 + self.n_parts

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

    def spans(self, n: int) -> list[tuple[int, int, float]]:
        """(start, stop, range) of each part of an update of ``n`` values."""
        if not self.parts:
            return [(0, n, self.clip)]
        out, start = [], 0
        for length, rng in self.parts:
            out.append((start, start + length, rng))
            start += length
        return out

    def digest(self) -> bytes:
        """32 bytes naming this encoding exactly (bits, weights, clients, size, every part): what a round binds
        into its keys, so two nodes encode alike or their masks do not cancel."""
        parts = [[n, float(r).hex()] for n, r in self.parts] or [[self.size, float(self.clip).hex()]]
        text = json.dumps([self.bits, self.max_weight, self.max_clients, self.size, parts], separators=(",", ":"))
        return hashlib.sha256(b"securemark/quantize/v2|" + text.encode()).digest()


def encode(x: np.ndarray, weight: int, cfg: QuantConfig, rng: np.random.Generator) -> np.ndarray:
    """The integer vector (D + cfg.extra,) a client masks; stochastic rounding draws from ``rng`` (unbiased)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or not 1 <= len(x) <= cfg.size or (cfg.parts and len(x) != cfg.size):
        want = f"{cfg.size}" if cfg.parts else f"1..{cfg.size}"
        raise QuantizationError(f"update must be a flat vector of {want} values, got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise QuantizationError(f"update has {bad} non-finite values (NaN or infinity); refusing to send it")
    if not 1 <= weight <= cfg.max_weight:
        raise QuantizationError(f"weight {weight} must lie in [1, {cfg.max_weight}]")
    s = x.copy()  # one working array, changed in place part by part (half the time of fresh arrays)
    clipped = []
    for start, stop, c in cfg.spans(len(x)):
        part = s[start:stop]
        np.clip(part, -c, c, out=part)
        clipped.append(stop - start - int(np.count_nonzero(part == x[start:stop])))
        part += c
        part *= 1.0 / (2 * c / cfg.levels)  # 1 / step_p: in [0, levels]
    # stochastic rounding: floor(s + u), u ~ U[0, 1), rounds up with probability frac(s), so E[q] = s
    s += rng.random(x.shape, dtype=np.float32)
    np.floor(s, out=s)
    np.minimum(s, cfg.levels, out=s)
    out = np.empty(len(x) + cfg.extra, dtype=cfg.dtype)
    out[: len(x)] = s
    out[: len(x)] *= cfg.dtype(weight)  # in the integers: exact for every weight the modulus allows
    out[len(x)] = weight
    out[len(x) + 1 :] = clipped
    return out


@dataclass(frozen=True)
class Decoded:
    mean: np.ndarray  # weighted mean of the clients' (quantized) updates
    total_weight: int
    clipped_parts: tuple[int, ...]  # values clipped in each part, summed over the clients

    @property
    def clipped(self) -> int:
        return sum(self.clipped_parts)


def decode(total: np.ndarray, cfg: QuantConfig, contributors: int) -> Decoded:
    """Turn the unmasked integer sum of ``contributors`` encoded vectors back into the weighted mean; a sum no
    honest set of that many clients could produce (a wrong mask, a lying client) is refused, not averaged."""
    total = np.asarray(total)
    n = len(total) - cfg.extra if total.ndim == 1 else -1
    if n < 1 or (cfg.parts and n != cfg.size):
        raise QuantizationError(f"a sum must be a flat vector of D + {cfg.extra} values, got shape {total.shape}")
    weight, clipped, values = int(total[n]), tuple(int(c) for c in total[n + 1 :]), total[:n]
    if not 1 <= contributors <= cfg.max_clients:
        raise QuantizationError(f"contributors {contributors} must lie in [1, {cfg.max_clients}]")
    if not contributors <= weight <= contributors * cfg.max_weight:
        raise QuantizationError(
            f"impossible total weight for {contributors} clients (each declares 1..{cfg.max_weight}): "
            "the sum is corrupt (a client sent a wrong vector or mask)"
        )
    spans = cfg.spans(n)
    too_many = any(c > contributors * (stop - start) for c, (start, stop, _) in zip(clipped, spans, strict=True))
    if too_many or int(values.max()) > weight * cfg.levels:
        raise QuantizationError("impossible sum (a value or a clipped count exceeds its bound): the sum is corrupt")
    mean = values.astype(np.float64)
    for start, stop, c in spans:
        part = mean[start:stop]
        part /= weight
        part *= 2 * c / cfg.levels
        part -= c
    return Decoded(mean, weight, clipped)
