"""Long-term X25519 keys: a node's private pair for one session, and the server's checked copy of every node's
public pair. The private keys never leave the node; only their public halves travel, once, at session setup."""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from securemark.secagg.protocol.config import RoundConfig
from securemark.secagg.protocol.errors import ProtocolViolation

KEY_BYTES = 32


def private_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def check_public_key(key: object, what: str) -> bytes:
    """A 32-byte X25519 public key that is not of low order. A low-order point makes every DH with it all-zero,
    which `cryptography` refuses: checked once here, with a throwaway key, so it never reaches an honest peer."""
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ProtocolViolation(f"{what} must be {KEY_BYTES} bytes")
    if int.from_bytes(key, "little") >= (1 << 255) - 19:  # X25519 would reduce it: one key, many encodings
        raise ProtocolViolation(f"{what} is not a canonical encoding (top bit set, or not below 2^255 - 19)")
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(key))
    except ValueError:
        raise ProtocolViolation(f"{what} is a low-order point (it would zero every shared secret)") from None
    return key


@dataclass
class NodeKeys:
    """A node's long-term keys for one session, the last round it masked (rounds only go forward) and every
    client's group as this node saw it (groups are fixed for a session)."""

    session: str
    id: int
    c_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    s_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    last_round: int = -1
    open_round: int | None = None  # masked, not yet unmasked
    groups: dict[int, tuple[int, ...]] = field(default_factory=dict)  # client -> its group, as first seen
    signed: tuple[int, tuple[int, ...]] | None = None  # (round, survivors) it signed (the malicious threat)
    masked: bytes | None = None  # the configuration digest of the round it masked last
    cap: int | None = None  # the weight cap of the session's rounds (one: caps that vary would tell counts)

    def public(self) -> tuple[bytes, bytes]:
        return public_bytes(self.c_key), public_bytes(self.s_key)


@dataclass
class SessionKeys:
    """The server's view of a session: every node's long-term public keys (checked once, at setup) and, under the
    malicious-server threat, the roster member each node is and its signature of those keys (relayed to its
    neighbours, who check it themselves: ``signing``)."""

    session: str
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    adverts: dict[int, tuple[str, bytes]] = field(default_factory=dict)  # client -> (member, signature)

    def register(self, node: int, c_pk: object, s_pk: object, advert: tuple[str, bytes] | None = None) -> None:
        """A node's (new) keys; a node that lost its keys registers again and replaces them."""
        c = check_public_key(c_pk, f"encryption key of client {node}")
        s = check_public_key(s_pk, f"mask key of client {node}")
        if c == s:
            raise ProtocolViolation(f"client {node} advertised the same key twice")
        taken = {k for other, pair in self.keys.items() if other != node for k in pair}  # keys are canonical
        if c in taken or s in taken:
            raise ProtocolViolation(f"client {node} advertised another client's public key")
        if advert is not None:
            holder = next((o for o, (m, _) in self.adverts.items() if m == advert[0] and o != node), None)
            if holder is not None:
                raise ProtocolViolation(f"client {node} signs as {advert[0]!r}, the member client {holder} is")
            self.adverts[node] = advert
        self.keys[node] = (c, s)

    def forget(self, node: int) -> None:
        self.keys.pop(node, None)
        self.adverts.pop(node, None)

    def for_client(self, cfg: RoundConfig, i: int) -> dict[int, tuple[bytes, bytes]]:
        return {j: self.keys[j] for j in cfg.neighbours[i]}

    def adverts_for(self, cfg: RoundConfig, i: int) -> dict[int, bytes]:
        """The signatures of i's neighbours' keys (empty without the malicious threat)."""
        return {j: self.adverts[j][1] for j in cfg.neighbours[i] if j in self.adverts}
