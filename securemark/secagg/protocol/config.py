"""One round's public configuration: session, round, neighbour graph, threshold, vector layout and encoding
digest, checked on construction; the holders and labels of each owner's shares; and the context string that
binds every derived key, associated data and commitment to this round."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from securemark.secagg.protocol.errors import ProtocolViolation

B_LABEL = 0  # the label of b_i; a pair seed p_ij is labelled j (ids are >= 1)


@dataclass(frozen=True)
class RoundConfig:
    session: str
    round: int
    neighbours: Mapping[int, tuple[int, ...]]  # client id (>= 1, stable in the session) -> neighbours; symmetric
    threshold: int  # shares needed to rebuild a secret (and the fewest survivors that may be unmasked)
    size: int  # length of the integer vectors
    modulus_bits: int = 64
    encoding: bytes = b""  # digest of how inputs are encoded (quantize.QuantConfig.digest), bound into every key

    def __post_init__(self) -> None:
        ids = set(self.neighbours)
        if not ids or min(ids) < 1 or max(ids) >= 1 << 31:
            raise ValueError("client ids must be integers in [1, 2^31) (they are Shamir x-coordinates)")
        for i, peers in self.neighbours.items():
            if i in peers or not set(peers) <= ids or any(i not in self.neighbours[j] for j in peers):
                raise ValueError(f"neighbour graph must be symmetric without self-loops (client {i})")
        smallest = min(len(p) for p in self.neighbours.values()) + 1
        if not 2 <= self.threshold <= smallest:
            raise ValueError(f"threshold {self.threshold} must lie in [2, {smallest}] (smallest neighbourhood + 1)")
        if self.modulus_bits not in (32, 64) or self.size < 1:
            raise ValueError("modulus_bits must be 32 or 64 and size >= 1")
        if not isinstance(self.encoding, bytes) or len(self.encoding) > 64:
            raise ValueError("encoding must be a digest of at most 64 bytes")

    @property
    def clients(self) -> tuple[int, ...]:
        return tuple(sorted(self.neighbours))

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint32 if self.modulus_bits == 32 else np.uint64

    def holders(self, i: int) -> tuple[int, ...]:
        return tuple(sorted((*self.neighbours[i], i)))

    def labels(self, i: int) -> tuple[int, ...]:
        """What owner i shares, in order: b_i, then p_ij for each neighbour j."""
        return (B_LABEL, *sorted(self.neighbours[i]))

    def context(self, purpose: str, a: int, b: int) -> bytes:
        """Binds a derived key, associated data or a commitment to this session, round, encoding, purpose and
        pair: two nodes told different encodings (a lying server's per-node quantization ranges) derive
        different pair seeds, so their masks never cancel and the sum they make stays padded."""
        return f"securemark/secagg/v3|{self.session}|{self.round}|{self.encoding.hex()}|{purpose}|{a}|{b}".encode()

    def check_safe_threshold(self, i: int) -> None:
        """A node's refusal of a threshold a lying server could exploit: at most half of H(i)."""
        m = len(self.holders(i))
        if not m / 2 < self.threshold <= m:
            raise ProtocolViolation(
                f"threshold {self.threshold} is unsafe for {m} holders: it must exceed half of them ({m / 2:g})"
            )
