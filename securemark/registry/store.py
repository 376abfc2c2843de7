"""The registry's SQLite store: the tables, creating and opening the database (mode 0600, WAL), the write
transaction that serializes concurrent issuers, the issue lock, and the two things derived from the owner
secret once and read back (the secret itself from ``owner.key``, the code's bias vector from the database).

:class:`Store` holds the state every other part of :class:`~securemark.registry.Registry` works on."""

from __future__ import annotations

import fcntl
import functools
import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import ParamSpec, Self, TypeVar

import numpy as np

from securemark.codes import drawn
from securemark.fingerprint.keys import OwnerSecret, SecretFileError
from securemark.registry.params import RegistryError, RegistryParams

FORMAT = 1
DB_NAME = "registry.sqlite"
KEY_NAME = "owner.key"
ISSUE_LOCK = ".issuing"  # flock'd by whoever issues copies (Registry.issuing); never part of the registry's files
_PRIVATE = stat.S_IRWXG | stat.S_IRWXO  # any of these bits on the database or the key is refused

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE arrays (name TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE customers (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, code BLOB UNIQUE NOT NULL, issued_at TEXT NOT NULL);
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, customer_id INTEGER NOT NULL REFERENCES customers(id),
    sha256 TEXT NOT NULL, issued_at TEXT NOT NULL, note TEXT NOT NULL DEFAULT '');
"""

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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Store:
    def __init__(self, directory: Path, conn: sqlite3.Connection, params: RegistryParams) -> None:
        self.directory = directory
        self._conn = conn
        self.params = params
        self._secret: OwnerSecret | None = None
        self._bias: np.ndarray | None = None

    # --- opening -----------------------------------------------------------------------------------
    @classmethod
    def init(cls, directory: str | Path, params: RegistryParams) -> Self:
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
                bias = drawn.bias(secret, params.code, params.length, params.max_colluders)
                c.execute("INSERT INTO arrays VALUES ('bias', ?)", (bias.tobytes(),))
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
    def open(cls, directory: str | Path) -> Self:
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

    def __enter__(self) -> Self:
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
