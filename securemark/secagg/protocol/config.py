"""One round's public configuration: session, round, neighbour graph, threshold, vector layout, encoding
digest, the clients' groups and, under the malicious-server threat, the roster members the clients are; checked
on construction; the holders and labels of each owner's shares; and the context string that binds every derived
key, associated data and commitment to all of it, so two nodes told different configurations never cancel."""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from securemark.secagg.protocol.errors import ProtocolViolation

B_LABEL = 0  # the label of b_i; a pair seed p_ij is labelled j (ids are >= 1)
SIGNERS = 2 / 3  # the least share of a signed round's clients whose signatures a node needs before it reveals


def signers_needed(n: int, threshold: int, share: float = SIGNERS) -> int:
    """The signatures of its survivor list a node of a signed round of ``n`` clients needs before it reveals:
    ``share`` of them (two thirds at least), the threshold and a majority at least, all of them at most."""
    return min(n, max(threshold, n // 2 + 1, math.ceil(max(share, SIGNERS) * n - 1e-9)))


@dataclass(frozen=True)
class RoundConfig:
    session: str
    round: int
    neighbours: Mapping[int, tuple[int, ...]]  # client id (>= 1, stable in the session) -> neighbours; symmetric
    threshold: int  # shares needed to rebuild a secret (and the fewest survivors that may be unmasked)
    size: int  # length of the integer vectors
    modulus_bits: int = 64
    encoding: bytes = b""  # digest of how inputs are encoded (quantize.QuantConfig.digest), bound into every key
    # the round's clients partitioned into the session's fixed groups (each sorted; () = every client alone): a
    # round holds whole groups and only whole groups are summed (``secagg.groups`` says why)
    groups: tuple[tuple[int, ...], ...] = ()
    # under secagg.threat = "malicious" (``signing``; all empty under the semi-honest threat): the roster's digest,
    # each client's member in it, the signatures of the survivor list a node needs before it reveals, every
    # client's session keys (fresh each run: no signature of another run ever matches) and the digest of the
    # training configuration every node was sent; all signed by every node, all bound into every key
    roster: bytes = b""
    members: tuple[tuple[int, str], ...] = ()
    signers: int = 0
    keys: tuple[tuple[int, bytes, bytes], ...] = ()  # (client, c_pk, s_pk)
    train: bytes = b""

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
        if all(len(g) == 1 for g in self.groups):
            object.__setattr__(self, "groups", ())  # every client alone: one spelling, one digest
        members = [i for g in self.groups for i in g]
        if self.groups and (sorted(members) != sorted(ids) or any(list(g) != sorted(g) for g in self.groups)):
            raise ValueError("the groups must split the round's clients into sorted, disjoint sets covering them all")
        if self.roster or self.members or self.signers or self.keys or self.train:
            self._check_signed(ids)
        for g in self.groups:  # a clique: any survivors' component holds whole groups, so no sum splits one
            if any(not set(g) - {i} <= set(self.neighbours[i]) for i in g):
                raise ValueError(f"the group {list(g)} must be a clique of the round's graph (every member every "
                                 "other's neighbour)")  # fmt: skip

    def _check_signed(self, ids: set[int]) -> None:
        """A round of the malicious threat: members and keys of exactly its clients, one member one client, the
        complete graph (a server choosing a sparse one could give a node a single neighbour that works with it),
        and at least ``SIGNERS`` of the clients' signatures (fewer let members working with the server pass
        two survivor lists)."""
        names, n = [m for _, m in self.members], len(ids)
        if len(self.roster) != 32 or len(self.train) != 32 or sorted(i for i, _ in self.members) != sorted(ids):
            raise ValueError("a signed round needs 32-byte roster and train digests and a member for every client")
        if len(set(names)) != len(names) or not all(isinstance(m, str) and m for m in names):
            raise ValueError("the round's roster members must be distinct names (one member, one client)")
        if sorted(i for i, _, _ in self.keys) != sorted(ids) or any(
            len(c) != 32 or len(k) != 32 for _, c, k in self.keys
        ):
            raise ValueError("a signed round names every client's two 32-byte session keys")
        if any(len(self.neighbours[i]) != n - 1 for i in ids):
            raise ValueError("a signed round takes the complete graph (every client every other's neighbour)")
        floor = signers_needed(n, self.threshold)
        if not floor <= self.signers <= n:
            raise ValueError(f"signers {self.signers} must lie in [{floor}, {n}]: the threshold and two thirds of "
                             "the round's clients at least")  # fmt: skip
        object.__setattr__(self, "members", tuple(sorted(self.members)))
        object.__setattr__(self, "keys", tuple(sorted(self.keys)))

    def group_of(self, i: int) -> tuple[int, ...]:
        """The clients of i's group in this round (i alone when the round has no groups)."""
        return next((g for g in self.groups if i in g), (i,))

    def whole_groups(self, clients: set[int]) -> bool:
        """Whether ``clients`` is a union of whole groups of this round."""
        return all(set(self.group_of(i)) <= clients for i in clients)

    @property
    def malicious(self) -> bool:
        """A round of the malicious-server threat: keys signed, survivors signed before anything is revealed."""
        return bool(self.roster)

    def member(self, i: int) -> str:
        return self._member_of[i]

    @functools.cached_property
    def _member_of(self) -> dict[int, str]:
        return dict(self.members)

    @functools.cached_property
    def digest(self) -> bytes:
        """32 bytes naming everything here: what nodes sign and what every key of the round is bound to."""
        graph = [[i, sorted(self.neighbours[i])] for i in self.clients]
        text = repr((self.session, self.round, graph, self.threshold, self.size, self.modulus_bits,
                     self.encoding.hex(), self.groups, self.roster.hex(), self.members, self.signers,
                     [(i, c.hex(), k.hex()) for i, c, k in self.keys], self.train.hex()))  # fmt: skip
        return hashlib.sha256(b"securemark/secagg/round/v5|" + text.encode()).digest()

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
        """Binds a derived key, associated data or a commitment to this whole configuration (``digest``), purpose
        and pair: two nodes told different encodings (a lying server's per-node quantization ranges), groups,
        graphs or thresholds derive different pair seeds, so their masks never cancel and their sum stays padded."""
        return f"securemark/secagg/v5|{self.session}|{self.round}|{self.digest.hex()}|{purpose}|{a}|{b}".encode()

    def check_safe_threshold(self, i: int) -> None:
        """A node's refusal of a threshold a lying server could exploit: at most half of H(i)."""
        m = len(self.holders(i))
        if not m / 2 < self.threshold <= m:
            raise ProtocolViolation(
                f"threshold {self.threshold} is unsafe for {m} holders: it must exceed half of them ({m / 2:g})"
            )
