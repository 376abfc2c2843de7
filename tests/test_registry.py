import sqlite3
import stat
import threading

import numpy as np
import pytest

from securemark.codes import bibd
from securemark.registry import Base, Registry, RegistryError, RegistryParams


@pytest.fixture
def reg(tmp_path):
    r = Registry.init(tmp_path / "reg", RegistryParams(length=128, max_colluders=3))
    yield r
    r.close()


def test_init_writes_secret_0600_and_wal(reg):
    key = reg.directory / "owner.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    mode = sqlite3.connect(reg.directory / "registry.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    secret_hex = key.read_bytes().hex()
    assert secret_hex not in (reg.directory / "registry.sqlite").read_bytes().hex()


def test_refuses_to_overwrite(reg):
    with pytest.raises(RegistryError, match="already holds a registry"):
        Registry.init(reg.directory, RegistryParams())


def test_customer_rows_are_stable_distinct_and_survive_reopen(reg):
    a, b = reg.customer("alice"), reg.customer("bob")
    assert (a.index, b.index) == (0, 1)
    assert (a.bits != b.bits).any()
    again = Registry.open(reg.directory)
    np.testing.assert_array_equal(again.customer("alice", create=False).bits, a.bits)
    assert again.customers() == ["alice", "bob"]
    np.testing.assert_array_equal(again.bias(), reg.bias())
    again.close()


def test_code_rows_follow_the_secret_bias(reg):
    bits = np.array([reg.code_row(i) for i in range(400)])
    p = reg.bias()
    assert p.min() >= 1 / 900 - 1e-12 and p.max() <= 1 - 1 / 900 + 1e-12
    assert abs(bits.mean(0) - p).mean() < 0.05


def test_concurrent_issuers_never_share_a_row(tmp_path):
    Registry.init(tmp_path / "r", RegistryParams(length=64)).close()
    errors: list[Exception] = []

    def issue(prefix):
        try:
            with Registry.open(tmp_path / "r") as r:
                for i in range(15):
                    r.customer(f"{prefix}-{i}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=issue, args=(p,)) for p in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with Registry.open(tmp_path / "r") as r:
        names, packed = r.codebook()
    assert len(names) == 45 and len({bytes(row) for row in packed}) == 45


def test_bibd_capacity_is_enforced(tmp_path):
    with Registry.init(tmp_path / "b", RegistryParams(code="bibd", max_colluders=2)) as r:
        assert r.params.length == 7
        for i in range(7):
            np.testing.assert_array_equal(r.customer(f"c{i}").bits, bibd.code_rows(2)[i])
        with pytest.raises(RegistryError, match="at most 7 customers"):
            r.customer("one-too-many")


def test_missing_and_corrupt_registries_give_clear_errors(tmp_path):
    with pytest.raises(RegistryError, match="no registry at"):
        Registry.open(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "registry.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RegistryError, match="corrupt"):
        Registry.open(tmp_path / "bad")


def test_missing_secret_is_reported(reg):
    (reg.directory / "owner.key").unlink()
    r = Registry.open(reg.directory)
    with pytest.raises(RegistryError, match="missing"):
        r.customer("carol")
    r.close()


def test_base_is_recorded_once(reg):
    base = Base("d1", np.arange(128.0), 0.5, (("w", (2, 64)),))
    reg.set_base(base)
    reg.set_base(base)  # same base again is fine
    got = reg.base()
    assert got is not None and got.digest == "d1" and got.strength == 0.5 and got.tensors == (("w", (2, 64)),)
    np.testing.assert_array_equal(got.reference, np.arange(128.0))
    with pytest.raises(RegistryError, match="differs"):
        reg.set_base(Base("d2", np.zeros(128), 0.5, (("w", (2, 64)),)))


def test_bad_parameters_are_refused():
    with pytest.raises(RegistryError, match="code must be one of"):
        RegistryParams(code="nope")
    with pytest.raises(RegistryError, match="length must be >= 16"):
        RegistryParams(length=4)


@pytest.mark.parametrize("name", ["", " padded", "padded "])
def test_bad_customer_names_are_refused(reg, name):
    with pytest.raises(RegistryError, match="customer name"):
        reg.customer(name)
    assert reg.customers() == []


def test_federated_customer_names_round_trip_to_partition_ids():
    from securemark.owner import customer_name, partition_of

    assert customer_name(7) == "client-007" and customer_name(1234) == "client-1234"
    assert all(partition_of(customer_name(i)) == i for i in (0, 7, 999, 1234))
    for bad in ("alice", "client-", "client-x1", "customer-003"):
        with pytest.raises(ValueError, match="not a federated customer"):
            partition_of(bad)
