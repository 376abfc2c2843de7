"""Masked aggregation over many rounds: keys once per session, two exchanges per round.

    session setup (once per node):  node -> server   long-term public keys (c: encrypts shares, s: agrees masks)
    every round t:   train   server -> node   round config + neighbours' public keys
                             node -> server   y_i, encrypted shares of its round secrets, share commitments
                     unmask  server -> node   survivors S + the encrypted shares addressed to this node
                             node -> server   the shares S needs
                     the server sums the y_i of S and removes what is left of the masks

Client i in round t of session ``sid`` (neighbours N(i), holders H(i) = N(i) + {i}, threshold t) sends

    y_i = x_i + PRG(b_i) + sum_{j in N(i)} sign(i, j) PRG(p_ij)   (mod 2^k),   sign = +1 if i < j else -1
    p_ij = HKDF(DH(s_i, s_j), sid | t | "pair" | min(i,j) | max(i,j))          b_i: fresh random, every round

and, in the same reply, Shamir shares (threshold t over H(i)) of b_i and of every p_ij, each holder's shares
AEAD-encrypted under HKDF(DH(c_i, c_h), sid | t | i | h), plus a 16-byte hash commitment of every share.
Pairwise masks of two survivors cancel. At unmask each survivor h in S reveals, for every owner i in S whose
shares it holds, the share of b_i and the shares of p_ij for the neighbours j of i outside S; the server checks
each share against its commitment (a bad share costs that share, not the round), rebuilds b_i and those p_ij
from any t good shares and removes them. Earlier designs (Bonawitz et al. 2017) make fresh keys every round
(four exchanges) and rebuild a dropped client's whole mask key; Flamingo (S&P 2023) keeps keys across rounds and
ships the shares with the masked input. Here the long-term private keys never leave the node, are never
shared, and no dropout pattern ever needs them: only round-bound seeds are revealed, so no key has to be rotated
after a dropout. A session is one server run (the server draws its id); a node that lost its keys is re-keyed.

What the server learns (honest-but-curious server: it follows the protocol and reports S truthfully):
- the sum over S and nothing finer when S is connected in the round graph (SecAgg+ sparse graphs: the sum of
  each connected component of S, as in Bell et al. 2020; the random graph is connected w.h.p.). For i in S every
  revealed value is b_i or p_ij with j outside S; the masks p_ik with k in N(i) & S stay secret, and a holder
  refuses unless t >= 2 of H(i) are in S, so i has a surviving neighbour;
- nothing about a client outside S, including one whose y arrives late: nobody ever reveals a share of b_j for
  j outside S, so y_j stays one-time padded by PRG(b_j), whatever pair seeds of j were revealed;
- nothing about another round: every seed is bound to (sid, round) by HKDF, b_i is fresh, and a node masks at
  most once per (sid, round) and answers at most one unmask per round, so no seed is ever used twice.
A server that lies (different survivor lists to different nodes, a graph of its choosing, substituted public
keys) is outside this guarantee: nothing binds a node's public key to that node (no PKI), so such a server can
give a client fake neighbours and unmask it. Nodes still refuse what would make lying cheap: a threshold of at
most half their holders, a survivor list that omits them, is shorter than t, or leaves fewer than t of an
owner's holders, a second unmask of a round, a plain train request once they mask in the run. For the complete
graph these rules alone stop the survivor-list lie: isolating x_i needs b_i and every p_ik, a holder never
reveals a share of its own pair seed with i and marks at most |H| - t others as dropped, and
(|H| - 1) t > |H| (|H| - t) whenever t > |H| / 2; but the nodes do not insist on the complete graph. A
malicious-server guarantee needs authenticated keys and signed survivor lists (Bonawitz et al. Sec. 4).
A client can always corrupt the sum with a wrong y (nothing here checks inputs); ``quantize.decode`` refuses sums
no honest clients could produce.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from securemark.prg import add_keystream, hkdf
from securemark.secagg import shamir

KEY_BYTES = 32
NONCE_BYTES = 12
COMMIT_BYTES = 16
_ENTRY = 4 + shamir.SHARE_BYTES  # label + share inside a ciphertext
B_LABEL = 0  # the label of b_i; a pair seed p_ij is labelled j (ids are >= 1)


class SecAggError(RuntimeError):
    """Base of every protocol error; the message says what was rejected and why."""


class StageError(SecAggError):
    """A message for a round this party is not in (no keys, a replayed or repeated round, an unmask twice)."""


class ProtocolViolation(SecAggError):
    """A message from an unknown sender, a duplicate, or of the wrong size, dtype or content."""


class ShareAuthError(SecAggError):
    """An encrypted share failed authentication: tampered, replayed from another round, or misaddressed."""


class TooFewSurvivors(SecAggError):
    """Fewer than the threshold answered: the sum cannot (and must not) be unmasked."""


class BadOwner(ProtocolViolation):
    """A survivor's shares could not be opened by its holders and its secrets cannot be rebuilt: that client
    sent garbage (the round fails; the caller should not admit it again)."""

    def __init__(self, client: int, why: str) -> None:
        super().__init__(why)
        self.client = client


# --- keys ------------------------------------------------------------------------------------------------------
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
    """A node's long-term keys for one session, and the last round it masked (rounds only go forward)."""

    session: str
    id: int
    c_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    s_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    last_round: int = -1
    open_round: int | None = None  # masked, not yet unmasked

    def public(self) -> tuple[bytes, bytes]:
        return public_bytes(self.c_key), public_bytes(self.s_key)


# --- round configuration and graphs -------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundConfig:
    session: str
    round: int
    neighbours: Mapping[int, tuple[int, ...]]  # client id (>= 1, stable in the session) -> neighbours; symmetric
    threshold: int  # shares needed to rebuild a secret (and the fewest survivors that may be unmasked)
    size: int  # length of the integer vectors
    modulus_bits: int = 64

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
        """Binds a derived key, associated data or a commitment to this session, round, purpose and pair."""
        return f"securemark/secagg/v2|{self.session}|{self.round}|{purpose}|{a}|{b}".encode()

    def check_safe_threshold(self, i: int) -> None:
        """A node's refusal of a threshold a lying server could exploit: at most half of H(i)."""
        m = len(self.holders(i))
        if not m / 2 < self.threshold <= m:
            raise ProtocolViolation(
                f"threshold {self.threshold} is unsafe for {m} holders: it must exceed half of them ({m / 2:g})"
            )


def complete_graph(clients: Sequence[int]) -> dict[int, tuple[int, ...]]:
    """SecAgg: everyone is everyone's neighbour."""
    return {i: tuple(j for j in clients if j != i) for i in clients}


def sparse_degree(n: int) -> int:
    """An even degree k = O(log n) (about 2 log2 n), capped by the complete graph."""
    k = 2 * math.ceil(math.log2(max(n, 2)))
    return min(k + k % 2, n - 1 if (n - 1) % 2 == 0 else n - 2) if n > 2 else n - 1


def harary_graph(clients: Sequence[int], k: int, rng: np.random.Generator) -> dict[int, tuple[int, ...]]:
    """SecAgg+: a random k-regular graph (a Harary ring over a random order; k even).

    The graph is public: the server draws it and sends each client the round's graph.
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
    """The round's graph and threshold, a strict majority of each holder set (neighbourhood + self).

    ``complete`` is SecAgg; ``sparse`` is SecAgg+'s random k-regular graph, which for 4 clients or fewer
    would be no sparser than complete in any useful sense, so they get the complete graph.
    """
    if kind not in ("complete", "sparse"):
        raise ValueError(f"graph must be 'complete' or 'sparse', got {kind!r}")
    if kind == "sparse" and len(clients) > 4:
        k = sparse_degree(len(clients))
        return harary_graph(clients, k, rng), k // 2 + 1
    return complete_graph(clients), len(clients) // 2 + 1


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


def _check_sender(known: Collection[int], sender: int, what: str) -> None:
    if sender not in known:
        raise ProtocolViolation(f"{what} from unknown or unexpected client {sender!r}")


def _check_peer_keys(cfg: RoundConfig, me: int, peer_keys: Mapping[int, tuple[bytes, bytes]]) -> None:
    if set(peer_keys) != set(cfg.neighbours[me]):
        raise ProtocolViolation(f"client {me} needs the public keys of exactly its neighbours")
    for j, (c_pk, s_pk) in peer_keys.items():
        if len(c_pk) != KEY_BYTES or len(s_pk) != KEY_BYTES:
            raise ProtocolViolation(f"public keys of client {j} must be {KEY_BYTES} bytes each")


# --- client ---------------------------------------------------------------------------------------------------
@dataclass
class MaskedInput:
    y: np.ndarray
    ciphertexts: dict[int, bytes]  # holder -> its shares of this owner's round secrets (the owner's own included)
    commitments: bytes  # |H(i)| x |labels| commitments, holders and labels in ``RoundConfig`` order


def client_masked_input(
    keys: NodeKeys, cfg: RoundConfig, peer_keys: Mapping[int, tuple[bytes, bytes]], x: np.ndarray
) -> MaskedInput:
    """The train step: mask ``x`` and share this round's secrets; at most once per (session, round)."""
    i = keys.id
    if cfg.session != keys.session or i not in cfg.neighbours:
        raise StageError(f"client {i}: round config of another session, or not naming this client")
    if cfg.round <= keys.last_round:
        raise StageError(f"client {i}: round {cfg.round} is not after round {keys.last_round}; masking refused")
    cfg.check_safe_threshold(i)
    _check_peer_keys(cfg, i, peer_keys)
    x = np.asarray(x)
    if x.dtype != cfg.dtype or x.shape != (cfg.size,):
        raise ProtocolViolation(f"input must be {cfg.dtype.__name__} of shape ({cfg.size},), got {x.dtype} {x.shape}")
    seed = os.urandom(KEY_BYTES)
    pairs = {j: _pair_seed(cfg, keys.s_key, peer_keys[j][1], i, j) for j in sorted(cfg.neighbours[i])}
    y = x.copy()
    add_keystream(_self_mask_key(cfg, seed, i), y)  # unsigned arithmetic wraps: exactly mod 2^k
    for j, p in pairs.items():
        add_keystream(p, y, subtract=i > j)
    holders, labels = cfg.holders(i), cfg.labels(i)
    secrets = {B_LABEL: seed, **pairs}
    shares = {label: shamir.split(secrets[label], holders, cfg.threshold) for label in labels}
    peer_c = {**{j: k[0] for j, k in peer_keys.items()}, i: keys.public()[0]}
    cts, commits = {}, []
    for h in holders:
        entries = b"".join(struct.pack(">I", lb) + shares[lb][h] for lb in labels)
        plain = struct.pack(">III", i, h, len(labels)) + entries
        nonce = os.urandom(NONCE_BYTES)
        aead = ChaCha20Poly1305(_share_key(cfg, keys.c_key, peer_c[h], i, h))
        cts[h] = nonce + aead.encrypt(nonce, plain, cfg.context("share-ad", i, h))
        commits += [commitment(cfg, i, lb, h, shares[lb][h]) for lb in labels]
    keys.last_round, keys.open_round = cfg.round, cfg.round
    return MaskedInput(y, cts, b"".join(commits))


def client_unmask(
    keys: NodeKeys,
    cfg: RoundConfig,
    peer_keys: Mapping[int, tuple[bytes, bytes]],
    survivors: Sequence[int],
    ciphertexts: Mapping[int, bytes],
) -> tuple[dict[tuple[int, int], bytes], list[int]]:
    """The unmask step, once per round: ({(owner, label): share} for what the survivors' sum needs, the owners
    whose shares failed authentication). A bad ciphertext costs only its owner's shares from this node."""
    i = keys.id
    if keys.open_round != cfg.round or cfg.session != keys.session:
        raise StageError(f"client {i}: no masked input of round {cfg.round} waiting to be unmasked")
    alive = set(survivors)
    if len(alive) != len(survivors) or not alive <= set(cfg.neighbours):
        raise ProtocolViolation(f"client {i}: the survivor list names unknown or repeated clients")
    if i not in alive:
        raise ProtocolViolation(f"client {i}: the survivor list omits this client; refusing to reveal anything")
    if len(alive) < cfg.threshold:
        raise TooFewSurvivors(f"client {i}: {len(alive)} inputs arrived, threshold {cfg.threshold}: refusing")
    _check_peer_keys(cfg, i, peer_keys)
    peer_c = {**{j: k[0] for j, k in peer_keys.items()}, i: keys.public()[0]}
    keys.open_round = None  # one unmask per round, whatever happens next
    for owner in ciphertexts:
        if owner not in peer_c or owner not in alive:
            raise ProtocolViolation(f"client {i}: got shares of client {owner}, not a surviving neighbour or itself")
        cfg.check_safe_threshold(owner)
        if len(alive & set(cfg.holders(owner))) < cfg.threshold:
            raise TooFewSurvivors(f"client {i}: fewer than {cfg.threshold} holders of client {owner} survived")
    out: dict[tuple[int, int], bytes] = {}
    bad = []
    for owner, ct in sorted(ciphertexts.items()):
        try:
            shares = _open(cfg, keys, peer_c[owner], owner, ct)
        except ShareAuthError:
            bad.append(owner)
            continue
        for label, share in shares.items():
            if label == B_LABEL or label not in alive:  # b of a survivor; a pair seed with a dropped neighbour
                out[owner, label] = share
    return out, bad


def _open(cfg: RoundConfig, keys: NodeKeys, owner_c: bytes, owner: int, ct: bytes) -> dict[int, bytes]:
    i = keys.id
    if not isinstance(ct, bytes) or len(ct) < NONCE_BYTES + 12:
        raise ShareAuthError(f"client {i}: the shares of client {owner} are malformed")
    aead = ChaCha20Poly1305(_share_key(cfg, keys.c_key, owner_c, owner, i))
    try:
        plain = aead.decrypt(ct[:NONCE_BYTES], ct[NONCE_BYTES:], cfg.context("share-ad", owner, i))
    except InvalidTag:
        raise ShareAuthError(
            f"client {i}: the shares of client {owner} failed authentication (tampered, replayed or misaddressed)"
        ) from None
    labels = cfg.labels(owner)
    if plain[:12] != struct.pack(">III", owner, i, len(labels)) or len(plain) != 12 + len(labels) * _ENTRY:
        raise ShareAuthError(f"client {i}: the shares of client {owner} name another sender, receiver or layout")
    out = {}
    for n, label in enumerate(labels):
        entry = plain[12 + n * _ENTRY : 12 + (n + 1) * _ENTRY]
        if struct.unpack(">I", entry[:4])[0] != label:
            raise ShareAuthError(f"client {i}: the shares of client {owner} are not of this round's secrets")
        out[label] = entry[4:]
    return out


# --- server ---------------------------------------------------------------------------------------------------
@dataclass
class SessionKeys:
    """The server's view of a session: every node's long-term public keys (checked once, at setup)."""

    session: str
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)

    def register(self, node: int, c_pk: object, s_pk: object) -> None:
        """A node's (new) keys; a node that lost its keys registers again and replaces them."""
        c = check_public_key(c_pk, f"encryption key of client {node}")
        s = check_public_key(s_pk, f"mask key of client {node}")
        if c == s:
            raise ProtocolViolation(f"client {node} advertised the same key twice")
        taken = {k for other, pair in self.keys.items() if other != node for k in pair}  # keys are canonical
        if c in taken or s in taken:
            raise ProtocolViolation(f"client {node} advertised another client's public key")
        self.keys[node] = (c, s)

    def forget(self, node: int) -> None:
        self.keys.pop(node, None)

    def for_client(self, cfg: RoundConfig, i: int) -> dict[int, tuple[bytes, bytes]]:
        return {j: self.keys[j] for j in cfg.neighbours[i]}


@dataclass
class ServerRound:
    cfg: RoundConfig
    masked_sum: np.ndarray | None = field(default=None, repr=False)  # running sum of masked inputs only
    inputs: set[int] = field(default_factory=set)  # S
    routed: dict[int, dict[int, bytes]] = field(default_factory=dict, repr=False)  # holder -> owner -> ciphertext
    commits: dict[int, bytes] = field(default_factory=dict, repr=False)  # owner -> commitments
    shares: dict[tuple[int, int], dict[int, bytes]] = field(default_factory=dict, repr=False)  # (owner,label)->h->
    answered: set[int] = field(default_factory=set)
    closed: bool = False
    rejected: list[str] = field(default_factory=list)  # shares that failed their commitment, with the holder
    complaints: dict[int, set[int]] = field(default_factory=dict)  # owner -> holders that could not open its shares


def server_receive_masked(st: ServerRound, sender: int, m: MaskedInput) -> None:
    """A train reply: checked completely before anything is kept, so a malformed one changes nothing."""
    cfg = st.cfg
    if st.closed:
        raise StageError(f"masked input from {sender} after the survivors were fixed (late: not counted)")
    _check_sender(cfg.neighbours, sender, "masked input")
    if sender in st.inputs:
        raise ProtocolViolation(f"duplicate masked input from client {sender}")
    y = m.y
    if not isinstance(y, np.ndarray) or y.dtype != cfg.dtype or y.shape != (cfg.size,):
        got = f"{getattr(y, 'dtype', type(y).__name__)} {getattr(y, 'shape', '')}"
        raise ProtocolViolation(f"masked input from {sender} must be {cfg.dtype.__name__} ({cfg.size},), got {got}")
    holders, labels = cfg.holders(sender), cfg.labels(sender)
    size = NONCE_BYTES + 12 + len(labels) * _ENTRY + 16
    if set(m.ciphertexts) != set(holders) or any(
        not isinstance(c, bytes) or len(c) != size for c in m.ciphertexts.values()
    ):
        raise ProtocolViolation(f"client {sender} must send one {size}-byte ciphertext per holder {list(holders)}")
    if not isinstance(m.commitments, bytes) or len(m.commitments) != len(holders) * len(labels) * COMMIT_BYTES:
        raise ProtocolViolation(f"client {sender} sent commitments of the wrong size")
    if st.masked_sum is None:
        st.masked_sum = y.copy()
    else:
        st.masked_sum += y
    st.inputs.add(sender)
    st.commits[sender] = m.commitments
    for h, ct in m.ciphertexts.items():
        st.routed.setdefault(h, {})[sender] = ct


def server_close_inputs(st: ServerRound) -> tuple[int, ...]:
    """Fix S (later inputs are refused); below the threshold the round fails loudly."""
    if len(st.inputs) < st.cfg.threshold:
        raise TooFewSurvivors(f"{len(st.inputs)} masked inputs arrived, threshold is {st.cfg.threshold}")
    st.closed = True
    return tuple(sorted(st.inputs))


def server_shares_for(st: ServerRound, holder: int) -> dict[int, bytes]:
    """The unmask request of ``holder``: ciphertexts addressed to it by survivors."""
    return {o: ct for o, ct in st.routed.get(holder, {}).items() if o in st.inputs}


def server_receive_unmask(
    st: ServerRound, sender: int, reveals: Mapping[tuple[int, int], bytes], bad: Collection[int] = ()
) -> None:
    """An unmask reply. A share that fails its commitment is dropped and recorded; the rest are kept. ``bad``:
    owners whose ciphertexts this holder could not open (recorded: an owner that cannot be rebuilt and has
    complaints is named in the error)."""
    cfg = st.cfg
    if not st.closed:
        raise StageError(f"unmask reply from {sender} before the survivors were fixed")
    _check_sender(st.inputs, sender, "unmask reply")
    if sender in st.answered:
        raise ProtocolViolation(f"duplicate unmask reply from client {sender}")
    for owner, label in reveals:
        if owner not in st.inputs or sender not in cfg.holders(owner) or label not in cfg.labels(owner):
            raise ProtocolViolation(f"client {sender} revealed a share ({owner}, {label}) it cannot hold")
        if label != B_LABEL and label in st.inputs:
            raise ProtocolViolation(f"client {sender} revealed the pair seed of two survivors ({owner}, {label})")
    st.answered.add(sender)
    for owner in bad:
        if owner in st.inputs:
            st.complaints.setdefault(owner, set()).add(sender)
    for (owner, label), share in reveals.items():
        pos = cfg.holders(owner).index(sender) * len(cfg.labels(owner)) + cfg.labels(owner).index(label)
        expected = st.commits[owner][pos * COMMIT_BYTES : (pos + 1) * COMMIT_BYTES]
        if not isinstance(share, bytes) or commitment(cfg, owner, label, sender, share) != expected:
            st.rejected.append(f"share ({owner}, {label}) from client {sender} fails its commitment")
            continue
        st.shares.setdefault((owner, label), {})[sender] = share


def server_sum(st: ServerRound) -> np.ndarray:
    """The sum over S: survivors' self masks and their pair masks with dropped neighbours removed."""
    cfg = st.cfg
    if not st.closed or st.masked_sum is None:
        raise StageError("the survivors are not fixed yet")
    total = st.masked_sum.copy()
    for i in sorted(st.inputs):
        if len(st.shares.get((i, B_LABEL), {})) < cfg.threshold and len(st.complaints.get(i, ())) >= cfg.threshold:
            # t holders (more than half of its holders) could not open them: fewer than t cannot frame it
            raise BadOwner(i, f"{len(st.complaints[i])} holders could not open the shares of client {i}")
        seed = _rebuild(i, st.shares.get((i, B_LABEL), {}), cfg.threshold, f"self-mask seed of client {i}")
        add_keystream(_self_mask_key(cfg, seed, i), total, subtract=True)
        for j in sorted(set(cfg.neighbours[i]) - st.inputs):  # i added sign(i, j) PRG(p_ij); take it out
            p = _rebuild(i, st.shares.get((i, j), {}), cfg.threshold, f"pair seed of clients {i} and {j}")
            add_keystream(p, total, subtract=i < j)
    return total


def _rebuild(owner: int, shares: Mapping[int, bytes], threshold: int, what: str) -> bytes:
    if len(shares) < threshold:
        raise TooFewSurvivors(f"cannot rebuild the {what}: {len(shares)} good shares arrived, threshold {threshold}")
    try:
        return shamir.combine(shares, threshold)
    except shamir.ShareError as exc:  # every share matched the owner's own commitment: the owner dealt them badly
        raise BadOwner(owner, f"cannot rebuild the {what}: {exc} (client {owner} shared inconsistent values)") from None
