"""A node's signing key and roster under ``secagg.threat = "malicious"`` (``secagg.roster`` says what they are).

On a deployment each SuperNode names both files in its node config, which the owner hands it, never the server:

    flower-supernode ... --node-config "securemark-roster='/sm/roster.json' securemark-signing-key='/sm/a.key'"

A node with them signs and checks every round, and refuses a round without signatures (a server cannot switch a
node back to the semi-honest protocol) and a plain train request. In a simulation the owner runs every node, so
``simulated`` makes a roster of fresh keys, one member per partition, held in memory by the ClientApp.
"""

from __future__ import annotations

import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from flwr.app import Context

from securemark.secagg.protocol import Signer
from securemark.secagg.roster import Roster, RosterError, load_signing_key, public_hex

ROSTER, SIGNING_KEY = "securemark-roster", "securemark-signing-key"  # node config keys: paths on the node


def node_signer(context: Context) -> Signer | None:
    """The signer a node's config names, or None when it names neither file; one without the other, or files
    that do not match, fail closed (RosterError): a node meant to sign must never run unsigned."""
    roster, key = context.node_config.get(ROSTER), context.node_config.get(SIGNING_KEY)
    if roster is None and key is None:
        return None
    if not roster or not key:
        raise RosterError(f"node config needs both {ROSTER} and {SIGNING_KEY}, or neither")
    signer = Signer(Roster.load(str(roster)), load_signing_key(str(key)))
    signer.roster.member_of(signer.key)  # the key is in the roster
    return signer


def member_name(partition: int) -> str:
    """A simulated node's member name."""
    return f"partition-{partition}"


def simulated(partitions: int) -> tuple[str, dict[int, str]]:
    """A roster for a simulation's nodes (its JSON) and each partition's private key (hex, kept in memory)."""
    keys = {p: Ed25519PrivateKey.generate() for p in range(partitions)}
    roster = Roster({member_name(p): bytes.fromhex(public_hex(k)) for p, k in keys.items()})
    private = {p: k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()).hex() for p, k in keys.items()}
    return roster.to_json(), private


def simulated_signer(roster_json: str, keys: dict[int, str], context: Context) -> Signer:
    """The signer of a simulated node, by its partition id."""
    pid = context.node_config.get("partition-id")
    if not isinstance(pid, int) or pid not in keys:
        raise RosterError(f"no simulated signing key for partition {pid!r}")
    roster = Roster.from_json(json.loads(roster_json), "the simulation's roster")
    return Signer(roster, Ed25519PrivateKey.from_private_bytes(bytes.fromhex(keys[pid])))
