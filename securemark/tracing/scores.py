"""Scoring every customer at once: one product of packed code bits with a weight vector.

Rows are kept column-major in 16-bit chunks: for chunk k a 65,536-entry table holds the sum of the weights
of every bit pattern, so x_j . w is 'one table look-up per 16 bits' summed over chunks. Contiguous columns
make each look-up pass stream through memory (10^6 x 2048 bits in about 0.4 s on 2 cores here, against
2.2 s for row-major byte tables); ``dense_scores_reference`` is the obvious version tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from securemark.codes import tardos
from securemark.codes.base import accusation_threshold, gaussian_sf

_CHUNK_BITS = 16
_PATTERNS = np.unpackbits(np.arange(1 << 16, dtype=">u2").view(np.uint8).reshape(-1, 2), axis=1)  # (65536, 16)


@dataclass(frozen=True)
class PackedCodebook:
    """Code bits of n users, length L, as column-major uint16 chunks (L16, n)."""

    columns: np.ndarray = field(repr=False)
    length: int

    @classmethod
    def from_packed_rows(cls, packed: np.ndarray, length: int) -> PackedCodebook:
        """From row-major packed bytes (n, ceil(L/8)) as :func:`codes.pack_bits` writes them."""
        n, nbytes = packed.shape
        if nbytes != (length + 7) // 8:
            raise ValueError(f"packed rows have {nbytes} bytes, length {length} needs {(length + 7) // 8}")
        padded = np.zeros((n, -(-nbytes // 2) * 2), dtype=np.uint8)  # pad to whole 16-bit chunks with 0 bits
        padded[:, :nbytes] = packed
        return cls(np.ascontiguousarray(padded.view(">u2").T), length)

    @property
    def users(self) -> int:
        return self.columns.shape[1]

    @cached_property
    def _dense(self) -> np.ndarray:
        """(n, L) float32 0/1 rows, unpacked once: the fast path for small codebooks."""
        raw = np.ascontiguousarray(self.columns.T).astype(">u2").view(np.uint8)  # (n, 2 L16) row-major bytes
        return np.unpackbits(raw, axis=1, count=self.length).astype(np.float32)

    def matvec(self, w: np.ndarray, method: str = "auto") -> np.ndarray:
        """x_j . w for every user j, float64 (n,).

        ``table`` pays for 65,536-entry tables per 16 bits (about L x 65,536 operations) and then one look-up
        per user and chunk: it wins for many users. ``dense`` unpacks the rows once and multiplies (n x L): it
        wins while n is far below 65,536 (an evaluation's thousand customers: ~1 ms against ~0.2 s).
        ``auto`` picks dense below 16,384 users when the unpacked rows fit in 64 MiB.
        """
        w = np.asarray(w, dtype=np.float64)
        if w.shape != (self.length,):
            raise ValueError(f"weights have shape {w.shape}, expected ({self.length},)")
        if method == "auto":
            method = "dense" if self.users < 16_384 and self.users * self.length <= 1 << 24 else "table"
        if method == "dense":
            return (self._dense @ w.astype(np.float32)).astype(np.float64)
        if method != "table":
            raise ValueError(f"matvec method must be auto, table or dense, got {method!r}")
        padded = np.zeros(self.columns.shape[0] * _CHUNK_BITS)
        padded[: self.length] = w
        # float32 tables halve memory traffic; partial sums stay in float64 below
        tables = (padded.reshape(-1, _CHUNK_BITS) @ _PATTERNS.T).astype(np.float32)  # (L16, 65536)
        out = np.zeros(self.users)
        part = np.empty(self.users, dtype=np.float32)
        for k in range(self.columns.shape[0]):
            np.take(tables[k], self.columns[k], out=part)
            out += part
        return out


def tardos_scores(book: PackedCodebook, y: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Symmetric soft scores S_j of every user for observation y (see codes.tardos)."""
    w, offset = tardos.score_weights(y, bias)
    return book.matvec(w) - offset


def dense_scores_reference(rows: np.ndarray, y: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return tardos.soft_scores_reference(rows, y, bias)


@dataclass(frozen=True)
class Accusation:
    normalized: np.ndarray  # S_j / ||y||, ~N(0, 1) for an innocent
    threshold: float
    accused: np.ndarray  # indices, most suspicious first

    def p_values(self, users: np.ndarray) -> np.ndarray:
        """P(N(0,1) > normalized score) for the given users (computed only for those reported)."""
        return gaussian_sf(self.normalized[users])


def accuse(scores: np.ndarray, y: np.ndarray, eps: float) -> Accusation:
    """Normalize scores by ||y|| and accuse above z = Phi^-1(1 - eps/n); a zero observation accuses nobody."""
    norm = float(np.linalg.norm(y))
    normalized = scores / norm if norm > 0 else np.zeros_like(scores)
    threshold = accusation_threshold(len(scores), eps)
    accused = np.flatnonzero(normalized > threshold)
    accused = accused[np.argsort(-normalized[accused])]
    return Accusation(normalized, threshold, accused)
