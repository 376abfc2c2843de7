"""The model owner's workflow on top of the registry: issue fingerprinted copies of a base model."""

from __future__ import annotations

import math
from collections.abc import Iterable

from securemark.fingerprint.carrier import CarrierLayout, StateDict
from securemark.fingerprint.embed import Fingerprinter, Projection
from securemark.modelio import first_bad_entry, state_digest
from securemark.registry import Base, Customer, Registry


def fingerprinter(registry: Registry, model: StateDict) -> Fingerprinter:
    """The registry's fingerprinter; once a base is recorded, ``model`` must have its carrier tensors
    (CarrierMismatch names the first missing or misshapen one). Every base has the same layout."""
    bases = registry.bases()
    if not bases:
        return Fingerprinter.create(registry.secret, registry.params.carrier, model, registry.params.length)
    layout = CarrierLayout(registry.params.carrier, bases[-1].tensors)
    layout.check(model)
    return Fingerprinter(layout, Projection.derive(registry.secret, layout.size, registry.params.length))


def check_finite(model: StateDict) -> None:
    """Refuse a model with NaN or inf in a floating tensor: every copy made from it would carry them, and
    the strength computed from it would be NaN (copies that hold no readable mark)."""
    bad = first_bad_entry(model)
    if bad is not None:
        raise ValueError(f"base model tensor {bad[0]!r} holds NaN or inf values; refusing to issue copies of it")


def check_strength(strength: float) -> None:
    """Refuse a strength that gives unmarked (0) or NaN copies."""
    if not 0 < strength < math.inf:  # NaN fails this too
        why = " (the base model's carrier tensors are all zero)" if strength == 0 else ""
        raise ValueError(f"embedding strength must be finite and > 0, got {strength}{why}; no copy issued")


def establish_base(
    registry: Registry, base_model: StateDict, strength: float | None = None
) -> tuple[Fingerprinter, Base]:
    """Record ``base_model`` as the registry's base (once): its projection, the embedding strength, and the
    model itself (``registry.save_base_model``: a tracer aligns suspects to it).

    Refuses (ValueError) a base that would give unmarked or NaN copies: NaN/inf in a floating tensor, or a
    strength that is 0 (an all-zero carrier) or not finite. Checked here so that the CLI, the Flower server
    and the evaluation all get it."""
    fp = fingerprinter(registry, base_model)
    current = registry.base()
    digest = state_digest(base_model)
    if current is not None and current.digest == digest:
        return fp, current
    check_finite(base_model)
    if strength is None:
        strength = fp.strength_for_budget(base_model, registry.params.budget)
    check_strength(strength)
    base = Base(digest, fp.project(base_model), strength, fp.layout.tensors)
    if current is None:  # the file first, then the record that points at it; a different base is refused below
        registry.save_base_model(base_model)
    registry.set_base(base)  # raises if a different base was recorded before (also by a concurrent issuer)
    return fp, base


def add_earlier_base(registry: Registry, fp: Fingerprinter, model: StateDict, strength: float, label: str) -> Base:
    """Record ``model`` as a base copies are issued from along the way (a training round's global model):
    its projection, and the model itself for alignment. The current base is left as it is."""
    check_finite(model)
    check_strength(strength)
    digest = registry.save_base_model(model)
    base = Base(digest, fp.project(model), strength, fp.layout.tensors, label)
    registry.add_base(base)
    return base


def make_copy(
    registry: Registry, base_model: StateDict, customer: str, strength: float | None = None
) -> tuple[dict, Customer]:
    """The copy of ``base_model`` for ``customer``, and the customer, WITHOUT recording a delivery: a caller
    that writes the copy to a file calls ``registry.record_delivery`` once the write succeeded, so the
    registry never lists a delivery that does not exist."""
    fp, base = establish_base(registry, base_model, strength)
    cust = registry.customer(customer)
    return fp.embed(base_model, cust.bits, base.strength), cust


def issue_copies(
    registry: Registry, base_model: StateDict, customers: Iterable[str], note: str = "", strength: float | None = None
) -> dict[str, dict]:
    """Copies of ``base_model`` for each customer, each recorded in the registry (sha256 of its tensors) as
    it is made: for copies handed over in memory. To write files first, use :func:`make_copy`.

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
    """The copy of ``base_model`` for one customer, recorded as delivered (see :func:`issue_copies`)."""
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
