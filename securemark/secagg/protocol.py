"""SecAgg (Bonawitz et al. 2017) and SecAgg+ (Bell et al. 2020) as stages over state dataclasses.

    advertise keys -> share keys -> masked input -> unmask -> sum

Each stage is a function that takes a state and plain bytes / arrays and returns plain bytes / arrays, so
Flower messages, tests and benchmarks drive the same code. The server is honest-but-curious: it routes
encrypted shares it cannot read, sees only masked vectors, and unmasks only their sum.

Client i holds two X25519 keys (c: encrypts shares, s: agrees pairwise masks) and a self-mask seed b_i.
It Shamir-shares b_i and its s private key among its neighbours and itself (threshold t), and sends

    y_i = x_i + PRG(b_i) + sum_{j in N(i) & U2} sign(i, j) PRG(s_ij)   (mod 2^k),  sign = +1 if i < j else -1

Pairwise masks cancel in the sum. For each survivor the server rebuilds b_j; for each client that shared keys
but sent no masked input it rebuilds s_j and removes that client's pairwise masks from its neighbours' inputs.
No client reveals both shares for the same peer, and none unmasks when fewer than t inputs arrived.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from securemark.prg import add_keystream, hkdf
from securemark.secagg import shamir

KEY_BYTES = 32
NONCE_BYTES = 12
_PLAIN_BYTES = 8 + 2 * shamir.SHARE_BYTES  # sender, receiver, b-share, s-share
CIPHER_BYTES = NONCE_BYTES + _PLAIN_BYTES + 16


class Stage(IntEnum):
    ADVERTISE = 1
    SHARE = 2
    MASKED = 3
    UNMASK = 4
    DONE = 5


class SecAggError(RuntimeError):
    """Base of every protocol error; the message says what was rejected and why."""


class StageError(SecAggError):
    """A message arrived for a stage other than the current one."""


class ProtocolViolation(SecAggError):
    """A message from an unknown sender, a duplicate, or of the wrong size, dtype or content."""


class ShareAuthError(SecAggError):
    """An encrypted share failed authentication: tampered, replayed from another round, or misaddressed."""


class TooFewSurvivors(SecAggError):
    """Fewer than the threshold of clients answered: the sum cannot (and must not) be unmasked."""


# --- round configuration and graphs -----------------------------------------------------------------
@dataclass(frozen=True)
class RoundConfig:
    run_id: str
    round: int
    neighbours: Mapping[int, tuple[int, ...]]  # client id (>= 1) -> its neighbours; symmetric
    threshold: int  # shares needed to rebuild a secret (and the fewest inputs that may be unmasked)
    size: int  # length of the integer vectors
    modulus_bits: int = 64

    def __post_init__(self) -> None:
        ids = set(self.neighbours)
        if not ids or min(ids) < 1:
            raise ValueError("client ids must be integers >= 1 (they are Shamir x-coordinates)")
        for i, peers in self.neighbours.items():
            if i in peers or not set(peers) <= ids or any(i not in self.neighbours[j] for j in peers):
                raise ValueError(f"neighbour graph must be symmetric without self-loops (client {i})")
        smallest = min(len(p) for p in self.neighbours.values()) + 1
        if not 2 <= self.threshold <= smallest:
            raise ValueError(f"threshold {self.threshold} must lie in [2, {smallest}] (smallest neighbourhood + 1)")
        if self.modulus_bits not in (32, 64) or self.size < 1:
            raise ValueError("modulus_bits must be 32 or 64 and size >= 1")

    @property
    def clients(self) -> tuple[int, ...]:
        return tuple(sorted(self.neighbours))

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint32 if self.modulus_bits == 32 else np.uint64

    def context(self, purpose: str, a: int, b: int) -> bytes:
        """Binds a derived key or associated data to this run, this round, a purpose and an ordered pair."""
        return f"securemark/secagg/v1|{self.run_id}|{self.round}|{purpose}|{a}|{b}".encode()


def complete_graph(clients: Sequence[int]) -> dict[int, tuple[int, ...]]:
    """SecAgg: everyone is everyone's neighbour."""
    return {i: tuple(j for j in clients if j != i) for i in clients}


def sparse_degree(n: int) -> int:
    """An even degree k = O(log n) (about 2 log2 n), capped by the complete graph."""
    k = 2 * math.ceil(math.log2(max(n, 2)))
    return min(k + k % 2, n - 1 if (n - 1) % 2 == 0 else n - 2) if n > 2 else n - 1


def harary_graph(clients: Sequence[int], k: int, rng: np.random.Generator) -> dict[int, tuple[int, ...]]:
    """SecAgg+: a random k-regular graph (a Harary ring over a random order; k even).

    The graph is public: the server draws it and sends each client its neighbours.
    """
    n = len(clients)
    if k % 2 or not 2 <= k < n:
        raise ValueError(f"degree k must be even with 2 <= k < n = {n}, got {k}")
    ring = [clients[i] for i in rng.permutation(n)]
    peers: dict[int, set[int]] = {i: set() for i in clients}
    for pos, i in enumerate(ring):
        for d in range(1, k // 2 + 1):
            j = ring[(pos + d) % n]
            peers[i].add(j)
            peers[j].add(i)
    return {i: tuple(sorted(p)) for i, p in peers.items()}


def neighbour_graph(
    clients: Sequence[int], kind: str, rng: np.random.Generator
) -> tuple[dict[int, tuple[int, ...]], int]:
    """The round's graph and threshold, a majority of each neighbourhood (self included).

    ``complete`` is SecAgg; ``sparse`` is SecAgg+'s random k-regular graph, which for 4 clients or fewer
    would be no sparser than complete in any useful sense, so they get the complete graph.
    """
    if kind not in ("complete", "sparse"):
        raise ValueError(f"graph must be 'complete' or 'sparse', got {kind!r}")
    if kind == "sparse" and len(clients) > 4:
        k = sparse_degree(len(clients))
        return harary_graph(clients, k, rng), k // 2 + 1
    return complete_graph(clients), len(clients) // 2 + 1


def private_bytes(private: X25519PrivateKey) -> bytes:
    """The raw 32 bytes of a private key: what is Shamir-shared, and what a node keeps in its own state."""
    return private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _agree(cfg: RoundConfig, private: X25519PrivateKey, peer_public: bytes, purpose: str, a: int, b: int) -> bytes:
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return hkdf(shared, cfg.context(purpose, a, b))


def _pair_mask_key(cfg: RoundConfig, private: X25519PrivateKey, peer_public: bytes, i: int, j: int) -> bytes:
    return _agree(cfg, private, peer_public, "mask", min(i, j), max(i, j))


def _self_mask_key(cfg: RoundConfig, seed: bytes, i: int) -> bytes:
    return hkdf(seed, cfg.context("self", i, i))


def _check_sender(known: Collection[int], sender: int, what: str) -> None:
    if sender not in known:
        raise ProtocolViolation(f"{what} from unknown or unexpected client {sender!r}")


# --- client -----------------------------------------------------------------------------------------
@dataclass
class ClientState:
    cfg: RoundConfig
    id: int
    stage: Stage = Stage.ADVERTISE
    c_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    s_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    seed: bytes = field(default_factory=lambda: os.urandom(KEY_BYTES), repr=False)  # self-mask seed b_i
    peer_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)  # peer -> (b, s) shares
    sharers: tuple[int, ...] = ()  # neighbours that shared keys with us (U2 & N(i))

    def __post_init__(self) -> None:
        _check_sender(self.cfg.neighbours, self.id, "client state")

    def expect(self, stage: Stage) -> None:
        if self.stage != stage:
            raise StageError(f"client {self.id} is at stage {self.stage.name}, got a {stage.name} request")


def client_advertise(st: ClientState) -> tuple[bytes, bytes]:
    """Stage 1: the two public keys (c, s)."""
    st.expect(Stage.ADVERTISE)
    st.stage = Stage.SHARE
    return _public(st.c_key), _public(st.s_key)


def client_share_keys(st: ClientState, peer_keys: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
    """Stage 2: given neighbours' public keys, Shamir-share b_i and s_i; one AEAD ciphertext per neighbour."""
    st.expect(Stage.SHARE)
    for j, (c_pk, s_pk) in peer_keys.items():
        _check_sender(st.cfg.neighbours[st.id], j, "public keys")
        if len(c_pk) != KEY_BYTES or len(s_pk) != KEY_BYTES:
            raise ProtocolViolation(f"public keys of client {j} must be {KEY_BYTES} bytes each")
    if len(peer_keys) + 1 < st.cfg.threshold:
        raise TooFewSurvivors(
            f"client {st.id}: {len(peer_keys)} neighbours advertised keys, threshold {st.cfg.threshold}"
        )
    st.peer_keys = dict(peer_keys)
    holders = [*sorted(peer_keys), st.id]
    b_shares = shamir.split(st.seed, holders, st.cfg.threshold)
    s_shares = shamir.split(private_bytes(st.s_key), holders, st.cfg.threshold)
    st.held[st.id] = (b_shares[st.id], s_shares[st.id])
    out = {}
    for j in sorted(peer_keys):
        key = _agree(st.cfg, st.c_key, peer_keys[j][0], "share", st.id, j)  # one key per direction
        nonce = os.urandom(NONCE_BYTES)
        plain = st.id.to_bytes(4, "big") + j.to_bytes(4, "big") + b_shares[j] + s_shares[j]
        out[j] = nonce + ChaCha20Poly1305(key).encrypt(nonce, plain, st.cfg.context("share-ad", st.id, j))
    st.stage = Stage.MASKED
    return out


def client_masked_input(st: ClientState, ciphertexts: Mapping[int, bytes], x: np.ndarray) -> np.ndarray:
    """Stage 3: decrypt the shares addressed to us, then send y_i = x_i + self mask + pairwise masks."""
    st.expect(Stage.MASKED)
    cfg = st.cfg
    x = np.asarray(x)
    if x.dtype != cfg.dtype or x.shape != (cfg.size,):
        raise ProtocolViolation(f"input must be {cfg.dtype.__name__} of shape ({cfg.size},), got {x.dtype} {x.shape}")
    for j, ct in ciphertexts.items():
        if j not in st.peer_keys:
            raise ProtocolViolation(f"client {st.id} got a share from {j}, which is not a neighbour that advertised")
        key = _agree(cfg, st.c_key, st.peer_keys[j][0], "share", j, st.id)
        try:
            plain = ChaCha20Poly1305(key).decrypt(ct[:NONCE_BYTES], ct[NONCE_BYTES:], cfg.context("share-ad", j, st.id))
        except (InvalidTag, ValueError):
            raise ShareAuthError(
                f"client {st.id}: the share from client {j} failed authentication (tampered, replayed or misaddressed)"
            ) from None
        if int.from_bytes(plain[:4], "big") != j or int.from_bytes(plain[4:8], "big") != st.id:
            raise ShareAuthError(f"client {st.id}: the share from client {j} names another sender or receiver")
        b = 8 + shamir.SHARE_BYTES
        st.held[j] = (plain[8:b], plain[b:])
    st.sharers = tuple(sorted(ciphertexts))
    y = x.copy()
    add_keystream(_self_mask_key(cfg, st.seed, st.id), y)  # unsigned arithmetic wraps: exactly mod 2^k
    for j in st.sharers:
        add_keystream(_pair_mask_key(cfg, st.s_key, st.peer_keys[j][1], st.id, j), y, subtract=st.id > j)
    st.stage = Stage.UNMASK
    return y


def client_unmask(st: ClientState, survivors: Sequence[int]) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """Stage 4: for each peer whose input arrived reveal its b-share, for each that dropped its s-share."""
    st.expect(Stage.UNMASK)
    alive = set(survivors)
    if len(alive) < st.cfg.threshold:
        raise TooFewSurvivors(
            f"client {st.id}: {len(alive)} inputs arrived, threshold {st.cfg.threshold}: refusing to unmask"
        )
    if not alive <= set(st.cfg.neighbours):
        raise ProtocolViolation(f"client {st.id}: survivor list names unknown clients")
    b_out, s_out = {}, {}
    for j, (b_share, s_share) in st.held.items():
        if j in alive:
            b_out[j] = b_share
        else:
            s_out[j] = s_share
    st.stage = Stage.DONE
    return b_out, s_out


# --- server -----------------------------------------------------------------------------------------
@dataclass
class ServerState:
    cfg: RoundConfig
    stage: Stage = Stage.ADVERTISE
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # U1
    routed: dict[int, dict[int, bytes]] = field(default_factory=dict, repr=False)  # receiver -> sender -> ct
    shared: set[int] = field(default_factory=set)  # U2
    masked_sum: np.ndarray | None = field(default=None, repr=False)  # running sum of masked inputs only
    inputs: set[int] = field(default_factory=set)  # U3
    b_shares: dict[int, dict[int, bytes]] = field(default_factory=dict, repr=False)  # owner -> holder -> share
    s_shares: dict[int, dict[int, bytes]] = field(default_factory=dict, repr=False)
    unmasked: set[int] = field(default_factory=set)  # U4

    def expect(self, stage: Stage, sender: int, seen: Collection[int]) -> None:
        if self.stage != stage:
            raise StageError(f"server is at stage {self.stage.name}; {stage.name} message from {sender} rejected")
        _check_sender(self.cfg.neighbours, sender, f"{stage.name} message")
        if sender in seen:
            raise ProtocolViolation(f"duplicate {stage.name} message from client {sender}")

    def close(self, stage: Stage, count: int) -> None:
        """End ``stage``; fail loudly below the threshold rather than skip silently."""
        if self.stage != stage:
            raise StageError(f"server is at stage {self.stage.name}, cannot close {stage.name}")
        if count < self.cfg.threshold:
            raise TooFewSurvivors(f"{stage.name}: {count} clients answered, threshold is {self.cfg.threshold}")
        self.stage = Stage(stage + 1)


def server_receive_keys(st: ServerState, sender: int, c_pk: bytes, s_pk: bytes) -> None:
    st.expect(Stage.ADVERTISE, sender, st.keys)
    if len(c_pk) != KEY_BYTES or len(s_pk) != KEY_BYTES:
        raise ProtocolViolation(f"public keys from client {sender} must be {KEY_BYTES} bytes each")
    if c_pk == s_pk:
        raise ProtocolViolation(f"client {sender} advertised the same key twice")
    st.keys[sender] = (c_pk, s_pk)


def server_keys_for(st: ServerState, client: int) -> dict[int, tuple[bytes, bytes]]:
    """Stage 2 input for ``client``: public keys of its neighbours that advertised."""
    return {j: st.keys[j] for j in st.cfg.neighbours[client] if j in st.keys}


def server_receive_shares(st: ServerState, sender: int, ciphertexts: Mapping[int, bytes]) -> None:
    st.expect(Stage.SHARE, sender, st.shared)
    _check_sender(st.keys, sender, "shares")
    expected = set(server_keys_for(st, sender))
    if set(ciphertexts) != expected:
        raise ProtocolViolation(f"client {sender} sent shares for {sorted(ciphertexts)}, expected {sorted(expected)}")
    if any(len(ct) != CIPHER_BYTES for ct in ciphertexts.values()):
        raise ProtocolViolation(f"client {sender} sent an encrypted share of the wrong size")
    for j, ct in ciphertexts.items():
        st.routed.setdefault(j, {})[sender] = bytes(ct)
    st.shared.add(sender)


def server_shares_for(st: ServerState, client: int) -> dict[int, bytes]:
    """Stage 3 input for ``client``: ciphertexts addressed to it by neighbours that completed stage 2."""
    return {j: ct for j, ct in st.routed.get(client, {}).items() if j in st.shared}


def server_receive_masked(st: ServerState, sender: int, y: np.ndarray) -> None:
    st.expect(Stage.MASKED, sender, st.inputs)
    _check_sender(st.shared, sender, "masked input")
    cfg = st.cfg
    if not isinstance(y, np.ndarray) or y.dtype != cfg.dtype or y.shape != (cfg.size,):
        got = f"{getattr(y, 'dtype', type(y).__name__)} {getattr(y, 'shape', '')}"
        raise ProtocolViolation(f"masked input from {sender} must be {cfg.dtype.__name__} ({cfg.size},), got {got}")
    if st.masked_sum is None:
        st.masked_sum = y.copy()
    else:
        st.masked_sum += y
    st.inputs.add(sender)


def server_survivors(st: ServerState) -> tuple[int, ...]:
    """Stage 4 input for every client: whose masked input arrived (U3)."""
    return tuple(sorted(st.inputs))


def server_receive_unmask(
    st: ServerState, sender: int, b_shares: Mapping[int, bytes], s_shares: Mapping[int, bytes]
) -> None:
    st.expect(Stage.UNMASK, sender, st.unmasked)
    _check_sender(st.inputs, sender, "unmask shares")
    if set(b_shares) & set(s_shares):
        raise ProtocolViolation(f"client {sender} revealed both shares of the same peer")
    if not set(b_shares) <= st.inputs or set(s_shares) & st.inputs:
        raise ProtocolViolation(f"client {sender} revealed shares inconsistent with the survivor list")
    for owner, share in b_shares.items():
        st.b_shares.setdefault(owner, {})[sender] = bytes(share)
    for owner, share in s_shares.items():
        st.s_shares.setdefault(owner, {})[sender] = bytes(share)
    st.unmasked.add(sender)


def server_sum(st: ServerState) -> np.ndarray:
    """Stage 5: remove survivors' self masks and dropped clients' pairwise masks from the running sum."""
    st.close(Stage.UNMASK, len(st.unmasked))
    cfg = st.cfg
    assert st.masked_sum is not None  # close(MASKED) guaranteed >= threshold inputs
    total = st.masked_sum.copy()
    for j in sorted(st.inputs):
        seed = _rebuild(st.b_shares.get(j, {}), cfg.threshold, f"self-mask seed of client {j}")
        add_keystream(_self_mask_key(cfg, seed, j), total, subtract=True)
    for j in sorted(st.shared - st.inputs):  # shared keys, then vanished before sending its input
        raw = _rebuild(st.s_shares.get(j, {}), cfg.threshold, f"mask key of dropped client {j}")
        s_key = X25519PrivateKey.from_private_bytes(raw)
        for k in cfg.neighbours[j]:
            if k in st.inputs:  # k added sign(k, j) PRG(s_kj); take it out
                add_keystream(_pair_mask_key(cfg, s_key, st.keys[k][1], k, j), total, subtract=k < j)
    st.stage = Stage.DONE
    return total


def _rebuild(shares: Mapping[int, bytes], threshold: int, what: str) -> bytes:
    if len(shares) < threshold:
        raise TooFewSurvivors(f"cannot rebuild the {what}: {len(shares)} shares arrived, threshold {threshold}")
    try:
        return shamir.combine(shares, threshold)
    except shamir.ShareError as exc:
        raise ProtocolViolation(f"cannot rebuild the {what}: {exc}") from None
