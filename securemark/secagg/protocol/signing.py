"""What nodes sign under ``secagg.threat = "malicious"``, and the checks that keep a lying server from using it.

Two statements, each signed with a member's long-term Ed25519 key (``securemark.secagg.roster``) and checked by
every node against the roster it got from the owner, never from the server:

    advert      roster digest | session | client id | c_pk | s_pk     once a session, in the node's hello
    survivors   the round's configuration digest | S                   once a round, before anything is revealed

A node masks with a neighbour's keys only under that neighbour's advert: the server signs nothing, so it can
neither swap a key nor make up a neighbour, and the round's members are distinct (one member, one client).
Between its masked input and its unmask a node signs the survivor list S together with the round's whole
configuration (``RoundConfig.digest``: graph, threshold, encoding with its ranges, bits and weight cap, groups,
members, signers), and it signs one S a round. It reveals shares only when shown valid signatures of that same
statement from ``cfg.signers`` distinct members of S, at least the threshold and a majority of the round's n
clients. Honest members sign one statement a round, so two different statements (two survivor lists, or one
list under two configurations) both gathering m signatures need 2m - n signers that sign both: with fewer than
2m - n members working with the server, every node that reveals saw one S and one configuration. So no node's
shares of b_i go out while others' shares of its pair seeds do (both kinds of one node), and a node told another
configuration finds no m signatures of its own and refuses. (m = ceil(2n / 3), the default, tolerates fewer than
n / 3 such members; a node refuses m below a majority.)
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
    me: int,
) -> None:
    """Every neighbour's masking keys under its member's signature: else the server swapped or made them up."""
    check_member(cfg, signer, me)
    for j, (c_pk, s_pk) in peer_keys.items():
        statement = advert(cfg.roster, cfg.session, j, c_pk, s_pk)
        if not signer.roster.verify(cfg.member(j), adverts.get(j), statement):
            raise SignatureError(f"client {me}: the keys of client {j} ({cfg.member(j)!r}) are not signed by that "
                                 "member: swapped or made up by the server; refusing the round")  # fmt: skip


def sign_survivors(keys: NodeKeys, cfg: RoundConfig, signer: Signer, survivors: Sequence[int]) -> bytes:
    """This node's signature of (configuration, S), once per round: a second, different S is refused (a node
    that signed two would let the server show different nodes different survivors)."""
    i, alive = keys.id, sorted(set(survivors))
    if keys.open_round != cfg.round or cfg.session != keys.session:
        raise StageError(f"client {i}: no masked input of round {cfg.round} waiting for its survivors")
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
