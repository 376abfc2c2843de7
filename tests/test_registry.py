import json
import math
import os
import sqlite3
import stat
import threading

import numpy as np
import pytest
import torch

from securemark.codes import bibd
from securemark.modelio import load_state_dict, save_state_dict, state_digest
from securemark.models import build
from securemark.owner import establish_base, issue_copies, issue_copy, make_copy
from securemark.registry import Base, Registry, RegistryError, RegistryParams


@pytest.fixture
def reg(tmp_path):
    r = Registry.init(tmp_path / "reg", RegistryParams(length=128, max_colluders=3))
    yield r
    r.close()


D1, D2 = "d1" * 32, "d2" * 32  # base digests are SHA-256s in hex


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
    base = Base(D1, np.arange(128.0), 0.5, (("w", (2, 64)),))
    reg.set_base(base)
    reg.set_base(base)  # same base again is fine
    got = reg.base()
    assert got is not None and got.digest == D1 and got.strength == 0.5 and got.tensors == (("w", (2, 64)),)
    np.testing.assert_array_equal(got.reference, np.arange(128.0))
    with pytest.raises(RegistryError, match="differs"):
        reg.set_base(Base(D2, np.zeros(128), 0.5, (("w", (2, 64)),)))


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


# --- owner-side hardening ------------------------------------------------------------------------------
def _cnn():
    return {k: v.clone() for k, v in build("cnn", (1, 8, 8), 10, seed=0).state_dict().items()}


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_database_side_files_and_kept_base_are_0600_whatever_the_umask(tmp_path):
    old = os.umask(0o022)  # the usual umask: files would be 0644 unless created private
    try:
        with Registry.init(tmp_path / "r", RegistryParams(length=128)) as r:
            issue_copy(r, _cnn(), "alice")  # a write: the -wal and -shm files exist while r is open
            db = r.directory / "registry.sqlite"
            sides = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
            assert all(p.exists() for p in sides)
            assert {p.name: _mode(p) for p in sides} == {p.name: 0o600 for p in sides}
            kept = list((r.directory / "bases").iterdir())
            assert len(kept) == 1 and _mode(kept[0]) == 0o600 and _mode(r.directory / "bases") == 0o700
    finally:
        os.umask(old)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_open_refuses_a_database_others_can_read(reg, mode):
    db = reg.directory / "registry.sqlite"
    db.chmod(mode)
    with pytest.raises(RegistryError, match=r"accessible by group or others .*chmod 600"):
        Registry.open(reg.directory)
    db.chmod(0o600)
    Registry.open(reg.directory).close()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("budget", float("nan"), "finite budget > 0"),
        ("budget", float("inf"), "finite budget > 0"),
        ("budget", 0.0, "finite budget > 0"),
        ("eps", float("nan"), "0 < eps < 1"),
        ("length", float("nan"), "length must be >= 16"),
        ("max_colluders", float("nan"), "max_colluders >= 1"),
    ],
)
def test_non_finite_parameters_are_refused(field, value, message):
    with pytest.raises(RegistryError, match=message):
        RegistryParams(**{field: value})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_base_with_nan_or_inf_is_refused_by_tensor_name_and_nothing_is_recorded(reg, bad):
    base = _cnn()
    base["head.3.bias"][1] = bad  # not even a carrier tensor: every floating tensor is checked
    with pytest.raises(ValueError, match=r"tensor 'head\.3\.bias' holds NaN or inf"):
        issue_copies(reg, base, ["alice"])
    assert reg.base() is None and reg.deliveries() == [] and reg.customers() == []
    assert not (reg.directory / "bases").exists()


def test_an_all_zero_base_or_a_bad_strength_is_refused(reg):
    base = _cnn()
    zero = {k: torch.zeros_like(v) for k, v in base.items()}
    with pytest.raises(ValueError, match=r"strength must be finite and > 0, got 0\.0 \(.*all zero\)"):
        issue_copy(reg, zero, "alice")
    for strength in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="strength must be finite and > 0"):
            establish_base(reg, base, strength)
    assert reg.base() is None and reg.deliveries() == [] and reg.customers() == []


def test_make_copy_records_no_delivery_until_asked(reg):
    base = _cnn()
    copy, customer = make_copy(reg, base, "alice")
    assert customer.name == "alice" and reg.deliveries() == []
    reg.record_delivery(customer, state_digest(copy), "alice.pt")
    assert [d["customer"] for d in reg.deliveries()] == ["alice"]
    assert all(torch.equal(copy[k], v) for k, v in issue_copy(reg, base, "alice").items())  # same copy


def test_two_first_issues_at_once_both_succeed(tmp_path):
    """Both find no base, both record it: the second must see the first's under the lock, not collide."""
    base = _cnn()
    for trial in range(4):
        directory = tmp_path / f"r{trial}"
        Registry.init(directory, RegistryParams(length=128)).close()
        barrier, errors = threading.Barrier(4), []

        def issue(name, directory=directory, barrier=barrier, errors=errors):
            try:
                with Registry.open(directory) as r:
                    barrier.wait()
                    issue_copy(r, base, name)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=issue, args=(f"c{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with Registry.open(directory) as r:
            assert len(r.deliveries()) == 4 and r.base() is not None


def test_set_base_rereads_under_the_lock(reg, monkeypatch):
    """A base recorded by another process between this one's read and its write: same digest is a no-op,
    another digest is refused (never an IntegrityError)."""
    base = Base(D1, np.arange(128.0), 0.5, (("w", (2, 64)),))
    other = Registry.open(reg.directory)
    other.set_base(base)
    monkeypatch.setattr(Registry, "base", lambda self: None)  # a stale read, as if made before the insert
    reg.set_base(base)
    with pytest.raises(RegistryError, match="differs"):
        reg.set_base(Base(D2, np.zeros(128), 0.5, (("w", (2, 64)),)))
    other.close()


def test_failed_init_removes_what_it_created_and_only_that(tmp_path, monkeypatch):
    import securemark.registry.store as store_module
    from securemark.codes import drawn

    def boom(*_):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(drawn, "bias", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        Registry.init(tmp_path / "new" / "deeper" / "reg", RegistryParams(length=128))
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "kept"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="simulated"):
        Registry.init(existing, RegistryParams(length=128))
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]
    monkeypatch.undo()
    monkeypatch.setattr(store_module, "_SCHEMA", store_module._SCHEMA + "; CREATE TABLE meta (x)")
    with pytest.raises(RegistryError, match="could not create the registry"):
        Registry.init(existing, RegistryParams(length=128))
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]
    monkeypatch.undo()
    Registry.init(existing, RegistryParams(length=128)).close()  # and init can simply run again


def test_corrupt_rows_give_a_registry_error(reg):
    reg.customer("alice")
    reg.close()
    conn = sqlite3.connect(reg.directory / "registry.sqlite")
    conn.execute("UPDATE customers SET code = 'text'")  # a damaged record header can decode to another type
    conn.execute("UPDATE arrays SET data = zeroblob(1024) WHERE name = 'bias'")
    conn.commit()
    conn.close()
    with Registry.open(reg.directory) as r:
        with pytest.raises(RegistryError, match="unusable"):
            r.codebook()
        with pytest.raises(RegistryError, match="bias is corrupt"):
            r.bias()


def test_the_base_model_is_kept_by_digest_and_read_back_checked(reg):
    assert reg.base_model() is None  # nothing issued yet
    base = _cnn()
    issue_copy(reg, base, "alice")
    digest = state_digest(base)
    path = reg.directory / "bases" / f"{digest}.safetensors"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    kept = reg.base_model()
    assert kept is not None and state_digest(kept) == digest and reg.base().digest == digest
    assert kept.keys() == base.keys() and all(torch.equal(kept[k], v) for k, v in base.items())
    tampered = dict(base, **{"head.3.bias": base["head.3.bias"] + 1})
    save_state_dict(tampered, path)
    with pytest.raises(RegistryError, match="does not match the recorded digest"):
        reg.base_model()
    path.write_bytes(b"not safetensors")
    with pytest.raises(RegistryError, match="could not be read"):
        reg.base_model()
    path.unlink()  # recorded as kept: a removed model file is tamper evidence, not a quiet fallback
    with pytest.raises(RegistryError, match="recorded as kept and is missing"):
        reg.base_model()
    record = json.loads(reg._conn.execute("SELECT value FROM meta WHERE key = 'base'").fetchone()[0])
    assert record.pop("kept") is True
    reg._conn.execute("UPDATE meta SET value = ? WHERE key = 'base'", (json.dumps(record),))
    assert reg.base_model() is None  # a registry made before bases were kept: callers trace without alignment


def test_safetensors_round_trip_keeps_the_state_digest(reg):
    sd = {
        "w16": torch.randn(3, 4).half(),
        "wbf": torch.randn(2, 5).bfloat16(),
        "w64": torch.randn(4, 4, dtype=torch.float64),
        "steps": torch.tensor(7),
        "mask": torch.tensor([True, False]),
        "strided": torch.randn(6, 4).t(),  # not contiguous
    }
    digest = reg.save_base_model(sd)
    assert digest == state_digest(sd)
    assert state_digest(load_state_dict(reg.directory / "bases" / f"{digest}.safetensors")) == digest


def test_damaged_bases_are_refused_and_temp_files_never_travel(reg):
    """A stored base whose strength or reference was damaged is a RegistryError, never an empty reading; an
    earlier base needs a finite strength > 0; files() copies only the registry's own names."""
    from securemark.owner import add_earlier_base
    from securemark.registry.marks import fingerprinter

    model = _cnn()
    fp = fingerprinter(reg, model)
    for strength in (0.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="strength"):
            add_earlier_base(reg, fp, model, strength, "round 0")
    base = add_earlier_base(reg, fp, model, 0.5, "round 0")
    (reg.directory / "bases" / f".{base.digest}.tmp1234.safetensors").write_bytes(b"half a write")
    assert sorted(reg.files()) == ["bases/" + f"{base.digest}.safetensors", "owner.key", "registry.sqlite"]
    conn = sqlite3.connect(reg.directory / "registry.sqlite")
    info = json.loads(conn.execute("SELECT value FROM meta WHERE key = ?", (f"base/{base.digest}",)).fetchone()[0])
    for damage in ({"strength": 1e400}, {"strength": "0.5"}):
        conn.execute("UPDATE meta SET value = ? WHERE key = ?", (json.dumps({**info, **damage}), f"base/{base.digest}"))
        conn.commit()
        with pytest.raises(RegistryError, match="corrupt"):
            Registry.open(reg.directory).bases()
    conn.execute("UPDATE meta SET value = ? WHERE key = ?", (json.dumps(info), f"base/{base.digest}"))
    conn.execute("UPDATE arrays SET data = zeroblob(8) WHERE name = ?", (f"reference/{base.digest}",))
    conn.commit()
    conn.close()
    with pytest.raises(RegistryError, match="corrupt"):
        Registry.open(reg.directory).bases()


def test_issue_copies_refuses_a_bare_string_and_a_name_twice_before_recording(tmp_path):
    from securemark.models import build
    from securemark.owner import issue_copies

    reg = Registry.init(tmp_path / "r", RegistryParams(code="tardos", length=64, max_colluders=2))
    base = build("cnn", (1, 8, 8), 10).state_dict()
    with pytest.raises(TypeError, match="not the string 'alice'"):
        issue_copies(reg, base, "alice")
    with pytest.raises(RegistryError, match="named twice"):
        issue_copies(reg, base, ["a", "b", "a"])
    assert reg.customers() == [] and reg.base() is None


def test_two_issuers_racing_to_record_a_function_mark_cannot_disagree(tmp_path):
    """Both prepare a mark for a fresh base before either records it (two `issue --config` at once): the one
    recorded first stands, and the other is refused before it makes a copy unless it asked for the same."""
    from securemark import data, models
    from securemark.owner import FunctionSpec, prepare_function_mark, record_function_mark

    held = data.synthetic(n=300, seed=0)
    model = models.build("cnn", (1, 8, 8), 10, seed=0)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    record = {"name": "synthetic", "seed": 0, "test_fraction": 0.3, "files": ""}
    spec = FunctionSpec(models.spec_of("cnn", (1, 8, 8), 10), held.x, record, budget=0.03, skip=4, components=8)
    params = RegistryParams(length=256, max_colluders=3, exclude=spec.carrier_exclude())
    with Registry.init(tmp_path / "reg", params) as reg:
        first = prepare_function_mark(reg, base, spec)
        same = prepare_function_mark(reg, base, spec)
        other = prepare_function_mark(reg, base, FunctionSpec(**{**spec.__dict__, "budget": 0.5}))
        assert first[2] is not None and other[2] is not None  # neither saw a record
        record_function_mark(reg, base, first)
        assert record_function_mark(reg, base, same)[1] == first[1]  # the same mark asked for: it stands
        why = r"was recorded first, differently \(budget: recorded 0.03, asked 0.5\)"
        with pytest.raises(RegistryError, match=why):
            record_function_mark(reg, base, other)
        assert reg.deliveries() == []


def test_issuers_take_turns_and_a_spec_given_with_tuples_or_other_components_is_compared_as_recorded(tmp_path):
    """registry.issuing() lets one issuer at a time through (a second waits until the first is done), so a
    copy without a function mark cannot slip past one being recorded; a model spec given with a tuple shape
    matches its JSON record, and another number of components is refused."""
    from securemark import data, models
    from securemark.owner import FunctionSpec, issue_copies

    held = data.synthetic(n=300, seed=0)
    model = models.build("cnn", (1, 8, 8), 10, seed=0)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    record = {"name": "synthetic", "seed": 0, "test_fraction": 0.3, "files": ""}
    spec_model = {"name": "cnn", "in_shape": (1, 8, 8), "classes": 10, "width": 0}  # a tuple, as a user may write
    spec = FunctionSpec(spec_model, held.x, record, budget=0.03, skip=4, components=8)
    params = RegistryParams(length=256, max_colluders=3, exclude=spec.carrier_exclude())
    order = []

    def second(other: Registry) -> None:
        with other.issuing():
            order.append("second")

    with Registry.init(tmp_path / "reg", params) as reg, Registry.open(tmp_path / "reg") as other:
        with reg.issuing():
            waiting = threading.Thread(target=second, args=(other,))
            waiting.start()
            waiting.join(0.5)
            assert waiting.is_alive()  # blocked while the first holds it
            order.append("first")
        waiting.join(5)
        assert order == ["first", "second"]
        issue_copies(reg, base, ["ann"], function=spec)  # recorded with lists; compared equal to the tuple
        issue_copies(reg, base, ["bob"], function=spec)
        with pytest.raises(RegistryError, match="recorded already, differently \\(components: recorded 8, asked 16"):
            issue_copies(reg, base, ["cy"], function=FunctionSpec(**{**spec.__dict__, "components": 16}))
        assert [d["customer"] for d in reg.deliveries()] == ["ann", "bob"]


def test_a_contested_customer_is_kept_with_its_first_reason_across_a_reopen(reg):
    assert reg.contested() == {}
    reg.contest("client-001", "nodes 3, 4 claimed it at once")
    reg.contest("client-001", "a later claim")  # the first reason stays
    reg.contest("a%b_c", "names with LIKE's wildcards are kept as they are")
    again = Registry.open(reg.directory)
    assert again.contested() == {
        "client-001": "nodes 3, 4 claimed it at once", "a%b_c": "names with LIKE's wildcards are kept as they are",
    }  # fmt: skip
    again.close()
    with pytest.raises(RegistryError, match="control character"):
        reg.contest("bad\nname", "x")
