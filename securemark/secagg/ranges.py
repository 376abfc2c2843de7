"""Quantization ranges per tensor, from what the server knows: the global model and the sums of earlier rounds.

One range for every coordinate (Flower's SecAgg+ ``clipping_range``, securemark's old ``secagg.clip``) cuts the
tensors whose updates are large: BatchNorm running statistics (a variance moves from 1 to hundreds in a round),
and any weight when training runs hot. Here tensor k of round t gets

    c_k = pow2ceil( max(floor, SCALE * max|w_k|) * GROWTH ** g_k )

where w_k is the global model's tensor (a running variance of 3000 gets a range of 65536), floor is
``secagg.clip`` (the smallest range; it covers tensors that start at zero, such as running means), and g_k
counts the earlier rounds whose sum showed values of tensor k clipped (each widens the range GROWTH-fold from
then on), at most MOST_GROWN. A client can lie about its clipped counts (the sum only bounds them by the
part's length): the cap keeps what it can do to a range at 4096x, where the floor's step is still 1.5e-5 with
32 bits, and every such round's warning names the tensors. Ranges never narrow back: a range that oscillated
would clip every other round. Ranges are rounded up to powers of two so that they print and compare exactly.
Before the run's first sum the model says nothing of its statistics' scale (running variances start at 1,
running means at 0, and the stem's move by tens in a first round at a high learning rate), so the first
round's floor is FIRST x floor (2048 for the default 8; with 32 bits its step is 1e-6).

Everything here is public to the server already (the global model it sends, the clipped counts its sums
reveal), the ranges are the same for every node of a round and bound into the round's keys
(``quantize.QuantConfig.digest``): choosing them leaks nothing about one client. How many bits a value gets,
and so the step of each range, is :func:`round_bits`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from securemark.secagg.quantize import QuantizationError

SCALE = 16.0  # a tensor's range is at least SCALE x its largest |value| in the global model
GROWTH = 4.0  # a tensor whose values were clipped in a round: its range grows this much for later rounds
MOST_GROWN = 6  # at most GROWTH^6 = 4096x: what one client that lies about clipped counts can make of a range
FIRST = 256.0  # the first round's floor, in floors: nothing has shown the updates' scale yet
MAX_RANGE = 2.0**64  # no range is wider (an update beyond it is no training step)


def pow2ceil(x: float) -> float:
    """The smallest power of two >= x (x > 0)."""
    return math.ldexp(1.0, math.ceil(math.log2(x)))


@dataclass
class Ranges:
    floor: float  # secagg.clip: no tensor's range is smaller
    grown: dict[str, int] = field(default_factory=dict)  # tensor -> rounds that clipped it
    summed: bool = False  # a round's sum was seen (the first round's wider floor is over)

    def parts(self, tensors: Sequence[tuple[str, int, float]]) -> tuple[tuple[int, float], ...]:
        """(length, range) of each tensor's part of the update, from (name, size, largest |value|) of each tensor
        of the global model, in the update's order."""
        out, floor = [], self.floor * (1.0 if self.summed else FIRST)
        for name, size, top in tensors:
            if not math.isfinite(top):
                raise QuantizationError(f"the global model's tensor {name!r} holds NaN or infinite values")
            c = max(floor, SCALE * top) * GROWTH ** min(self.grown.get(name, 0), MOST_GROWN)
            out.append((int(size), pow2ceil(min(c, MAX_RANGE))))
        return tuple(out)

    def grow(self, names: Sequence[str], clipped: Sequence[int]) -> list[str]:
        """After a round whose sum counted ``clipped`` values per tensor: widen those tensors; their names."""
        self.summed = True
        hit = [n for n, c in zip(names, clipped, strict=True) if c > 0]
        for n in hit:
            self.grown[n] = min(self.grown.get(n, 0) + 1, MOST_GROWN)
        return hit

    def replay(self, rounds: Iterable[dict]) -> None:
        """The growth of a resumed run, from its rounds' metrics (each lists the tensors it widened)."""
        for m in rounds:
            if "clipped" in m:  # a masked round that was summed
                self.grow(list(m.get("widened", [])), [1] * len(m.get("widened", [])))


NARROW_BITS = 16  # after the first sum, a round keeps the 4-byte sum if its values still get this many bits


def round_bits(most: int, clients: int, max_weight: int, summed: bool) -> int:
    """Bits of a round's quantized values, at most ``most`` (secagg.bits): every slot of the sum of ``clients``
    vectors of weight up to ``max_weight`` must fit its words (n x max_weight x (2^bits - 1) < 2^32 or 2^64).
    The first round, whose ranges are the widest, takes the 8-byte sum; a later round takes 4-byte words when
    they leave NARROW_BITS or more, which halves masking and messages (8 and 4 bytes a value cost 0.73 and
    0.57 s a round for 10 clients of a 1M-parameter model here)."""
    head = math.ceil(math.log2(clients * max_weight + 1))
    narrow = min(most, 32 - head)
    return narrow if summed and narrow >= NARROW_BITS else min(most, 64 - head)
