"""The roster of the nodes' signing keys: files, checks, rotation (securemark.secagg.roster)."""

import json
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securemark.secagg.roster import Roster, RosterError, load_signing_key, make, rotate


def test_a_roster_round_trips_and_each_key_file_is_its_members_alone(tmp_path):
    made = make(["alice", "bob"], tmp_path / "r")
    assert Roster.load(tmp_path / "r" / "roster.json") == made
    for name in ("alice", "bob"):
        path = tmp_path / "r" / f"{name}.key"
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert made.member_of(load_signing_key(path)) == name


def test_signatures_verify_for_their_member_and_message_only(tmp_path):
    made = make(["alice", "bob"], tmp_path)
    key = load_signing_key(tmp_path / "alice.key")
    sig = key.sign(b"m")
    assert made.verify("alice", sig, b"m")
    assert not made.verify("bob", sig, b"m") and not made.verify("alice", sig, b"n")
    assert not made.verify("eve", sig, b"m") and not made.verify("alice", sig[:-1], b"m")
    assert not made.verify("alice", "not bytes", b"m") and not made.verify(None, sig, b"m")  # type: ignore[arg-type]
    with pytest.raises(RosterError, match="not in its roster"):
        made.member_of(Ed25519PrivateKey.generate())


def test_rotation_changes_the_digest_and_keeps_every_old_key(tmp_path):
    before = make(["alice", "bob"], tmp_path)
    after = rotate(tmp_path, "bob")
    again = rotate(tmp_path, "bob")
    assert len({before.digest, after.digest, again.digest}) == 3
    assert before.members["alice"] == again.members["alice"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("bob")) == [
        "bob.key", "bob.key.old", "bob.key.old.1"]  # fmt: skip
    assert again.member_of(load_signing_key(tmp_path / "bob.key")) == "bob"


def test_a_refused_init_writes_nothing(tmp_path):
    (tmp_path / "bob.key").write_text("x")
    with pytest.raises(RosterError, match=r"bob\.key already"):
        make(["alice", "bob"], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bob.key"]
    with pytest.raises(RosterError, match="differ"):
        make(["a", "a"], tmp_path / "x")


@pytest.mark.parametrize("name", ["../x", "a/b", "", "x" * 64, "-a", "a b", "é"])
def test_odd_member_names_are_refused(tmp_path, name):
    with pytest.raises(RosterError, match="member name"):
        make([name], tmp_path / "r")
    assert not (tmp_path / "r" / "roster.json").exists()


def test_unusable_files_are_named(tmp_path):
    make(["alice"], tmp_path)
    key = tmp_path / "alice.key"
    os.chmod(key, 0o640)
    with pytest.raises(RosterError, match="readable by others"):
        load_signing_key(key)
    os.chmod(key, 0o600)
    key.write_text("zz")
    with pytest.raises(RosterError, match="no signing key"):
        load_signing_key(key)
    for text in ("[]", json.dumps({"format": "other", "members": {}}), "{",
                 json.dumps({"format": "securemark-roster/1", "members": {"a": "00"}})):  # fmt: skip
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(RosterError):
            Roster.load(tmp_path / "bad.json")
    with pytest.raises(RosterError, match="share one key"):
        Roster({"a": bytes(32), "b": bytes(32)})
