"""The registry's bases: the models copies were issued from (their projections, strengths and carrier
layouts in the database; the weights of the current base and of the anchors in
``bases/<digest>.safetensors``) and, per base that keeps its model, the function mark's record. The current
base is the one copies are issued from now; the earlier ones stay readable so a tracer can read each suspect
against the model it was made from."""

from __future__ import annotations

import json
import math
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from securemark.registry.params import RegistryError
from securemark.registry.store import Store, _db_errors

if TYPE_CHECKING:
    import torch

BASES_DIR = "bases"


@dataclass(frozen=True)
class Base:
    """The model the copies are made from: its digest, projection h = X v (L,), strength and layout id."""

    digest: str
    reference: np.ndarray = field(repr=False)
    strength: float
    tensors: tuple[tuple[str, tuple[int, ...]], ...]  # the carrier's tensors: suspects are checked by name
    label: str = ""  # what the base was, for reports ("round 3"); the current base has none
    # whether its model file is kept in bases/: True (an anchor: suspects are aligned to it), False (its
    # projection alone: read, never aligned to), None (recorded before the registry said: kept if present)
    kept: bool | None = None

    def info(self) -> dict[str, object]:
        info = {"digest": self.digest, "strength": self.strength, "tensors": [[n, list(s)] for n, s in self.tensors],
                "label": self.label}  # fmt: skip
        return info if self.kept is None else {**info, "kept": self.kept}

    @classmethod
    def from_info(cls, info: dict, reference: bytes) -> Base:
        tensors = tuple((name, tuple(shape)) for name, shape in info["tensors"])
        label, kept = info.get("label", ""), info.get("kept")
        if kept is not None and not isinstance(kept, bool):
            raise ValueError(f"base {info['digest'][:12]}: 'kept' is {kept!r}, not true or false")
        reference_array = np.frombuffer(reference, dtype=np.float64).copy()
        return cls(info["digest"], reference_array, info["strength"], tensors, label, kept)


class BasesMixin(Store):
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
            current = replace(base, label="", kept=True)  # its model file is written before this record
            conn.execute("INSERT INTO meta VALUES ('base', ?)", (json.dumps(current.info()),))
            conn.execute("INSERT INTO arrays VALUES ('reference', ?)", (base.reference.tobytes(),))

    @_db_errors
    def add_base(self, base: Base) -> None:
        """Record an earlier base (a training round's model that copies were issued from); the same digest
        again is a no-op. Its carrier layout must be every other base's: one projection reads them all.
        ``base.kept`` says whether its model file was written (:meth:`save_base_model`) or only its projection
        is kept (a registry keeps a model every few rounds: see :meth:`rounds_since_kept`)."""
        _check_digest(base.digest)
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM meta WHERE key = ?", (f"base/{base.digest}",)).fetchone() is not None:
                return
            self._check_layout(conn, base)
            conn.execute("INSERT INTO meta VALUES (?, ?)", (f"base/{base.digest}", json.dumps(base.info())))
            conn.execute("INSERT INTO arrays VALUES (?, ?)", (f"reference/{base.digest}", base.reference.tobytes()))

    @_db_errors
    def rounds_since_kept(self) -> int | None:
        """How many bases were recorded after the last one whose model file is kept (None: none is kept).
        Decides, from the registry alone, whether a run's next base keeps its model (also after a resume).
        Reads the bases' records only, never their projections: a run asks every round."""
        rows = self._conn.execute("SELECT key, value FROM meta WHERE key LIKE 'base/%' ORDER BY rowid").fetchall()
        current = self._conn.execute("SELECT value FROM meta WHERE key = 'base'").fetchone()
        kept = [json.loads(v).get("kept") is not False for _, v in rows]
        if current is not None:
            digest = json.loads(current[0])["digest"]
            kept = [k for (key, _), k in zip(rows, kept, strict=True) if key != f"base/{digest}"] + [True]
        return None if not any(kept) else kept[::-1].index(True)

    @_db_errors
    def has_base(self, digest: str) -> bool:
        """Whether a base of model ``digest`` is recorded (current or earlier)."""
        rows = self._conn.execute("SELECT value FROM meta WHERE key = ? OR key = 'base'", (f"base/{digest}",))
        return any(json.loads(v)["digest"] == digest for (v,) in rows)

    def size(self) -> dict[str, int]:
        """Bytes on disk: the database (with its WAL, checkpointed first if no other connection is busy) and
        the model files of recorded bases, how many bases there are and how many have their model file."""
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")  # never waits for another connection
        db = sum(p.stat().st_size for p in self.directory.glob("registry.sqlite*") if p.is_file())
        bases = self.bases()
        files = [p for b in bases if (p := self.model_path(b.digest)).is_file()]
        return {"database_bytes": db, "model_bytes": sum(p.stat().st_size for p in files), "model_files": len(files),
                "bases": len(bases), "bases_with_model": len(files)}  # fmt: skip

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
    def set_arch(self, record: dict[str, Any]) -> None:
        """Record the bases' architecture (fingerprint.arch: import path, arguments, input shape, graph digest,
        unit groups). Set once: a registry's bases share one architecture; the same record again is a no-op."""
        with self._write() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'arch'").fetchone()
            if row is not None:
                if json.loads(row[0]).get("graph") != record.get("graph"):
                    raise RegistryError("this registry already records another architecture (its graph differs)")
                return
            conn.execute("INSERT INTO meta VALUES ('arch', ?)", (json.dumps(record),))

    @_db_errors
    def arch(self) -> dict[str, Any] | None:
        """The architecture record (:meth:`set_arch`), or None for a registry made without one."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'arch'").fetchone()
        return None if row is None else json.loads(row[0])

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

    def model_path(self, digest: str) -> Path:
        """Where the model of base ``digest`` is kept, if it is."""
        return self.directory / BASES_DIR / f"{digest}.safetensors"

    def keeps_model(self, base: Base) -> bool:
        """Whether ``base``'s model file is kept (an anchor); RegistryError when recorded as kept and missing."""
        if base.kept is False:
            return False
        if self.model_path(base.digest).is_file():
            return True
        if base.kept:
            raise RegistryError(f"base model {base.digest[:12]} is recorded as kept and is missing: removed?")
        return False

    def base_model(self, base: Base | None = None) -> dict[str, torch.Tensor] | None:
        """The model of ``base`` (default: the current one), read back and checked against its recorded
        digest (RegistryError if it was altered, removed or is unreadable). None when no base is recorded yet,
        when only the base's projection is kept (``kept`` False), or when the registry predates kept base
        models (no ``bases/`` file and no ``kept`` record): callers then read it without aligning to it."""
        from securemark.modelio import ModelFileError, load_state_dict, state_digest

        base = self.base() if base is None else base
        if base is None or base.kept is False:
            return None
        path = self.model_path(base.digest)
        if not path.is_file():
            if base.kept:
                raise RegistryError(f"base model {path} is recorded as kept and is missing: removed?")
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
