"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(p), p = 2^521 - 1.

The field is far larger than the secrets (2^256), which buys a check for free: a reconstruction from a
tampered or mismatched share lands on a uniformly random field element, which is below 2^256 with
probability 2^-265, so ``combine`` rejects it instead of returning garbage.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from securemark.errors import SecureMarkError

PRIME = 2**521 - 1  # a Mersenne prime
SECRET_BYTES = 32
SHARE_BYTES = 66  # ceil(521 / 8)


class ShareError(SecureMarkError, ValueError):
    """Shares are too few, malformed, or inconsistent with each other."""


def split(secret: bytes, holders: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Shares of ``secret`` for each holder x (distinct, 1 <= x < p); any ``threshold`` of them rebuild it."""
    if len(secret) != SECRET_BYTES:
        raise ShareError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(holders)) != len(holders) or any(not 0 < x < PRIME for x in holders):
        raise ShareError("holders must be distinct nonzero field elements")
    if not 1 <= threshold <= len(holders):
        raise ShareError(f"threshold {threshold} must lie in [1, {len(holders)}]")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in holders:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (Lagrange interpolation at 0 over the first t holders)."""
    if len(shares) < threshold:
        raise ShareError(f"need {threshold} shares, got {len(shares)}")
    points = sorted(shares.items())[:threshold]
    for x, y in points:
        if len(y) != SHARE_BYTES or not 0 < x < PRIME:
            raise ShareError(f"malformed share from holder {x}")
    xs = [x for x, _ in points]
    secret = 0
    for j, (xj, yj) in enumerate(points):
        num = den = 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        secret = (secret + int.from_bytes(yj, "big") * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ShareError("shares are inconsistent (tampered or from different secrets)")
    return secret.to_bytes(SECRET_BYTES, "big")
