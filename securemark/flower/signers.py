"""A node's signing key and roster under ``secagg.threat = "malicious"`` (``secagg.roster`` says what they are).

On a deployment each SuperNode names both files in its node config, which the owner hands it, never the server:

    flower-supernode ... --node-config "securemark-roster='/sm/roster.json' securemark-signing-key='/sm/a.key'"

A node with them signs and checks every round, and refuses a round without signatures (a server cannot switch a
node back to the semi-honest protocol) and a plain train request. In a simulation the owner runs every node, so
``simulated`` makes a roster of fresh keys, one member per partition, held in memory by the ClientApp.

What a signing node may do once a round (sign one survivor list, unmask once) is also kept on its own disk
(``once``): Flower hands each message a copy of the node's state and keeps the copy of whichever message ends
last, so two messages a server sends a node at once would each find the other's record missing (an attack review
had nodes sign two lists that way). The folder is ``securemark-state-dir`` from the node config, else one in
the system's temporary folder; each record is a file created exclusively, so two processes cannot both make it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from flwr.app import Context

from securemark.secagg.protocol import SignatureError, Signer
from securemark.secagg.roster import Roster, RosterError, load_signing_key, public_hex

ROSTER, SIGNING_KEY = "securemark-roster", "securemark-signing-key"  # node config keys: paths on the node
STATE_DIR = "securemark-state-dir"  # node config: where a signing node keeps its once-a-round records


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


def simulated(partitions: int) -> tuple[Roster, dict[int, str]]:
    """A roster for a simulation's nodes and each partition's private key (hex, kept in memory: the ClientApp
    travels to the Ray actors pickled, and a key object does not pickle)."""
    keys = {p: Ed25519PrivateKey.generate() for p in range(partitions)}
    roster = Roster({member_name(p): bytes.fromhex(public_hex(k)) for p, k in keys.items()})
    private = {p: k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()).hex() for p, k in keys.items()}
    return roster, private


def simulated_signer(roster: Roster, keys: dict[int, str], context: Context) -> Signer:
    """The signer of a simulated node, by its partition id."""
    pid = context.node_config.get("partition-id")
    if not isinstance(pid, int) or pid not in keys:
        raise RosterError(f"no simulated signing key for partition {pid!r}")
    return Signer(roster, Ed25519PrivateKey.from_private_bytes(bytes.fromhex(keys[pid])))


def once(context: Context, signer: Signer, session: str, round_no: int, what: str, value: bytes = b"") -> None:
    """Record, for this node's member and session, that it did ``what`` in ``round_no`` with ``value``: again with
    the same value passes (a re-sent request), any other refuses (SignatureError); ``what = "unmask"`` passes
    once. Records of rounds before the previous one are removed."""
    folder = (
        _private(context)
        / hashlib.sha256(f"{signer.member}|{signer.roster.digest.hex()}|{session}".encode()).hexdigest()[:32]
    )
    folder.mkdir(mode=0o700, exist_ok=True)  # inside a folder only this user can write: no one else's link
    path = folder / f"{what}-{int(round_no)}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if what == "unmask" or path.read_bytes() != value:  # (read while another writes it: refused, safely)
            raise SignatureError(f"this node did {what} for round {round_no} already (another request of the same "
                                 "round, at once or before): refused") from None  # fmt: skip
        return
    with os.fdopen(fd, "wb") as f:
        f.write(value)
    for old in folder.iterdir():
        kind, _, r = old.name.partition("-")
        if kind in ("sign", "unmask") and r.isdigit() and int(r) < round_no - 1:
            old.unlink(missing_ok=True)


def _private(context: Context) -> Path:
    """``securemark-nodes-<uid>`` in the node's state folder (or the system's temporary one), made 0700 and checked:
    a real folder, not a link, owned by this user, closed to others (else another local user could plant or
    remove records)."""
    base = Path(str(context.node_config.get(STATE_DIR) or tempfile.gettempdir())) / f"securemark-nodes-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RosterError(f"{base} must be a folder of this user's, closed to others (mode 0700), not a link")
    return base
