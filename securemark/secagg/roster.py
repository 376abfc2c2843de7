"""The roster: the nodes' long-term signing keys, which every node holds from the owner, never from the server.

    roster.json   {"format": "securemark-roster/1", "members": {"alice": "<64 hex: Ed25519 public key>", ...}}
    alice.key     the member's Ed25519 private key (64 hex), on alice's machine alone, mode 0600

Under ``secagg.threat = "malicious"`` a node signs what it tells the others through the server (its masking keys
for the session, the survivor list and round configuration it will unmask for) and checks the others' signatures
against this file before it uses what they sent. The server only relays: it holds no signing key, so it can
neither make up a member nor stand in for one. The roster's digest is part of everything signed, so a node
whose roster differs (an old one, after a rotation) verifies nothing of the others: every node of a run must
hold the same file. Rotation: ``securemark roster rotate NAME`` gives a member a new key and writes the new
roster; the owner hands both out again before the next run (a run keeps the roster it started with).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from securemark.errors import SecureMarkError

FORMAT = "securemark-roster/1"
SIGNATURE_BYTES = 64
MEMBER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # a member's name is also its key file's name


class RosterError(SecureMarkError, ValueError):
    """A roster or signing-key file that cannot be used: missing, malformed, or not matching."""


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


@dataclass(frozen=True)
class Roster:
    members: Mapping[str, bytes]  # member name -> Ed25519 public key (32 bytes)

    def __post_init__(self) -> None:
        if not self.members:
            raise RosterError("a roster needs at least one member")
        for name, key in self.members.items():
            if not isinstance(name, str) or not MEMBER.fullmatch(name) or ".." in name:
                raise RosterError(f"roster member name {name!r}: letters, digits and . _ - only, at most 63")
            if not isinstance(key, bytes) or len(key) != 32:
                raise RosterError(f"roster member {name!r}: its key must be 32 bytes (64 hex)")
        if len(set(self.members.values())) != len(self.members):
            raise RosterError("two roster members share one key")

    @property
    def digest(self) -> bytes:
        """32 bytes naming this roster: bound into everything a member signs under it."""
        text = json.dumps(sorted((n, k.hex()) for n, k in self.members.items()), separators=(",", ":"))
        return hashlib.sha256(b"securemark/roster/v1|" + text.encode()).digest()

    def member_of(self, key: Ed25519PrivateKey) -> str:
        """The member whose public key this private key is."""
        mine = bytes.fromhex(public_hex(key))
        for name, pk in self.members.items():
            if pk == mine:
                return name
        raise RosterError("this node's signing key is not in its roster (rotated, or the wrong roster)")

    def verify(self, member: str, signature: object, message: bytes) -> bool:
        """Whether ``signature`` is ``member``'s over ``message`` (False for an unknown member or bad bytes)."""
        key = self.members.get(member) if isinstance(member, str) else None
        if key is None or not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "members": {n: k.hex() for n, k in sorted(self.members.items())}},
                          indent=2) + "\n"  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> Roster:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise RosterError(f"cannot read the roster {path}: {exc}") from None
        return cls.from_json(raw, str(path))

    @classmethod
    def from_json(cls, raw: object, where: str) -> Roster:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("members"), dict):
            raise RosterError(f"{where} is no securemark roster (format {FORMAT!r} with a members object)")
        members = {}
        for name, key in raw["members"].items():
            if not isinstance(key, str) or not re.fullmatch(r"[0-9a-f]{64}", key):
                raise RosterError(f"{where}: member {name!r} needs a 64-hex public key")
            members[name] = bytes.fromhex(key)
        return cls(members)


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """A member's private signing key (64 hex in a file only its owner may read)."""
    p = Path(path)
    try:
        text = p.read_text().strip()
        mode = p.stat().st_mode
    except OSError as exc:
        raise RosterError(f"cannot read the signing key {path}: {exc}") from None
    if mode & 0o077:
        raise RosterError(f"the signing key {path} is readable by others (mode {oct(mode & 0o777)}); chmod 600 it")
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise RosterError(f"{path} is no signing key (64 hex characters)")
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(text))


def write_signing_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write a private key readable by its owner alone (created 0600, never widened, never overwritten)."""
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()).hex()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(raw + "\n")


def make(members: list[str], out: Path) -> Roster:
    """A new roster in ``out`` (roster.json, one NAME.key each); keys from the OS's randomness."""
    if len(set(members)) != len(members):
        raise RosterError("member names must differ")
    keys = {name: Ed25519PrivateKey.generate() for name in members}
    roster = Roster({n: bytes.fromhex(public_hex(k)) for n, k in keys.items()})  # checks the names first
    out.mkdir(parents=True, exist_ok=True)
    taken = [p.name for p in [out / "roster.json", *(out / f"{n}.key" for n in keys)] if p.exists()]
    if taken:  # checked before anything is written: a refused call leaves the folder as it was
        raise RosterError(f"{out} holds {', '.join(taken)} already; a roster is rotated (roster rotate), never "
                          "overwritten")  # fmt: skip
    for name, key in keys.items():
        write_signing_key(out / f"{name}.key", key)
    (out / "roster.json").write_text(roster.to_json())
    return roster


def rotate(out: Path, member: str) -> Roster:
    """A new key for ``member`` (or a new member): its old key file kept (NAME.key.old, then .old.1, ...: none
    overwritten), the roster rewritten."""
    roster = Roster.load(out / "roster.json")
    key = Ed25519PrivateKey.generate()
    old = out / f"{member}.key"
    new = Roster({**roster.members, member: bytes.fromhex(public_hex(key))})
    if old.exists():
        kept = out / f"{member}.key.old"
        k = 0
        while kept.exists():
            k += 1
            kept = out / f"{member}.key.old.{k}"
        old.replace(kept)
    write_signing_key(old, key)
    tmp = out / "roster.json.tmp"
    tmp.write_text(new.to_json())
    tmp.replace(out / "roster.json")
    return new
