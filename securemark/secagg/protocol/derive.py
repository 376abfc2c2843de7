"""Everything a round derives, each bound by HKDF to (session, round, purpose, pair) so that no seed or key is
ever used in two rounds: pair seeds and share keys from X25519 agreement, self-mask keys from a fresh seed, and
the hash commitment to each share."""

from __future__ import annotations

import hashlib
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from securemark.prg import hkdf
from securemark.secagg.protocol.config import RoundConfig
from securemark.secagg.protocol.errors import ProtocolViolation

COMMIT_BYTES = 16


def _agree(cfg: RoundConfig, private: X25519PrivateKey, peer: bytes, purpose: str, a: int, b: int) -> bytes:
    """A 32-byte key from DH(private, peer) bound to this session, round, purpose and pair."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer))
    except ValueError:
        raise ProtocolViolation(f"a public key for the {purpose} keys of ({a}, {b}) is a low-order point") from None
    return hkdf(shared, cfg.context(purpose, a, b))


def _pair_seed(cfg: RoundConfig, s_key: X25519PrivateKey, peer_s: bytes, i: int, j: int) -> bytes:
    return _agree(cfg, s_key, peer_s, "pair", min(i, j), max(i, j))


def _share_key(cfg: RoundConfig, c_key: X25519PrivateKey, peer_c: bytes, owner: int, holder: int) -> bytes:
    return _agree(cfg, c_key, peer_c, "share", owner, holder)


def _self_mask_key(cfg: RoundConfig, seed: bytes, i: int) -> bytes:
    return hkdf(seed, cfg.context("self", i, i))


def commitment(cfg: RoundConfig, owner: int, label: int, holder: int, share: bytes) -> bytes:
    """Hash commitment to one share (shares are uniform 521-bit values: the hash hides them)."""
    return hashlib.sha256(cfg.context("commit", owner, holder) + struct.pack(">I", label) + share).digest()[
        :COMMIT_BYTES
    ]
