"""The owner's registry: code parameters, the secret bias vector, one code row per customer, the hashes of
every delivered model, and the embedding parameters. SQLite in WAL mode; every write is one transaction.

Bases: the *current* base (``set_base``, the model copies are issued from now, e.g. a federation's final model)
and the earlier bases copies were issued from (``add_base``, e.g. each training round's global model). A
tracer reads a suspect against every one of them, so a copy handed out in round 3 of 50 is read against the
model it was made from, not through 47 rounds of training drift.

The owner secret lives beside it in ``owner.key`` (mode 0600) and nowhere else: the registry stores what
is derived from it (bias, code rows) so tracing reads one file, but never the key itself. The database is
mode 0600 too: whoever reads the code rows and the bias can forge a copy that frames any customer. The base
model itself is kept in ``bases/<digest>.safetensors`` (0600), so a tracer can align suspects to it.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import re
import shutil
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import numpy as np

from securemark.codes import bibd, pack_bits, tardos, unpack_bits
from securemark.codes.base import CODE_KINDS
from securemark.codes.random import uniform_bias
from securemark.fingerprint.carrier import CARRIER_MODES, CarrierSpec
from securemark.fingerprint.keys import OwnerSecret, SecretFileError
from securemark.prg import uniforms

if TYPE_CHECKING:
    import torch

FORMAT = 1
DB_NAME = "registry.sqlite"
KEY_NAME = "owner.key"
BASES_DIR = "bases"
ISSUE_LOCK = ".issuing"  # flock'd by whoever issues copies (Registry.issuing); never part of the registry's files
_PRIVATE = stat.S_IRWXG | stat.S_IRWXO  # any of these bits on the database or the key is refused
_FILE_NAMES = re.compile(rf"({re.escape(KEY_NAME)}|{re.escape(DB_NAME)}|{BASES_DIR}/[0-9a-f]{{64}}\.safetensors)")

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


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _db_errors(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """sqlite3.DatabaseError (a corrupt page, a truncated file, a locked or full disk), and the Type/Value/
    KeyError of decoding a damaged row (SQLite is dynamically typed: a bad page can turn a BLOB into NULL),
    become a one-line RegistryError: the CLI turns that into exit 2, not a traceback."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except (sqlite3.DatabaseError, TypeError, ValueError, KeyError) as exc:
            where = getattr(args[0], "directory", "?")
            raise RegistryError(f"registry {where}/{DB_NAME} is unusable (corrupt?): {exc}") from None

    return wrapper


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
        # every check is written so that NaN fails it (NaN compares False with everything)
        if not self.max_colluders >= 1:
            raise RegistryError(f"need max_colluders >= 1, got {self.max_colluders}")
        if not 0 < self.eps < 1:
            raise RegistryError(f"need 0 < eps < 1, got {self.eps}")
        if not 0 < self.budget < math.inf:  # a NaN or infinite budget gives NaN or infinite copies
            raise RegistryError(f"need a finite budget > 0, got {self.budget}")
        if self.code == "bibd":
            q = bibd.plane_order_for(self.max_colluders)
            object.__setattr__(self, "length", q * q + q + 1)  # the design fixes the length
        elif not self.length >= 16:
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
    label: str = ""  # what the base was, for reports ("round 3"); the current base has none

    def info(self) -> dict[str, object]:
        return {"digest": self.digest, "strength": self.strength, "tensors": [[n, list(s)] for n, s in self.tensors],
                "label": self.label}  # fmt: skip

    @classmethod
    def from_info(cls, info: dict, reference: bytes) -> Base:
        tensors = tuple((name, tuple(shape)) for name, shape in info["tensors"])
        label = info.get("label", "")
        return cls(info["digest"], np.frombuffer(reference, dtype=np.float64).copy(), info["strength"], tensors, label)


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
        """A new registry with a fresh owner secret. ``params`` were validated when built, before anything
        here touches the disk; if init fails midway it removes what it created (directories, key, database)
        and nothing else, so a failed init can simply be run again."""
        if not isinstance(params, RegistryParams):
            raise TypeError(f"params must be RegistryParams, got {type(params).__name__}")
        directory = Path(directory)
        db, key = directory / DB_NAME, directory / KEY_NAME
        sides = [db.with_name(db.name + s) for s in ("-wal", "-shm")]
        if any(p.exists() for p in (db, key, *sides)):
            raise RegistryError(f"{directory} already holds a registry; refusing to overwrite it")
        new_dirs = [d for d in (directory, *directory.parents) if not d.exists()]  # deepest first
        created: list[Path] = []  # appended only once made, so a racing init's files are never removed
        conn: sqlite3.Connection | None = None
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            secret = OwnerSecret.generate()
            secret.save(key)
            created.append(key)
            os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # 0600 before sqlite opens it
            created += [db, *sides]  # SQLite gives -wal and -shm the database file's mode
            conn = cls._connect(db)
            reg = cls(directory, conn, params)
            reg._secret = secret
            with reg._write() as c:
                for statement in _SCHEMA.split(";"):  # not executescript: it would COMMIT mid-transaction
                    c.execute(statement)
                meta = {"format": FORMAT, "params": asdict(params), "created_at": _now()}
                c.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
                c.execute("INSERT INTO arrays VALUES ('bias', ?)", (_bias(secret, params).tobytes(),))
            for path in (db, *sides):  # whatever the umask or SQLite version did
                with suppress(FileNotFoundError):
                    path.chmod(0o600)
            return reg
        except BaseException as exc:
            if conn is not None:
                conn.close()
            for path in created:
                path.unlink(missing_ok=True)
            for d in new_dirs:
                with suppress(OSError):  # never removes a directory something else has put files in
                    d.rmdir()
            if isinstance(exc, sqlite3.DatabaseError):
                raise RegistryError(f"could not create the registry at {directory}: {exc}") from None
            raise

    @classmethod
    def open(cls, directory: str | Path) -> Registry:
        """An existing registry; refused if its database is accessible by group or others (like owner.key)."""
        directory = Path(directory)
        db = directory / DB_NAME
        if not db.is_file():
            raise RegistryError(f"no registry at {directory} (missing {DB_NAME}); create one with 'registry init'")
        mode = stat.S_IMODE(db.stat().st_mode)
        if mode & _PRIVATE:
            raise RegistryError(
                f"registry {db} is accessible by group or others (mode {mode:o}) and its code rows let a reader"
                f" frame any customer; run: chmod 600 {db}"
            )
        try:
            conn = cls._connect(db)
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"registry {db} is corrupt or not a securemark registry ({exc})") from None
        try:
            meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
            fields: dict = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["params"].items()}
            params = RegistryParams(**fields)
        except (sqlite3.DatabaseError, KeyError, TypeError, ValueError, RegistryError) as exc:
            conn.close()
            raise RegistryError(f"registry {db} is corrupt or not a securemark registry ({exc})") from None
        if meta.get("format") != FORMAT:
            conn.close()
            raise RegistryError(f"registry {db} has format {meta.get('format')}, this securemark reads {FORMAT}")
        return cls(directory, conn, params)

    def files(self) -> dict[str, bytes]:
        """The registry's own files (owner key, database, kept bases) by relative path: a consistent copy, the
        WAL checkpointed into the database first (refused while another connection reads, which would leave
        recent writes out). It holds the owner secret: ship it only where the owner would keep the registry
        itself (an evaluation's throwaway registry on the owner's own Ray workers)."""
        busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise RegistryError(f"{self.directory} is being read by another connection; copy it once that is done")
        bases = self.directory / BASES_DIR
        paths = [self.directory / KEY_NAME, self.directory / DB_NAME, *sorted(bases.glob("*.safetensors"))]
        names = {p.relative_to(self.directory).as_posix(): p for p in paths if p.is_file() and not p.is_symlink()}
        return {name: p.read_bytes() for name, p in names.items() if _FILE_NAMES.fullmatch(name)}  # no temp files

    @classmethod
    def from_files(cls, directory: str | Path, files: dict[str, bytes]) -> Registry:
        """A registry written from :meth:`files` into ``directory`` (which must not exist; 0700, files 0600) and
        opened. Names other than the registry's own are refused before anything is written; a failure
        midway removes what was written."""
        directory = Path(directory)
        odd = [name for name in files if not _FILE_NAMES.fullmatch(name)]
        if odd or DB_NAME not in files or KEY_NAME not in files:
            raise RegistryError(f"not a registry's files: unexpected {odd} or {DB_NAME}/{KEY_NAME} missing")
        if directory.exists():
            raise RegistryError(f"{directory} already exists; a registry copy goes into a new folder")
        try:
            (directory / BASES_DIR).mkdir(parents=True, mode=0o700)
            directory.chmod(0o700)
            for name, content in files.items():
                fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(content)
            return cls.open(directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

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
            if self._conn.in_transaction:  # SQLite may have rolled back already (a corrupt page, a full disk)
                self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @contextmanager
    def issuing(self) -> Iterator[None]:
        """Held by an issuer from its first check to its last delivery recorded (an exclusive lock on a file
        in the registry's folder): two issuers at once, such as two `securemark issue` with different
        --config, run one after the other, so each one's checks see all the other wrote. Without it, one
        could record a function mark between another's check and its copy, and copies of one base would
        carry different marks. Released when the block ends, or when the process dies."""
        with open(self.directory / ISSUE_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @_db_errors
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

    @_db_errors
    def bias(self) -> np.ndarray:
        """The code's bias vector (written once at init): read once per open registry, a copy each call.
        Checked to lie in (0, 1): SQLite does not checksum blobs, and a damaged bias would skew every score."""
        if self._bias is None:
            p = np.frombuffer(self._array("bias"), dtype=np.float64).copy()
            if p.shape != (self.params.length,) or not np.all((p > 0) & (p < 1)):
                raise RegistryError(f"registry {self.directory}: the stored bias is corrupt")
            self._bias = p
        return self._bias.copy()

    def _array(self, name: str) -> bytes:
        row = self._conn.execute("SELECT data FROM arrays WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise RegistryError(f"registry {self.directory} has no {name!r} yet")
        return bytes(row[0])

    # --- customers ---------------------------------------------------------------------------------
    @staticmethod
    def check_customer_name(name: str) -> None:
        if not isinstance(name, str) or not name or name != name.strip():
            raise RegistryError(f"customer name {name!r} must be non-empty without surrounding spaces")

    @_db_errors
    def customer(self, name: str, *, create: bool = True) -> Customer:
        """The customer called ``name``; a new one gets the next code row (never one already issued)."""
        self.check_customer_name(name)
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

    @_db_errors
    def code_row(self, index: int) -> np.ndarray:
        """Bits of code row ``index``, derived from the owner secret (deterministic per registry)."""
        if self.params.code == "bibd":
            return bibd.code_rows(bibd.plane_order_for(self.params.max_colluders))[index]
        return tardos.draw_rows(self.bias(), uniforms(self.secret.derive(f"code-row/{index}"), self.params.length))

    @_db_errors
    def customers(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT name FROM customers ORDER BY id")]

    @_db_errors
    def codebook(self) -> tuple[list[str], np.ndarray]:
        """Names and row-major packed code rows of every customer, in index order."""
        rows = self._conn.execute("SELECT name, code FROM customers ORDER BY id").fetchall()
        nbytes = (self.params.length + 7) // 8
        blob = b"".join(r[1] for r in rows)
        if len(blob) != len(rows) * nbytes:
            raise RegistryError(f"registry {self.directory}: stored code rows are not {nbytes} bytes each (corrupt)")
        return [r[0] for r in rows], np.frombuffer(blob, dtype=np.uint8).reshape(len(rows), nbytes)

    @_db_errors
    def record_delivery(self, customer: Customer, sha256: str, note: str = "") -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO deliveries (customer_id, sha256, issued_at, note) VALUES (?, ?, ?, ?)",
                (customer.index, sha256, _now(), note),
            )

    @_db_errors
    def deliveries(self, name: str | None = None) -> list[dict[str, str]]:
        q = "SELECT c.name, d.sha256, d.issued_at, d.note FROM deliveries d JOIN customers c ON c.id = d.customer_id"
        args: tuple[str, ...] = ()
        if name is not None:
            q, args = q + " WHERE c.name = ?", (name,)
        return [
            dict(zip(("customer", "sha256", "issued_at", "note"), r, strict=True)) for r in self._conn.execute(q, args)
        ]

    # --- embedding parameters ----------------------------------------------------------------------
    @_db_errors
    def base(self) -> Base | None:
        """The current base: the one copies are issued from now (None until the first issue)."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'base'").fetchone()
        return None if row is None else self._checked(Base.from_info(json.loads(row[0]), self._array("reference")))

    @_db_errors
    def bases(self) -> list[Base]:
        """Every base copies were issued from: the earlier ones in the order added, then the current one."""
        rows = self._conn.execute("SELECT key, value FROM meta WHERE key LIKE 'base/%' ORDER BY rowid").fetchall()
        earlier = [self._checked(Base.from_info(json.loads(v), self._array(f"reference/{k[5:]}"))) for k, v in rows]
        current = self.base()
        if current is None:
            return earlier
        return [b for b in earlier if b.digest != current.digest] + [current]

    @_db_errors
    def set_base(self, base: Base) -> None:
        """Record the current base once; a different one is refused (a new base model needs a new registry,
        or :meth:`add_base` for a model that copies were issued from along the way).

        One transaction that re-reads under the write lock: two first issues at once both get here, and the
        second finds the first's base (same digest: nothing to do; another digest: RegistryError)."""
        _check_digest(base.digest)
        with self._write() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'base'").fetchone()
            if row is not None:
                current = json.loads(row[0])["digest"]
                if current != base.digest:
                    raise RegistryError(
                        f"this registry's copies are made from base {current[:12]}; model {base.digest[:12]} "
                        "differs. Use a new registry for a new base model."
                    )
                return
            self._check_layout(conn, base)
            conn.execute("INSERT INTO meta VALUES ('base', ?)", (json.dumps(replace(base, label="").info()),))
            conn.execute("INSERT INTO arrays VALUES ('reference', ?)", (base.reference.tobytes(),))

    @_db_errors
    def add_base(self, base: Base) -> None:
        """Record an earlier base (a training round's model that copies were issued from); the same digest
        again is a no-op. Its carrier layout must be every other base's: one projection reads them all."""
        _check_digest(base.digest)
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM meta WHERE key = ?", (f"base/{base.digest}",)).fetchone() is not None:
                return
            self._check_layout(conn, base)
            conn.execute("INSERT INTO meta VALUES (?, ?)", (f"base/{base.digest}", json.dumps(base.info())))
            conn.execute("INSERT INTO arrays VALUES (?, ?)", (f"reference/{base.digest}", base.reference.tobytes()))

    def _checked(self, base: Base) -> Base:
        """A base read back, refused if damaged: SQLite does not checksum rows, and a strength of inf or a
        short reference would make every reading of a suspect against it empty or misshapen."""
        ok = isinstance(base.strength, int | float) and 0 < base.strength < math.inf
        if not (ok and base.reference.shape == (self.params.length,) and np.all(np.isfinite(base.reference))):
            raise RegistryError(f"registry {self.directory}: the stored base {base.digest[:12]} is corrupt")
        return base

    @staticmethod
    def _check_layout(conn: sqlite3.Connection, base: Base) -> None:
        row = conn.execute("SELECT value FROM meta WHERE key = 'base' OR key LIKE 'base/%' LIMIT 1").fetchone()
        if row is not None and json.loads(row[0])["tensors"] != base.info()["tensors"]:
            raise RegistryError(f"base {base.digest[:12]} has another carrier layout than this registry's bases")

    @_db_errors
    def set_function_mark(self, digest: str, info: dict[str, Any], basis: np.ndarray) -> None:
        """Record the function mark's parameters for base ``digest`` (fingerprint.function): ``info`` (JSON:
        the layer it edits, the model to rebuild, the data it was fitted on) and the basis array. Written
        once per base; the same base again keeps the first record (copies already carry it)."""
        _check_digest(digest)
        basis = np.ascontiguousarray(basis, dtype=np.float64)
        if basis.ndim != 2 or not np.all(np.isfinite(basis)):
            raise RegistryError(f"a function-mark basis must be a finite matrix, got shape {basis.shape}")
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM meta WHERE key = ?", (f"function/{digest}",)).fetchone() is not None:
                return
            record = {**info, "basis_shape": list(basis.shape)}
            conn.execute("INSERT INTO meta VALUES (?, ?)", (f"function/{digest}", json.dumps(record)))
            conn.execute("INSERT INTO arrays VALUES (?, ?)", (f"function-basis/{digest}", basis.tobytes()))

    @_db_errors
    def function_mark(self, digest: str) -> tuple[dict[str, Any], np.ndarray] | None:
        """(info, basis) recorded for base ``digest``, or None when its copies carry no function mark."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (f"function/{digest}",)).fetchone()
        if row is None:
            return None
        info = json.loads(row[0])
        if not isinstance(info, dict):
            raise RegistryError(f"registry {self.directory}: the function-mark record of {digest[:12]} is corrupt")
        shape = tuple(info.get("basis_shape", ()))
        flat = np.frombuffer(self._array(f"function-basis/{digest}"), dtype=np.float64)
        if len(shape) != 2 or flat.size != shape[0] * shape[1]:
            raise RegistryError(f"registry {self.directory}: the function-mark basis of {digest[:12]} is corrupt")
        return info, flat.reshape(shape).copy()

    def save_base_model(self, model: Mapping[str, torch.Tensor]) -> str:
        """Keep ``model`` as ``bases/<state digest>.safetensors`` (mode 0600: it is the owner's unmarked
        model) and return the digest. Written to a temporary file beside it and renamed, so a reader (or a
        concurrent first issue writing the same file) only ever sees a whole file."""
        from securemark.modelio import save_atomic, state_digest

        digest = state_digest(model)
        folder = self.directory / BASES_DIR
        folder.mkdir(mode=0o700, exist_ok=True)
        save_atomic(model, folder / f"{digest}.safetensors")
        return digest

    def base_model(self, base: Base | None = None) -> dict[str, torch.Tensor] | None:
        """The model of ``base`` (default: the current one), read back and checked against its recorded
        digest (RegistryError if it was altered or is unreadable). None when no base is recorded yet, or when
        the registry predates kept base models (no ``bases/`` file): callers then trace without aligning
        suspects to the base."""
        from securemark.modelio import ModelFileError, load_state_dict, state_digest

        base = self.base() if base is None else base
        if base is None:
            return None
        path = self.directory / BASES_DIR / f"{base.digest}.safetensors"
        if not path.is_file():
            return None
        try:
            model = load_state_dict(path)
        except ModelFileError as exc:
            raise RegistryError(str(exc)) from None
        if state_digest(model) != base.digest:
            raise RegistryError(f"base model {path} does not match the recorded digest {base.digest[:12]}: altered")
        return model


def _check_digest(digest: str) -> None:
    """A base's digest names its model file: a SHA-256 in hex, nothing else."""
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise RegistryError(f"a base digest is a SHA-256 in hex, got {digest!r}")


def _bias(secret: OwnerSecret, params: RegistryParams) -> np.ndarray:
    if params.code == "tardos":
        return tardos.arcsine_bias(uniforms(secret.derive("code-bias"), params.length), params.max_colluders)
    if params.code == "random":
        return uniform_bias(params.length)
    rows = bibd.code_rows(bibd.plane_order_for(params.max_colluders))
    return rows.mean(axis=0)  # BIBD rows are fixed; the column means describe them
