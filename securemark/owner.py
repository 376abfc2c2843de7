"""The model owner's workflow on top of the registry: issue fingerprinted copies of a base model."""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from securemark.errors import InputError
from securemark.fingerprint.carrier import StateDict
from securemark.fingerprint.embed import Fingerprinter
from securemark.fingerprint.function import Basis, FunctionMark, FunctionMarkError, check_readable, last_linear
from securemark.modelio import first_bad_entry, state_digest
from securemark.registry import Base, Customer, Registry, RegistryError
from securemark.registry.marks import fingerprinter, function_mark_of

if TYPE_CHECKING:
    from securemark.config import SimConfig
    from securemark.data import Dataset


def check_finite(model: StateDict) -> None:
    """Refuse a model with NaN or inf in a floating tensor: every copy made from it would carry them, and
    the strength computed from it would be NaN (copies that hold no readable mark)."""
    bad = first_bad_entry(model)
    if bad is not None:
        raise InputError(f"base model tensor {bad[0]!r} holds NaN or inf values; refusing to issue copies of it")


def check_strength(strength: float) -> None:
    """Refuse a strength that gives unmarked (0) or NaN copies."""
    if not 0 < strength < math.inf:  # NaN fails this too
        why = " (the base model's carrier tensors are all zero)" if strength == 0 else ""
        raise InputError(f"embedding strength must be finite and > 0, got {strength}{why}; no copy issued")


def establish_base(
    registry: Registry, base_model: StateDict, strength: float | None = None
) -> tuple[Fingerprinter, Base]:
    """Record ``base_model`` as the registry's base (once): its projection, the embedding strength, and the
    model itself (``registry.save_base_model``: a tracer aligns suspects to it).

    Refuses (InputError) a base that would give unmarked or NaN copies: NaN/inf in a floating tensor, or a
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


def add_earlier_base(
    registry: Registry, fp: Fingerprinter, model: StateDict, strength: float, label: str, keep_model: bool = True
) -> Base:
    """Record ``model`` as a base copies are issued from along the way (a training round's global model): its
    projection always, and with ``keep_model`` the model itself (an anchor a tracer aligns suspects to).
    The current base is left as it is; a model recorded already is returned as recorded."""
    digest = state_digest(model)
    if registry.has_base(digest):  # e.g. a resumed run records its last round's model again: nothing is written
        return next(b for b in registry.bases() if b.digest == digest)
    check_finite(model)
    check_strength(strength)
    if keep_model:
        registry.save_base_model(model)
    base = Base(digest, fp.project(model), strength, fp.layout.tensors, label, keep_model)
    registry.add_base(base)
    return base


# --- the function mark (fingerprint.function): a second mark, in the copy's outputs -------------------------
@dataclass(frozen=True)
class FunctionSpec:
    """How to put a function mark in copies of a base: the model to run it (models.spec_of), the held-out
    inputs to fit it on and where they came from, and its fidelity budget."""

    model: dict[str, object]
    heldout: torch.Tensor = field(repr=False)
    data: dict[str, object]  # load/split arguments of the held-out data, so a tracer can query with it
    budget: float = 0.03  # top-1 agreement >= 99% beside the white-box mark (bench blackbox)
    skip: int = 10
    components: int = 64

    def carrier_exclude(self) -> tuple[str, ...]:
        """Carrier patterns that keep the white-box mark off the layer this mark edits. The whitened edit
        moves that layer's weights far more than its outputs (low-variance components are scaled up), and
        read as white-box noise it cost the smoke run's round-1 copies 11% bit errors; the layer is a tiny
        share of the carrier (640 of 105k weights in the quickstart CNN)."""
        from securemark import models

        layer, _ = last_linear(models.build_spec(self.model))
        return (f"{layer}.*",)


def establish_function_mark(registry: Registry, base_model: StateDict, spec: FunctionSpec) -> tuple[FunctionMark, str]:
    """The function mark of ``base_model`` (fitted on ``spec.heldout`` and recorded the first time; read back
    after) and the name of the layer it edits."""
    return record_function_mark(registry, base_model, prepare_function_mark(registry, base_model, spec))


# (mark, layer, the record to write: None when it is recorded already)
PreparedMark = tuple[FunctionMark, str, tuple[dict[str, Any], np.ndarray] | None]


def spec_module(spec: FunctionSpec, base_model: StateDict) -> torch.nn.Module:
    """The model ``spec`` names, carrying ``base_model``. A budget outside (0, 1] or weights that are not that
    model's are the caller's mistakes (FunctionMarkError, not FunctionMarkUnfit): found before anything is
    recorded, and before a run's first round."""
    from securemark import models

    if not (isinstance(spec.budget, float | int) and 0 < spec.budget <= 1):
        raise FunctionMarkError(f"function-mark budget must be in (0, 1], got {spec.budget!r}")
    module = models.build_spec(spec.model)
    try:
        module.load_state_dict(dict(base_model))
    except (RuntimeError, AttributeError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        first = " ".join(lines[:2])[:300] if lines else type(exc).__name__  # the heading and its first cause
        name = spec.model.get("name")
        raise FunctionMarkError(f"the base is not the {name} model the config names: {first}") from None
    return module


def prepare_function_mark(registry: Registry, base_model: StateDict, spec: FunctionSpec) -> PreparedMark:
    """Everything about the function mark ``spec`` asks for, checked before anything is recorded: a code
    black-box tracing reads, the base loading strictly into the model ``spec`` names, a carrier that leaves
    the edited layer alone, the basis fitted, an edit that fits the layer; and, when this base has a mark
    recorded already, that it is the one ``spec`` asks for (a later --config never silently loses)."""
    if registry.params.code == "bibd":
        raise RegistryError("the function mark is read as a Tardos or random code; this registry uses BIBD")
    module = spec_module(spec, base_model)
    layer, _ = last_linear(module)
    _check_carrier(registry, base_model, layer)
    recorded = function_mark_of(registry, state_digest(base_model))
    asked = {"budget": float(spec.budget), "skip": spec.skip, "components": spec.components, "model": spec.model,
             "data": spec.data}  # fmt: skip
    if recorded is not None:
        _check_same(recorded[2], asked, "is recorded already")
        return recorded[0], recorded[1], None
    current = registry.base()
    if current is not None and current.digest == state_digest(base_model) and registry.deliveries():
        raise RegistryError("copies of this base were issued without a function mark; recording one now would "
                            "leave them without it (use a new registry, or issue without --config)")  # fmt: skip
    basis = Basis.fit(module, spec.heldout, spec.skip, spec.components)
    check_readable(basis, registry.params.length, registry.params.eps, len(registry.customers()))
    fm = FunctionMark.create(registry.secret, basis, registry.bias(), float(spec.budget))
    fm.embed(dict(base_model), layer, np.zeros(fm.length, dtype=np.uint8))  # the edit fits the layer
    info = {"layer": layer, "skip": basis.skip, "logit_rms": basis.logit_rms, "classes": basis.classes,
            "budget": float(spec.budget), "components": spec.components, "model": spec.model,
            "data": spec.data}  # fmt: skip
    return fm, layer, (info, basis.to_array())


def record_function_mark(registry: Registry, base_model: StateDict, prepared: PreparedMark) -> tuple[FunctionMark, str]:
    """Write a prepared mark's record (first writer wins) and read it back, as a tracer will."""
    fm, layer, new = prepared
    if new is None:
        return fm, layer
    digest = state_digest(base_model)
    registry.set_function_mark(digest, *new)
    recorded = function_mark_of(registry, digest)
    assert recorded is not None
    # an issuer outside registry.issuing() may have recorded this base's mark between prepare and here: its
    # copies and ours must carry the same one, so a different one is refused, before any copy is made
    _check_same(recorded[2], new[0], "was recorded first")
    return recorded[0], recorded[1]


_CHOSEN = ("budget", "skip", "components", "model", "data")  # what an issuer chooses of a function mark


def _check_same(info: dict[str, Any], asked: dict[str, Any], how: str) -> None:
    """Refused (RegistryError) when a recorded function mark's ``info`` is not the one ``asked`` for, on
    what an issuer chooses (_CHOSEN; the rest of a record is fitted)."""
    from securemark import models

    same = {"model": models.same_spec}  # width 0 is the default width
    # as it would be recorded: a shape given as a tuple is a list there
    asked = json.loads(json.dumps({k: asked[k] for k in _CHOSEN}))
    if "components" not in info:  # recorded before the number of components was: not compared
        asked.pop("components", None)
    differ = {k: (info.get(k), v) for k, v in asked.items() if not same.get(k, operator.eq)(info.get(k), v)}
    if differ:
        what = "; ".join(f"{k}: recorded {a!r}, asked {b!r}" for k, (a, b) in differ.items())
        raise RegistryError(f"this base's function mark {how}, differently ({what})")


def function_mark_for(
    registry: Registry, base_model: StateDict, function: FunctionSpec | None = None
) -> PreparedMark | None:
    """The function mark copies of ``base_model`` carry, checked and not yet recorded: the one ``function``
    asks for, else the one already recorded for this base (every copy of a base carries the marks recorded
    for it, whoever issues it), else None."""
    if function is not None:
        return prepare_function_mark(registry, base_model, function)
    recorded = function_mark_of(registry, state_digest(base_model))
    if recorded is None:
        return None
    _check_carrier(registry, base_model, recorded[1])
    return recorded[0], recorded[1], None


def _check_carrier(registry: Registry, base_model: StateDict, layer: str) -> None:
    """Refused, before anything is recorded, when the registry's white-box carrier covers the layer the
    function mark edits: the whitened edit moves its weights far more than its outputs, and white-box
    tracing would read that as noise."""
    covered = [name for name, _ in registry.params.carrier.select(base_model) if name.startswith(layer + ".")]
    if covered:
        raise RegistryError(
            f"this registry's white-box carrier includes {', '.join(covered)}, which the function mark edits; "
            f"create the registry with --exclude '{layer}.*' (FunctionSpec.carrier_exclude)"
        )


def function_spec(cfg: SimConfig, test: Dataset) -> FunctionSpec | None:
    """The function mark a run of ``cfg`` puts in its copies (fingerprint.function_budget > 0; None when 0
    or fingerprinting is off): fitted on the server's held-out share ``test``, which is also what a tracer
    queries with by default."""
    from securemark import data, models

    f = cfg.fingerprint
    if not (f.enabled and f.function_budget > 0):
        return None
    shape = tuple(int(d) for d in test.x.shape[1:])
    spec = models.spec_of(cfg.model.name, shape, test.classes, cfg.model.width)  # type: ignore[arg-type]
    return FunctionSpec(spec, test.x, data.heldout_record(cfg.data, cfg.train.seed), f.function_budget)


def make_copy(
    registry: Registry,
    base_model: StateDict,
    customer: str,
    strength: float | None = None,
    function: FunctionSpec | None = None,
) -> tuple[dict, Customer]:
    """The copy of ``base_model`` for ``customer``, and the customer, WITHOUT recording a delivery: a caller
    that writes the copy to a file calls ``registry.record_delivery`` once the write succeeded, so the
    registry never lists a delivery that does not exist; it holds ``registry.issuing()`` around both."""
    return next(copies_for(registry, base_model, [customer], strength, function))


def copies_for(
    registry: Registry,
    base_model: StateDict,
    customers: Sequence[str],
    strength: float | None = None,
    function: FunctionSpec | None = None,
) -> Iterator[tuple[dict, Customer]]:
    """:func:`make_copy` for each of ``customers`` in turn, from one preparation (the base hashed and recorded,
    the projection derived, the function mark fitted once): the same copies as one call each. Names are checked
    before anything is recorded; each customer is recorded as its copy is made (no delivery: see make_copy)."""
    for name in customers:
        Registry.check_customer_name(name)
    prepared = function_mark_for(registry, base_model, function)  # checked before anything is recorded
    fp, base = establish_base(registry, base_model, strength)
    fm = None if prepared is None else record_function_mark(registry, base_model, prepared)
    for name in customers:
        cust = registry.customer(name)
        yield mark(fp, base.strength, fm, base_model, cust.bits), cust


def relative_change(copy: StateDict, base: StateDict) -> float:
    """||copy - base|| / ||base|| over the floating tensors: how far a copy is from its base (its fidelity)."""
    moved = total = 0.0
    for name, b in base.items():
        if b.is_floating_point():
            moved += float((copy[name].double() - b.double()).pow(2).sum())
            total += float(b.double().pow(2).sum())
    return math.sqrt(moved / total) if total > 0 else 0.0


def mark(
    fp: Fingerprinter, strength: float, fm: tuple[FunctionMark, str] | None, model: StateDict, bits: np.ndarray
) -> dict:
    """A copy carrying code row ``bits``: the function mark first (an edit of the last layer), then the
    white-box mark (additive): each reads the other as a little noise."""
    sd = dict(model) if fm is None else fm[0].embed(dict(model), fm[1], bits)
    return fp.embed(sd, bits, strength)


def issue_copies(
    registry: Registry,
    base_model: StateDict,
    customers: Iterable[str],
    note: str = "",
    strength: float | None = None,
    function: FunctionSpec | None = None,
) -> dict[str, dict]:
    """Copies of ``base_model`` for each customer, each recorded in the registry (sha256 of its tensors) as
    it is made: for copies handed over in memory. To write files first, use :func:`make_copy`.

    The base is hashed and the projection derived once for the whole batch, not once per customer.
    """
    if isinstance(customers, str):
        raise TypeError(f"customers must be a collection of names, not the string {customers!r}")
    customers = list(customers)
    for name in customers:
        Registry.check_customer_name(name)
    if len(set(customers)) != len(customers):
        raise RegistryError("a customer is named twice in one batch")
    with registry.issuing():
        prepared = function_mark_for(registry, base_model, function)  # checked before anything is recorded
        fp, base = establish_base(registry, base_model, strength)
        fm = None if prepared is None else record_function_mark(registry, base_model, prepared)
        copies = {}
        for name in customers:
            cust = registry.customer(name)
            copies[name] = mark(fp, base.strength, fm, base_model, cust.bits)
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
        raise InputError(f"{customer!r} is not a federated customer name (client-<partition-id>)")
    return int(number)
