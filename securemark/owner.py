"""The model owner's workflow on top of the registry: issue fingerprinted copies of a base model."""

from __future__ import annotations

from collections.abc import Iterable

from securemark.fingerprint.carrier import CarrierLayout, StateDict
from securemark.fingerprint.embed import Fingerprinter, Projection
from securemark.modelio import state_digest
from securemark.registry import Base, Registry


def fingerprinter(registry: Registry, model: StateDict) -> Fingerprinter:
    """The registry's fingerprinter; once a base is recorded, ``model`` must have its carrier tensors
    (CarrierMismatch names the first missing or misshapen one)."""
    base = registry.base()
    if base is None:
        return Fingerprinter.create(registry.secret, registry.params.carrier, model, registry.params.length)
    layout = CarrierLayout(registry.params.carrier, base.tensors)
    layout.check(model)
    return Fingerprinter(layout, Projection.derive(registry.secret, layout.size, registry.params.length))


def establish_base(
    registry: Registry, base_model: StateDict, strength: float | None = None
) -> tuple[Fingerprinter, Base]:
    """Record ``base_model`` as the registry's base (once): its projection and the embedding strength."""
    fp = fingerprinter(registry, base_model)
    current = registry.base()
    digest = state_digest(base_model)
    if current is not None and current.digest == digest:
        return fp, current
    if strength is None:
        strength = fp.strength_for_budget(base_model, registry.params.budget)
    base = Base(digest, fp.project(base_model), strength, fp.layout.tensors)
    registry.set_base(base)  # raises if a different base was recorded before
    return fp, base


def issue_copies(
    registry: Registry, base_model: StateDict, customers: Iterable[str], note: str = "", strength: float | None = None
) -> dict[str, dict]:
    """Copies of ``base_model`` for each customer, each recorded in the registry (sha256 of its tensors).

    The base is hashed and the projection derived once for the whole batch, not once per customer.
    """
    fp, base = establish_base(registry, base_model, strength)
    copies = {}
    for name in customers:
        cust = registry.customer(name)
        copies[name] = fp.embed(base_model, cust.bits, base.strength)
        registry.record_delivery(cust, state_digest(copies[name]), note)
    return copies


def issue_copy(registry: Registry, base_model: StateDict, customer: str, note: str = "") -> dict:
    """The copy of ``base_model`` for one customer (see :func:`issue_copies`)."""
    return issue_copies(registry, base_model, [customer], note)[customer]


# --- federated customers: one per client partition, stable across runs (never Flower's random node ids) ----
def customer_name(partition_id: int) -> str:
    return f"client-{partition_id:03d}"


def partition_of(customer: str) -> int:
    """The partition-id of a federated customer named by :func:`customer_name`."""
    prefix, _, number = customer.rpartition("-")
    if prefix != "client" or not number.isdigit():
        raise ValueError(f"{customer!r} is not a federated customer name (client-<partition-id>)")
    return int(number)
