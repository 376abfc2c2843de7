"""The marks a registry's copies carry, read back from what it holds: the white-box fingerprinter of its
secret and carrier, and the function mark recorded for a base. The issuing side (securemark.owner) and the
reading side (securemark.tracing) both start here, each straight from the registry."""

from __future__ import annotations

from typing import Any

from securemark.fingerprint.carrier import CarrierLayout, StateDict
from securemark.fingerprint.embed import Fingerprinter, Projection
from securemark.fingerprint.function import Basis, FunctionMark
from securemark.registry import Registry, RegistryError


def fingerprinter(registry: Registry, model: StateDict) -> Fingerprinter:
    """The registry's fingerprinter; once a base is recorded, ``model`` must have its carrier tensors
    (CarrierMismatch names the first missing or misshapen one). Every base has the same layout."""
    bases = registry.bases()
    if not bases:
        return Fingerprinter.create(registry.secret, registry.params.carrier, model, registry.params.length)
    layout = CarrierLayout(registry.params.carrier, bases[-1].tensors)
    layout.check(model)
    return Fingerprinter(layout, Projection.derive(registry.secret, layout.size, registry.params.length))


def function_mark_of(registry: Registry, digest: str) -> tuple[FunctionMark, str, dict[str, Any]] | None:
    """The function mark recorded for base ``digest``, the layer it edits and its record; None when that
    base's copies carry none. A damaged record is a RegistryError (SQLite does not checksum rows, and a
    skip of -1 or a budget of 1e308 would read every suspect as unmarked, never a silent miss)."""
    record = registry.function_mark(digest)
    if record is None:
        return None
    info, arr = record
    try:
        if not isinstance(info.get("data", {}), dict) or not isinstance(info["layer"], str):
            raise TypeError("the record's data is not an object or its layer not a name")
        basis = Basis.from_array(arr, info["skip"], info["logit_rms"], info["classes"])
        budget = info["budget"]
        if isinstance(budget, bool) or not isinstance(budget, float | int) or not 0 < budget <= 1:
            raise ValueError(f"budget {budget!r} is outside (0, 1]")
        mark = FunctionMark.create(registry.secret, basis, registry.bias(), float(budget))
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistryError(f"the function-mark record of base {digest[:12]} is unusable: {exc}") from None
    return mark, info["layer"], info
