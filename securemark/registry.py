"""The owner's registry: code parameters, the secret bias vector, one code row per customer, the hashes of
every delivered model, and the embedding parameters. SQLite in WAL mode; every write is one transaction.

The owner secret lives beside it in ``owner.key`` (mode 0600) and nowhere else: the registry stores what
is derived from it (bias, code rows) so tracing reads one file, but never the key itself.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from securemark.codes import bibd, pack_bits, tardos, unpack_bits
from securemark.codes.base import CODE_KINDS
from securemark.codes.random import uniform_bias
from securemark.fingerprint.carrier import CARRIER_MODES, CarrierSpec
from securemark.fingerprint.keys import OwnerSecret, SecretFileError
from securemark.prg import uniforms

FORMAT = 1
DB_NAME = "registry.sqlite"
KEY_NAME = "owner.key"

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE arrays (name TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE customers (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, code BLOB UNIQUE NOT NULL, issued_at TEXT NOT NULL);
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, customer_id INTEGER NOT NULL REFERENCES customers(id),
    sha256 TEXT NOT NULL, issued_at TEXT NOT NULL, note TEXT NOT NULL DEFAULT '');
"""


class RegistryError(RuntimeError):
    """The registry is missing, corrupt, or asked for something it cannot give."""


@dataclass(frozen=True)
class RegistryParams:
    code: str = "tardos"
    length: int = 2048
    max_colluders: int = 5
    eps: float = 1e-3
    budget: float = 0.05  # fidelity: RMS(perturbation) / RMS(carrier)
    carrier_mode: str = "weights"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.code not in CODE_KINDS:
            raise RegistryError(f"code must be one of {CODE_KINDS}, got {self.code!r}")
        if self.carrier_mode not in CARRIER_MODES:
            raise RegistryError(f"carrier mode must be one of {CARRIER_MODES}, got {self.carrier_mode!r}")
        if self.max_colluders < 1 or not 0 < self.eps < 1 or self.budget <= 0:
            raise RegistryError("need max_colluders >= 1, 0 < eps < 1 and budget > 0")
        if self.code == "bibd":
            q = bibd.plane_order_for(self.max_colluders)
            object.__setattr__(self, "length", q * q + q + 1)  # the design fixes the length
        elif self.length < 16:
            raise RegistryError(f"code length must be >= 16, got {self.length}")

    @property
    def carrier(self) -> CarrierSpec:
        return CarrierSpec(include=self.include, exclude=self.exclude, mode=self.carrier_mode)

    @property
    def capacity(self) -> int | None:
        """How many customers the code can serve (None: unbounded in practice)."""
        return self.length if self.code == "bibd" else None


@dataclass(frozen=True)
class Customer:
    index: int
    name: str
    bits: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Base:
    """The model the copies are made from: its digest, projection h = X v (L,), strength and layout id."""

    digest: str
    reference: np.ndarray = field(repr=False)
    strength: float
    tensors: tuple[tuple[str, tuple[int, ...]], ...]  # the carrier's tensors: suspects are checked by name


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Registry:
    def __init__(self, directory: Path, conn: sqlite3.Connection, params: RegistryParams) -> None:
        self.directory = directory
        self._conn = conn
        self.params = params
        self._secret: OwnerSecret | None = None
        self._bias: np.ndarray | None = None

    # --- opening -----------------------------------------------------------------------------------
    @classmethod
    def init(cls, directory: str | Path, params: RegistryParams) -> Registry:
        directory = Path(directory)
        if (directory / DB_NAME).exists() or (directory / KEY_NAME).exists():
            raise RegistryError(f"{directory} already holds a registry; refusing to overwrite it")
        directory.mkdir(parents=True, exist_ok=True)
        secret = OwnerSecret.generate()
        secret.save(directory / KEY_NAME)
        reg = cls(directory, cls._connect(directory / DB_NAME), params)
        reg._secret = secret
        with reg._write() as conn:
            for statement in _SCHEMA.split(";"):  # not executescript: it would COMMIT mid-transaction
                conn.execute(statement)
            meta = {"format": FORMAT, "params": asdict(params), "created_at": _now()}
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
            conn.execute("INSERT INTO arrays VALUES ('bias', ?)", (_bias(secret, params).tobytes(),))
        return reg

    @classmethod
    def open(cls, directory: str | Path) -> Registry:
        directory = Path(directory)
        db = directory / DB_NAME
        if not db.is_file():
            raise RegistryError(f"no registry at {directory} (missing {DB_NAME}); create one with 'registry init'")
        try:
            conn = cls._connect(db)
            meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
            fields: dict = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["params"].items()}
            params = RegistryParams(**fields)
        except (sqlite3.DatabaseError, KeyError, TypeError, ValueError) as exc:
            raise RegistryError(f"registry {db} is corrupt or not a securemark registry ({exc})") from None
        if meta.get("format") != FORMAT:
            raise RegistryError(f"registry {db} has format {meta.get('format')}, this securemark reads {FORMAT}")
        return cls(directory, conn, params)

    @staticmethod
    def _connect(db: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(db, isolation_level=None)  # transactions are explicit: see _write
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: BEGIN IMMEDIATE takes the write lock up front, so concurrent issuers serialize."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- secrets -----------------------------------------------------------------------------------
    @property
    def secret(self) -> OwnerSecret:
        if self._secret is None:
            try:
                self._secret = OwnerSecret.load(self.directory / KEY_NAME)
            except SecretFileError as exc:
                raise RegistryError(str(exc)) from None
        return self._secret

    def bias(self) -> np.ndarray:
        """The code's bias vector (written once at init): read once per open registry, a copy each call."""
        if self._bias is None:
            self._bias = np.frombuffer(self._array("bias"), dtype=np.float64).copy()
        return self._bias.copy()

    def _array(self, name: str) -> bytes:
        row = self._conn.execute("SELECT data FROM arrays WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise RegistryError(f"registry {self.directory} has no {name!r} yet")
        return bytes(row[0])

    # --- customers ---------------------------------------------------------------------------------
    def customer(self, name: str, *, create: bool = True) -> Customer:
        """The customer called ``name``; a new one gets the next code row (never one already issued)."""
        if not name or name != name.strip():
            raise RegistryError(f"customer name {name!r} must be non-empty without surrounding spaces")
        row = self._conn.execute("SELECT id FROM customers WHERE name = ?", (name,)).fetchone()
        if row is None and not create:
            raise RegistryError(f"no customer named {name!r} in {self.directory}")
        with self._write() as conn:  # re-read under the write lock: a concurrent issuer may have added it
            row = conn.execute("SELECT id, code FROM customers WHERE name = ?", (name,)).fetchone()
            if row is not None:
                return Customer(row[0], name, unpack_bits(np.frombuffer(row[1], np.uint8), self.params.length))
            index = conn.execute("SELECT COALESCE(MAX(id) + 1, 0) FROM customers").fetchone()[0]
            cap = self.params.capacity
            if cap is not None and index >= cap:
                raise RegistryError(f"the {self.params.code} code serves at most {cap} customers; all are issued")
            bits = self.code_row(index)
            try:
                conn.execute(
                    "INSERT INTO customers VALUES (?, ?, ?, ?)", (index, name, pack_bits(bits).tobytes(), _now())
                )
            except sqlite3.IntegrityError:  # UNIQUE(code): a row already issued is never handed out again
                raise RegistryError(f"code row {index} equals an issued row; refusing to issue it twice") from None
        return Customer(index, name, bits)

    def code_row(self, index: int) -> np.ndarray:
        """Bits of code row ``index``, derived from the owner secret (deterministic per registry)."""
        if self.params.code == "bibd":
            return bibd.code_rows(bibd.plane_order_for(self.params.max_colluders))[index]
        return tardos.draw_rows(self.bias(), uniforms(self.secret.derive(f"code-row/{index}"), self.params.length))

    def customers(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT name FROM customers ORDER BY id")]

    def codebook(self) -> tuple[list[str], np.ndarray]:
        """Names and row-major packed code rows of every customer, in index order."""
        rows = self._conn.execute("SELECT name, code FROM customers ORDER BY id").fetchall()
        nbytes = (self.params.length + 7) // 8
        packed = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.uint8).reshape(len(rows), nbytes)
        return [r[0] for r in rows], packed

    def record_delivery(self, customer: Customer, sha256: str, note: str = "") -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO deliveries (customer_id, sha256, issued_at, note) VALUES (?, ?, ?, ?)",
                (customer.index, sha256, _now(), note),
            )

    def deliveries(self, name: str | None = None) -> list[dict[str, str]]:
        q = "SELECT c.name, d.sha256, d.issued_at, d.note FROM deliveries d JOIN customers c ON c.id = d.customer_id"
        args: tuple[str, ...] = ()
        if name is not None:
            q, args = q + " WHERE c.name = ?", (name,)
        return [
            dict(zip(("customer", "sha256", "issued_at", "note"), r, strict=True)) for r in self._conn.execute(q, args)
        ]

    # --- embedding parameters ----------------------------------------------------------------------
    def base(self) -> Base | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'base'").fetchone()
        if row is None:
            return None
        info = json.loads(row[0])
        reference = np.frombuffer(self._array("reference"), dtype=np.float64).copy()
        tensors = tuple((name, tuple(shape)) for name, shape in info["tensors"])
        return Base(info["digest"], reference, info["strength"], tensors)

    def set_base(self, base: Base) -> None:
        """Record the base model once; copies from another base would need another reference."""
        current = self.base()
        if current is not None and current.digest != base.digest:
            raise RegistryError(
                f"this registry's copies are made from base {current.digest[:12]}; model {base.digest[:12]} "
                "differs. Use a new registry for a new base model."
            )
        if current is not None:
            return
        info = {"digest": base.digest, "strength": base.strength, "tensors": [[n, list(s)] for n, s in base.tensors]}
        with self._write() as conn:
            conn.execute("INSERT INTO meta VALUES ('base', ?)", (json.dumps(info),))
            conn.execute("INSERT INTO arrays VALUES ('reference', ?)", (base.reference.tobytes(),))


def _bias(secret: OwnerSecret, params: RegistryParams) -> np.ndarray:
    if params.code == "tardos":
        return tardos.arcsine_bias(uniforms(secret.derive("code-bias"), params.length), params.max_colluders)
    if params.code == "random":
        return uniform_bias(params.length)
    rows = bibd.code_rows(bibd.plane_order_for(params.max_colluders))
    return rows.mean(axis=0)  # BIBD rows are fixed; the column means describe them
