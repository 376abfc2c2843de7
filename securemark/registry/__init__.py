"""The owner's registry: code parameters, the secret bias vector, one code row per customer, the hashes of
every delivered model, and the embedding parameters. SQLite in WAL mode; every write is one transaction.

Bases: the *current* base (``set_base``, the model copies are issued from now, e.g. a federation's final model)
and the earlier bases copies were issued from (``add_base``, e.g. each training round's global model). A
tracer reads a suspect against every one of them, so a copy handed out in round 3 of 50 is read against the
model it was made from, not through 47 rounds of training drift. Every base keeps its projection; an earlier
base keeps its model file only when it is an anchor (``Base.kept``: a federation keeps every
``fingerprint.anchor_every``-th), so a run's registry grows by a fraction of a model per round.

The owner secret lives beside it in ``owner.key`` (mode 0600) and nowhere else: the registry stores what
is derived from it (bias, code rows) so tracing reads one file, but never the key itself. The database is
mode 0600 too: whoever reads the code rows and the bias can forge a copy that frames any customer. The base
models kept are in ``bases/<digest>.safetensors`` (0600), so a tracer can align suspects to them.

:class:`Registry` is one class put together from one part per job, each a subclass of
:class:`~securemark.registry.store.Store` (the connection, the write lock, the secret and the bias) in a
module of its own: :mod:`~securemark.registry.customers` (code rows, customers, deliveries),
:mod:`~securemark.registry.bases` (bases, base-model files, function marks) and
:mod:`~securemark.registry.files` (the files()/from_files round trip). Callers keep one object and one set
of methods; each module reads only the Store state it needs. How the bias and the code rows are drawn from
the owner secret is :mod:`securemark.codes.drawn`; the registry stores what it returns.
"""

from securemark.registry.bases import BASES_DIR, Base, BasesMixin
from securemark.registry.customers import Customer, CustomersMixin
from securemark.registry.files import FilesMixin
from securemark.registry.params import RegistryError, RegistryParams
from securemark.registry.store import DB_NAME, FORMAT, ISSUE_LOCK, KEY_NAME


class Registry(CustomersMixin, BasesMixin, FilesMixin):
    """An open registry: :meth:`init` makes a new one, :meth:`open` reads one, :meth:`from_files` writes
    a copy and opens it; use it as a context manager or :meth:`close` it."""


__all__ = [
    "BASES_DIR",
    "DB_NAME",
    "FORMAT",
    "ISSUE_LOCK",
    "KEY_NAME",
    "Base",
    "Customer",
    "Registry",
    "RegistryError",
    "RegistryParams",
]
