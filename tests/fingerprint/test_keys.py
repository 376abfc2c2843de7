import os
import stat

import pytest

from securemark.fingerprint.keys import OwnerSecret, SecretFileError


def test_secret_file_round_trip_with_mode_0600(tmp_path):
    s = OwnerSecret.generate()
    path = tmp_path / "owner.key"
    s.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert OwnerSecret.load(path) == s
    assert s.key.hex() not in repr(s)


def test_save_never_overwrites(tmp_path):
    path = tmp_path / "owner.key"
    OwnerSecret.generate().save(path)
    with pytest.raises(FileExistsError):
        OwnerSecret.generate().save(path)


def test_load_refuses_open_permissions_and_bad_sizes(tmp_path):
    path = tmp_path / "owner.key"
    OwnerSecret.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(SecretFileError, match="chmod 600"):
        OwnerSecret.load(path)
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 5)
    os.chmod(short, 0o600)
    with pytest.raises(SecretFileError, match="5 bytes"):
        OwnerSecret.load(short)
    with pytest.raises(SecretFileError, match="missing"):
        OwnerSecret.load(tmp_path / "none.key")


def test_derived_keys_are_bound_to_their_purpose():
    s = OwnerSecret(bytes(range(32)))
    assert s.derive("a") != s.derive("b")
    assert s.derive("a") == OwnerSecret(bytes(range(32))).derive("a")
    assert len(s.derive("a")) == 32
