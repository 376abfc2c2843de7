"""The registry's customers and deliveries: one code row per customer, issued once and never to two
customers, the codebook a tracer scores against, the hash of every model delivered, and the identities two
nodes claimed in a run (contested: a tracer does not accuse them)."""

from __future__ import annotations

import json
import sqlite3
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from securemark.codes import bibd, drawn, pack_bits, unpack_bits
from securemark.registry.params import RegistryError
from securemark.registry.store import Store, _db_errors, _now


@dataclass(frozen=True)
class Customer:
    index: int
    name: str
    bits: np.ndarray = field(repr=False)


class CustomersMixin(Store):
    @staticmethod
    def check_customer_name(name: str) -> None:
        if not isinstance(name, str) or not name or name != name.strip():
            raise RegistryError(f"customer name {name!r} must be non-empty without surrounding spaces")
        if any(unicodedata.category(c) == "Cc" for c in name):
            raise RegistryError(f"customer name {name!r} holds a control character")

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
        return drawn.row(self.bias(), self.secret, index)

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
    def contest(self, name: str, why: str) -> None:
        """Mark customer ``name`` contested: two nodes of a run claimed its identity, so its copies may have
        reached either and a copy that reads as its own names no one. The first reason is kept."""
        self.check_customer_name(name)
        with self._write() as conn:
            record = json.dumps({"why": str(why), "at": _now()})
            conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (f"contested/{name}", record))

    @_db_errors
    def contested(self) -> dict[str, str]:
        """Contested customers and why (:meth:`contest`)."""
        rows = self._conn.execute("SELECT key, value FROM meta WHERE substr(key, 1, 10) = 'contested/'")
        return {key[len("contested/") :]: str(json.loads(value)["why"]) for key, value in rows}

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
