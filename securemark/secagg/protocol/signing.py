"""What nodes sign under ``secagg.threat = "malicious"``, and the checks that keep a lying server from using it.

Two statements, each signed with a member's long-term Ed25519 key (``securemark.secagg.roster``) and checked by
every node against the roster it got from the owner, never from the server:

    advert      roster digest | session | client id | c_pk | s_pk     once a session, in the node's hello
    survivors   the round's configuration digest | S                   once a round, before anything is revealed

A node masks with a neighbour's keys only under that neighbour's advert: the server signs nothing, so it can
neither swap a key nor make up a neighbour, and the round's members are distinct (one member, one client).
The round's configuration (``RoundConfig.digest``, bound into every key the round derives) holds everything a
server could tell nodes differently: the complete graph (a server choosing a sparse graph could give a node a
single neighbour that works with it), threshold, encoding with its ranges, bits and weight cap, groups, members,
the signatures needed, every client's session keys (fresh each run: a node checks its own and its neighbours',
so no statement of another run ever matches one of this run, though Ed25519 signs alike twice), and the digest
of the training configuration sent (a node checks it against what it received: a learning rate of 0 for all
but one node would make the sum that node's update). Between its masked input and its unmask a node signs the
survivor list S with that digest, one S a round, and reveals shares only when shown valid signatures of the
same statement from ``cfg.signers`` distinct members of S, m >= max(threshold, ceil(2n / 3)) of the round's n.

Honest members sign one statement a round and a signature counts only from a member of the list it signs, so
two different statements (two lists, or one list under two configurations) that each gather m signatures need
2m - n members that sign both. With fewer members working with the server, every node that reveals saw one S
and one configuration: no node's shares of b_i go out while others' shares of its pair seeds do (both kinds of
one node), and a node told another configuration finds no m signatures of its own and reveals nothing. Apart
from lying, t members holding shares of a node can always rebuild its secrets, as in any threshold scheme, so
the guarantee holds while fewer than min(t, 2m - n) of a round's members work with the server (n = 10: t = 6,
m = 7, at most 3). Who is in a round is the server's choice: a round of one honest node among members working
with the server is outside any such bound, as in every secure aggregation.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securemark.secagg.protocol.config import RoundConfig
from securemark.secagg.protocol.errors import ProtocolViolation, SignatureError, StageError
from securemark.secagg.protocol.keys import NodeKeys
from securemark.secagg.roster import Roster


@dataclass(frozen=True)
class Signer:
    """A node's signing key, the roster it trusts, and its own member name in it."""

    roster: Roster
    key: Ed25519PrivateKey

    @property
    def member(self) -> str:
        return self.roster.member_of(self.key)

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)


def advert(roster: bytes, session: str, client: int, c_pk: bytes, s_pk: bytes) -> bytes:
    """The statement a member signs for its masking keys of a session."""
    return b"securemark/secagg/advert/v1|" + roster + f"|{session}|{client}|".encode() + c_pk + s_pk


def survivors_statement(cfg: RoundConfig, survivors: Sequence[int]) -> bytes:
    """The statement every survivor signs before any node reveals: this configuration and this survivor list."""
    ids = sorted(survivors)
    return b"securemark/secagg/survivors/v1|" + cfg.digest + struct.pack(f">{len(ids)}I", *ids)


def check_member(cfg: RoundConfig, signer: Signer, me: int) -> None:
    """A node's checks of a malicious-threat round: its own roster and member, distinct members in the roster."""
    if not cfg.malicious:
        raise SignatureError(f"client {me}: this node signs its rounds (secagg.threat = malicious); a round "
                             "without signatures is refused")  # fmt: skip
    if cfg.roster != signer.roster.digest:
        raise SignatureError(f"client {me}: the round names another roster than this node's (rotated, or not the "
                             "owner's)")  # fmt: skip
    if cfg.member(me) != signer.member:
        raise SignatureError(f"client {me}: the round names it {cfg.member(me)!r}; this node is {signer.member!r}")
    unknown = [m for _, m in cfg.members if m not in signer.roster.members]
    if unknown:
        raise SignatureError(f"client {me}: the round names {unknown[0]!r}, who is not in this node's roster")


def check_adverts(
    cfg: RoundConfig,
    signer: Signer,
    peer_keys: Mapping[int, tuple[bytes, bytes]],
    adverts: Mapping[int, bytes],
    keys: NodeKeys,
) -> None:
    """Every neighbour's masking keys under its member's signature (else the server swapped or made them up), and
    the round naming the keys this node and its neighbours hold now: its statement names this run's fresh keys,
    so no signature from another run (the same session name, ids and round) ever counts in this one."""
    me = keys.id
    check_member(cfg, signer, me)
    named = {i: (c, s) for i, c, s in cfg.keys}
    if named[me] != keys.public() or any(named[j] != k for j, k in peer_keys.items()):
        raise SignatureError(f"client {me}: the round names other session keys than this node's or its "
                             "neighbours' (a round of another run?); refused")  # fmt: skip
    for j, (c_pk, s_pk) in peer_keys.items():
        statement = advert(cfg.roster, cfg.session, j, c_pk, s_pk)
        if not signer.roster.verify(cfg.member(j), adverts.get(j), statement):
            raise SignatureError(f"client {me}: the keys of client {j} ({cfg.member(j)!r}) are not signed by that "
                                 "member: swapped or made up by the server; refusing the round")  # fmt: skip


def sign_survivors(keys: NodeKeys, cfg: RoundConfig, signer: Signer, survivors: Sequence[int]) -> bytes:
    """This node's signature of (configuration, S), once per round: a second, different S is refused (a node
    that signed two would let the server show different nodes different survivors)."""
    i, alive = keys.id, sorted(set(survivors))
    if keys.open_round != cfg.round or cfg.session != keys.session or keys.masked != cfg.digest:
        raise StageError(f"client {i}: no masked input of this round {cfg.round} and configuration waiting")
    if len(alive) != len(survivors) or not set(alive) <= set(cfg.clients) or i not in alive:
        raise ProtocolViolation(f"client {i}: the survivor list names unknown or repeated clients, or omits this one")
    if len(alive) < cfg.signers:
        raise ProtocolViolation(f"client {i}: {len(alive)} survivors cannot gather the {cfg.signers} signatures "
                                "this round needs")  # fmt: skip
    if keys.signed is not None and keys.signed != (cfg.round, tuple(alive)):
        raise SignatureError(f"client {i}: it signed survivors {list(keys.signed[1])} for round {cfg.round} already;"
                             f" a second list {alive} is refused")  # fmt: skip
    keys.signed = (cfg.round, tuple(alive))
    return signer.sign(survivors_statement(cfg, alive))


def check_survivors(
    keys: NodeKeys, cfg: RoundConfig, signer: Signer, survivors: Sequence[int], signatures: Mapping[int, bytes]
) -> None:
    """Before a node reveals: the S it signed, and valid signatures of it from ``cfg.signers`` members of S."""
    i, alive = keys.id, tuple(sorted(set(survivors)))
    if keys.signed != (cfg.round, alive):
        raise SignatureError(f"client {i}: the unmask names survivors {list(alive)}, but it signed "
                             f"{list(keys.signed[1]) if keys.signed else 'none'} for round {cfg.round}")  # fmt: skip
    statement, good = survivors_statement(cfg, alive), 0
    for j, sig in signatures.items():  # until enough verify (each check costs tens of microseconds)
        good += j in alive and signer.roster.verify(cfg.member(j), sig, statement)
        if good >= cfg.signers:
            return
    if good < cfg.signers:
        raise SignatureError(
            f"client {i}: {good} valid signatures of this round's survivors and configuration, "
            f"{cfg.signers} needed: nodes saw different lists or configurations; revealing nothing"
        )
