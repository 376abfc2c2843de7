"""Which node is which customer, and what the server hears from them.

A node is identified once, as the customer its hello claims (its partition-id) or, on a SuperLink with
SuperNode authentication, as its registered key. Two nodes claiming one identity (at once, or one while the
other holds it) suspend it: both are refused, no node gets that identity's copies for the rest of the run, and
the registry marks it contested, so a tracer names no one for a copy that reads as its own (a node that
claimed a victim's partition id first got the victim's copies, and its leak accused the victim). A node whose
identity changes later is refused and gets nothing; a customer refused for misbehaving is banned for the run. Under
masking the hello also sets up the node's long-term keys for this run's session. Every reply a round reads
comes through :meth:`Nodes.receive`: errors logged, identities re-checked, simulated losses applied.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid
from rich.console import Console

from securemark.config import SecAggSettings
from securemark.errors import InputError
from securemark.flower import wire
from securemark.flower.exchange import Need, accept, exchange, shown
from securemark.owner import customer_name
from securemark.registry import Registry, RegistryError
from securemark.secagg import protocol as P
from securemark.secagg.groups import Groups
from securemark.secagg.roster import Roster

IDENTITIES = ("auto", "partition-id", "node")


class IdentityUnsafe(InputError):
    """``identity="auto"`` outside a simulation: who the customers are must be said (see
    :meth:`Nodes.resolve_identity`). The run stops before any copy is made."""


def threat_roster(secagg: SecAggSettings, roster: Roster | None) -> Roster | None:
    """The roster the server relays signed keys under: ``roster``, else ``secagg.roster``'s file; None under the
    semi-honest threat. The malicious threat without one is refused (ValueError) before any node is met."""
    if not secagg.enabled or secagg.threat != "malicious":
        return None
    if roster is None and not secagg.roster:
        raise ValueError("secagg.threat = malicious needs the owner's roster of signing keys: secagg.roster = "
                         "PATH (securemark roster init), or SecureMark(roster=Roster.load(PATH))")  # fmt: skip
    return roster if roster is not None else Roster.load(secagg.roster)


def simulated(grid: Grid) -> bool:
    """A grid of Flower's simulation engine (``run_simulation``, ``flwr-simulation``): every node is one the
    engine itself made, so a partition id names a node."""
    return isinstance(grid, InMemoryGrid)


class Nodes:
    """The run's customers by node, their masking-session ids and keys, and the refused ones."""

    def __init__(
        self, secagg: SecAggSettings, identity: str, console: Console, rng: np.random.Generator,
        roster: Roster | None = None,
    ) -> None:  # fmt: skip
        if identity not in IDENTITIES:
            raise ValueError(f"identity must be one of {IDENTITIES}, got {identity!r}")
        self.secagg, self.identity, self.console, self.rng = secagg, identity, console, rng
        self.customers: dict[int, str] = {}  # node id -> customer
        self.ids: dict[int, int] = {}  # node id -> its id in the masking session (a Shamir x-coordinate)
        self.keys = P.SessionKeys(os.urandom(16).hex())  # this run's session: long-term public keys of the nodes
        self.groups = Groups(secagg.group)  # the session's fixed groups of session ids
        self.failures: dict[str, list[str]] = {}  # stage -> the reasons of the nodes that failed it last
        self.refused: set[int] = set()
        self.banned: set[str] = set()  # customers refused for misbehaving or contested (kept across a resume)
        self.contested: dict[str, str] = {}  # identities two nodes claimed, and how
        self.since: dict[int, int] = {}  # node -> the round it was identified in
        # identity -> (node, since) of a holder refused since: with claimed partition ids outside a simulation,
        # another node's later claim of it is a contest, so a node cannot hand an identity it held to its victim.
        # Not kept across a resume: a restarted SuperLink gives every node a new id, and a takeover across the
        # restart cannot be told from a reconnect (SuperNode authentication, identity "node", is the way)
        self.former: dict[str, tuple[int, int | None]] = {}
        self.simulated = True  # claims come from the engine's own nodes (resolve_identity says)
        self.roster = roster  # the malicious threat: the owner's roster, each hello's signed keys checked against it
        self.on_contest: Callable[[str, str], None] = lambda name, why: None  # where a contest is recorded
        self.grid: Grid | None = None

    # --- messaging ------------------------------------------------------------------------------------------
    def send(
        self, stage: str, contents: dict[int, RecordDict], round_no: int, timeout: float, need: Need = None
    ) -> dict[int, Message]:
        """One message per node, the stage named in its SM record; see :meth:`receive`."""
        msgs = []
        for node, content in contents.items():
            content[wire.SM] = ConfigRecord({**content.get(wire.SM, {}), "stage": stage})
            msgs.append(Message(content, dst_node_id=node, message_type=wire.MESSAGE_TYPE, group_id=str(round_no)))
        return self.receive(stage, msgs, timeout, need)

    def receive(self, stage: str, msgs: Iterable[Message], timeout: float, need: Need = None) -> dict[int, Message]:
        """Replies without error whose sender's identity still holds; ``secagg.dropout`` simulates losses. A node
        that fails a masked stage is re-keyed before it takes part again (it may have lost its keys); one whose
        floor is above the run's groups is refused for the run (its group then sits out: groups are fixed)."""
        replies: dict[int, Message] = {}
        self.failures[stage] = []
        got = exchange(self._grid(), msgs, timeout, self.secagg.grace, need)
        registered = self.registered() if self.identity == "node" and stage != wire.HELLO else {}
        for reply in got:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.console.print(f"  [yellow]node {node} failed at {stage}: {shown(reply.error.reason)}[/]")
                self.failures[stage] = [*self.failures.get(stage, []), str(reply.error.reason)]
                if stage != wire.HELLO:
                    self.keys.forget(self.ids.get(node, 0))
                if "GroupTooSmall:" in str(reply.error.reason):  # it would refuse every round of this session
                    self.refuse(node, "its floor (securemark-min-group) is above this run's groups")
            elif stage != wire.HELLO and not self._claim_holds(node, reply, registered):
                continue
            elif self.rng.random() >= self.secagg.dropout:
                replies[node] = reply
        return replies

    def _grid(self) -> Grid:
        if self.grid is None:
            raise RuntimeError("SecureMark talks to nodes only inside start(grid=...)")
        return self.grid

    # --- identities -----------------------------------------------------------------------------------------
    def resolve_identity(self) -> None:
        """Settle who the customers are, once, before any copy is made. ``auto``: partition ids in a simulation
        (the engine made every node); outside one the run stops (IdentityUnsafe) until the owner says which:
        a ServerApp cannot tell an authenticating SuperLink from an ``--insecure`` one, whose SuperNodes
        register throwaway keys of their own (Flower's ``register_node``), so registered keys prove nothing
        unless the owner started the SuperLink with ``--enable-supernode-auth``. An explicit ``partition-id``
        outside a simulation says, once, that any node can claim any partition id."""
        self.simulated = simulated(self._grid())
        if self.identity == "auto":
            if not self.simulated:
                raise IdentityUnsafe(
                    'who the customers are must be said for a deployment: fingerprint.identity = "node" '
                    '(SecureMark(identity="node")) on a SuperLink started with --enable-supernode-auth, '
                    'each customer a SuperNode key the owner registered; or "partition-id", the partition id '
                    "each node claims, which any node can claim (an --insecure SuperLink)"
                )
            self.identity = "partition-id"
        elif self.identity == "partition-id" and not self.simulated:
            self.console.print("  [yellow]customers are the partition ids nodes claim (fingerprint.identity = "
                               "partition-id): any node can claim any; a second claim suspends the identity. "
                               'SuperNode authentication with fingerprint.identity = "node" binds each customer '
                               "to a registered key[/]")  # fmt: skip

    def identify(self, nodes: Iterable[int], round_no: int = 0) -> list[int]:
        """The nodes that may take part: new ones are identified (a hello, or their registered key); under
        masking, a hello also sets up the node's long-term keys (new nodes, and nodes that lost theirs)."""
        nodes = list(nodes)
        masked = self.secagg.enabled
        new = [n for n in nodes if n not in self.customers and n not in self.refused]
        ask = new + [n for n in nodes if masked and n in self.customers and self.ids.get(n) not in self.keys.keys]
        replies = self._hello(ask) if ask and (masked or self.identity == "partition-id") else {}
        registered = self.registered() if self.identity == "node" and (new or replies) else {}  # one request
        if new:
            if self.identity == "node":
                claims = {n: registered.get(n) for n in new}
            else:
                claims = {n: _claimed(replies[n]) for n in new if n in replies}
            self._admit(claims, round_no)
        for node, reply in replies.items():
            if not masked or node not in self.customers:
                continue
            if node not in new and not self._claim_holds(node, reply, registered):
                continue
            if accept(self.console, node, _apply_keys, self.keys, self.ids[node], reply.content, self.roster) is None:
                self.refuse(node, "its keys were refused")
        return [n for n in nodes if n in self.customers and (not masked or self.ids.get(n) in self.keys.keys)]

    def for_round(self, order: list[int], round_no: int) -> list[int]:
        """The nodes of a train round, from those the inner strategy sampled (``order``): the identified ones;
        under masking with ``secagg.group`` > 1, whole groups of them (``in_groups``)."""
        sampled = sorted(self.identify(order, round_no))
        if self.secagg.enabled and self.groups.size > 1:
            return self.in_groups(sampled, order, round_no)
        return sampled

    def in_groups(self, sampled: list[int], order: list[int], round_no: int) -> list[int]:
        """Whole groups of the sampled nodes, in the inner strategy's order, until they hold as many nodes as it
        sampled. Sampled nodes without a group are grouped first, with other connected nodes when fewer than a
        group's size of them are new; a group with a member that is gone or cannot be keyed sits the round out
        (``secagg.groups``)."""
        ids = [self.ids[n] for n in order if n in sampled and n in self.ids]
        connected = self._grid().get_node_ids()  # one request to the grid
        if self.groups.form(ids):
            spare = [n for n in connected if n not in self.customers and n not in self.refused]
            more = self.identify(spare[: self.groups.size], round_no)
            self.groups.form([*ids, *(self.ids[n] for n in more)])
        node_of = {i: n for n, i in self.ids.items()}
        ready = {self.ids[n] for n in connected if n in self.customers and n in self.ids}
        nodes = [node_of[i] for i in self.groups.whole(ids, ready, len(order))]
        keyed = set(self.identify(nodes, round_no))  # members that lost their keys are keyed again
        out = [n for n in nodes if all(node_of[i] in keyed for i in self.groups.of[self.ids[n]])]
        waiting = sorted(n for n in order if n in self.ids and self.ids[n] not in self.groups.of)
        if len(out) < len(order) or waiting:
            wait = f"; without a group yet (fewer than {self.groups.size} new): nodes {waiting}" if waiting else ""
            self.console.print(f"  round {round_no}: {len(out)} node(s) in whole groups of {self.groups.size}+ "
                               f"({len(order)} sampled){wait}")  # fmt: skip
        return sorted(out)

    def _admit(self, claims: dict[int, str | None], round_no: int) -> None:
        holders = {name: node for node, name in self.customers.items()}
        for node, name in claims.items():
            if node in self.refused:  # a twin refused with the first claim of its identity
                continue
            twins = sorted(m for m, other in claims.items() if other == name and m != node)
            if name is None:
                self.refuse(node, "no identity")
            elif (bad := _unusable(name)) is not None:
                self.refuse(node, f"no usable identity: {bad}")
            elif name in self.contested:
                self.refuse(node, f"identity {name!r} is suspended: {self.contested[name]}")
            elif name in self.banned:
                self.refuse(node, f"customer {name!r} was refused earlier in this run")
            elif name in holders or twins:
                self._contest(name, node, holders.get(name), twins, round_no)
            elif name in self.former and self.former[name][0] != node and self._claims_open():
                self._contest(name, node, None, [], round_no, self.former[name])
            else:
                self.customers[node] = name
                self.since[node] = round_no

    def _claims_open(self) -> bool:
        """Claimed partition ids on a deployment: a node's claim proves nothing. (Node identities carry their key's
        digest, so one identity is one key; a simulation's nodes are the engine's own.)"""
        return self.identity == "partition-id" and not self.simulated

    def recall(self, contested: dict[str, str]) -> None:
        """Identities suspended earlier in this run (a resumed run reads them from the registry)."""
        self.contested.update(contested)
        self.banned.update(contested)

    def _contest(
        self, name: str, node: int, holder: int | None, twins: list[int], round_no: int,
        former: tuple[int, int | None] | None = None,
    ) -> None:  # fmt: skip
        """Suspend identity ``name``: every node claiming or holding it is refused, and the contest recorded
        with who held it when (a pirate that contests its own identity gives up its later copies, and a trace
        of an earlier one still names the node that alone received it). ``former``: a holder refused since."""
        held = (holder, self.since.get(holder)) if holder is not None else former
        if held is not None:
            since = f" since round {held[1]}" if held[1] is not None else ""
            gone = "" if holder is not None else " until it was refused"
            why = (f"node {node} claimed it in round {round_no} while node {held[0]} held it{since}{gone}; its "
                   f"copies before round {round_no} went to node {held[0]} alone, none after")  # fmt: skip
        else:
            why = f"nodes {', '.join(map(str, sorted([node, *twins])))} claimed it at once in round {round_no}"
        self.contested[name] = why
        self.banned.add(name)
        self.on_contest(name, why)
        for other in ([holder] if holder is not None else twins) + [node]:
            self.refuse(other, f"identity {name!r} is suspended: {why}")

    def refuse(self, node: int, why: str) -> None:
        self.console.print(f"  [red]refused node {node}: {shown(why)}; it gets no copy[/]")
        name = self.customers.pop(node, None)
        if name is not None:
            self.former[name] = (node, self.since.get(node))
        self.keys.forget(self.ids.get(node, 0))
        self.refused.add(node)

    def ban(self, node: int, why: str) -> None:
        """Refuse ``node`` and its customer for the rest of the run (it misbehaved in the protocol)."""
        if node in self.customers:
            self.banned.add(self.customers[node])
        self.refuse(node, why)

    def _hello(self, nodes: list[int]) -> dict[int, Message]:
        """Identity claims; under masking, each node's long-term keys for this session (under its session id)."""
        contents = {}
        for n in nodes:
            contents[n] = RecordDict()
            if self.secagg.enabled:
                self.ids.setdefault(n, len(self.ids) + 1)
                contents[n][wire.SESSION] = ConfigRecord({"session": self.keys.session, "client_id": self.ids[n]})
        return self.send(wire.HELLO, contents, 0, self.secagg.timeout)

    def registered(self) -> dict[int, str | None]:
        """Node id -> registered identity, as the SuperLink reports it now (one request)."""
        return {info.node_id: _registered_name(info) for info in self._grid().get_nodes()}

    def _claim_holds(self, node: int, reply: Message, registered: dict[int, str | None]) -> bool:
        """A reply from a node whose identity changed since it was identified is dropped; the node is refused."""
        if self.identity == "node":
            now = registered.get(node)
        else:
            now = _claimed(reply)
        if now == self.customers.get(node):
            return True
        self.refuse(node, f"identity changed from {self.customers.get(node)!r} to {now!r}")
        return False


def _claimed(reply: Message) -> str | None:
    """The customer a reply's partition-id claim names, or None for a missing or malformed claim."""
    head = reply.content.config_records.get(wire.SM)
    pid = head.get("partition-id") if head is not None else None
    return customer_name(pid) if isinstance(pid, int) and not isinstance(pid, bool) and pid >= 0 else None


def _registered_name(info: Any) -> str | None:
    """A registered node's customer: its public key's digest, after its registered name when it has one
    (``alice-3f2a9c01b7d4e865``: 64 bits of it, too many to grind a key for). Flower keeps keys unique, not
    names: a name is whatever the registrant typed, and two keys registered as "bob" are two customers; a
    name that is no plain file name (``../x``, 63+ characters, markup, any character but letters, digits and
    . _ -) is left out. None for a node without a key."""
    if info is None or not getattr(info, "public_key", b""):
        return None
    digest = hashlib.sha256(info.public_key).hexdigest()
    name = getattr(info, "name", "")
    usable = isinstance(name, str) and REGISTERED_NAME.fullmatch(name) is not None and ".." not in name
    return f"{name}-{digest[:16]}" if usable else f"node-{digest[:16]}"


# a registered name becomes part of a customer's name and of its copy's file name: letters, digits and . _ -
REGISTERED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def _unusable(name: str) -> str | None:
    """Why a registry cannot hold ``name`` as a customer, or None."""
    try:
        Registry.check_customer_name(name)
    except RegistryError as exc:
        return str(exc)
    return None


def _apply_keys(keys: P.SessionKeys, i: int, content: RecordDict, roster: Roster | None) -> bool:
    """A hello's keys; under the malicious threat (``roster``) signed by a member of the roster, who is then
    this client of the session (nodes check the signature again themselves: the server only relays it)."""
    with wire.malformed("hello reply"):
        payload = content[wire.PAYLOAD]
        c_pk, s_pk = P.check_public_key(payload["c_pk"], "a key"), P.check_public_key(payload["s_pk"], "a key")
        signed = (str(payload["member"]), payload["advert"]) if roster is not None else None
    if signed is not None and roster is not None:
        statement = P.advert(roster.digest, keys.session, i, c_pk, s_pk)
        if not roster.verify(*signed, statement):
            raise P.SignatureError(f"client {i}'s keys are not signed by roster member {shown(signed[0])}")
    keys.register(i, c_pk, s_pk, signed)
    return True
