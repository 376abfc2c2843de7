"""The fingerprinting side of a run: the registry, every customer's copy of each global model, the bases.

Every model copies are made from (each round's global model) is kept in the registry as a base, so a copy of
any round traces against the model it was made from. A copy carries the white-box mark and, when the run has
a :class:`FunctionSpec`, the function mark (fitted once per model); a model the function mark cannot be fitted
to gets copies with the white-box mark alone and one logged line, never a failed round.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from securemark import models
from securemark.codes.tardos import customers_for, length_for
from securemark.config import FingerprintConfig
from securemark.errors import InputError
from securemark.fingerprint.arch import record_of
from securemark.fingerprint.embed import Fingerprinter
from securemark.fingerprint.function import FunctionMark, FunctionMarkUnfit, features_and_logits
from securemark.flower.exchange import shown
from securemark.modelio import save_state_dict
from securemark.owner import (
    FunctionSpec,
    PreparedMark,
    add_earlier_base,
    issue_copies,
    mark,
    prepare_function_mark,
    record_function_mark,
    relative_change,
)
from securemark.registry import Registry, RegistryParams

Weights = dict[str, torch.Tensor]


def arch_record(model: torch.nn.Module | None, example_input: Sequence[int] | None) -> dict[str, Any] | None:
    """The registry's record of the architecture a run trains (``SecureMark(model=, example_input=)``): its unit
    groups from its graph, so copies rewritten without changing their outputs are traced. A model whose graph
    cannot be derived is refused here, before any round (AlignmentError says why)."""
    if model is None:
        if example_input is not None:
            raise InputError("SecureMark(example_input=...) goes with model=")
        return None
    if example_input is None:
        raise InputError("SecureMark(model=...) needs example_input, the shape of one input batch, e.g. (1, 3, 32, 32)")
    return record_of(model, example_input)


class Copies:
    """Copies for the customers of one run, made from the weights the strategy holds now. ``token`` names
    those weights (the ArrayRecord they were decoded from): what was fitted or recorded for one token is
    kept until the weights change."""

    def __init__(
        self, fingerprint: FingerprintConfig, function: FunctionSpec | None, console: Console,
        arch: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.fingerprint, self.function, self.console = fingerprint, function, console
        self.arch = arch  # the model's architecture record (fingerprint.arch), kept in the registry
        self.registry: Registry | None = None
        self.fp: Fingerprinter | None = None
        self.strength = 0.0
        self.bits: dict[str, np.ndarray] = {}  # customer -> its code row (read from the registry once)
        self._based: tuple[object, np.ndarray] | None = None  # (token, projection) kept as a base
        # (token, its mark and layer, the mark prepared: what record_function_mark writes)
        self._fm: tuple[object, tuple[FunctionMark, str] | None, PreparedMark | None] | None = None
        self._fm_refused = ""  # why the last model could not carry a function mark (said once per reason)
        self.initial: object | None = None  # the token of the run's initial model (fingerprint.function_initial)
        self._oversized = False  # the warning that customers outnumber the code's size was said

    @property
    def enabled(self) -> bool:
        return self.fp is not None

    def create(self, out: Path, weights: Weights) -> None:
        """A new registry in ``out/registry`` and the strength, fixed for the whole run."""
        fc = self.fingerprint
        if not fc.enabled:
            return
        exclude = () if self.function is None else self.function.carrier_exclude()
        params = RegistryParams(
            code=fc.code, length=fc.length, max_colluders=fc.max_colluders, eps=fc.eps, budget=fc.budget,
            exclude=exclude,
        )  # fmt: skip
        self.registry = Registry.init(out / "registry", params)
        if self.arch is not None:
            self.registry.set_arch(self.arch)
        self.fp = Fingerprinter.create(self.registry.secret, params.carrier, weights, params.length)
        self.strength = self.fp.strength_for_budget(weights, fc.budget)
        self.console.print(self.describe())

    def describe(self) -> str:
        """Where the run's registry is and the code its copies carry (said when a run starts or resumes)."""
        fc = self.fingerprint
        if self.registry is None:
            return "fingerprints off: the run issues no copies"
        function = f", function mark {fc.function_budget}" if self.function is not None else ""
        served = customers_for(fc.length, fc.max_colluders, fc.eps) if fc.code == "tardos" else None
        sized = "" if served is None else f"; sized for {served:,} customers (L >= pi^2/2 c^2 ln(n/eps))"
        anchors = (f"; a model file every {fc.anchor_every} rounds: black-box tracing reads the copies of those rounds"
                   " and the final ones (fingerprint.anchor_every = 1: every round's)"
                   if self.function is not None and fc.anchor_every > 1 else "")  # fmt: skip
        return (f"registry {self.registry.directory}: {fc.code} code L={fc.length}, c_max={fc.max_colluders}, "
                f"eps={fc.eps}, mark budget {fc.budget}{function}{sized}{anchors}")  # fmt: skip

    def check_customers(self, n: int) -> None:
        """Warn, once, when the run's customers outnumber what its code was sized for at its eps."""
        fc = self.fingerprint
        if self.registry is None or fc.code != "tardos" or self._oversized:
            return
        if n > customers_for(fc.length, fc.max_colluders, fc.eps):
            self._oversized = True
            need = length_for(n, fc.max_colluders, fc.eps)
            self.console.print(f"  [yellow]{n} customers and L={fc.length}: a coalition of {fc.max_colluders} may "
                               f"escape the tracer (Tardos needs L >= pi^2/2 c^2 ln(n/eps) = {need}); set "
                               "fingerprint.length or FingerprintConfig(length=...)[/]")  # fmt: skip

    def reopen(self, out: Path, weights: Weights, strength: float) -> None:
        """The registry of the run in ``out``, resumed: refused when made with other fingerprint settings."""
        self.strength = strength
        if not self.fingerprint.enabled:
            return
        self.registry = Registry.open(out / "registry")
        fc, params = self.fingerprint, self.registry.params
        if (params.code, params.length, params.max_colluders, params.eps) != (
            fc.code, fc.length, fc.max_colluders, fc.eps
        ):  # fmt: skip
            raise InputError(f"the registry in {out} was made with other fingerprint settings than this run's")
        if self.arch is not None:
            self.registry.set_arch(self.arch)
        self.fp = Fingerprinter.create(self.registry.secret, params.carrier, weights, params.length)
        self.console.print(self.describe())

    def record_base(self, token: object, weights: Weights, after: int) -> np.ndarray | None:
        """Keep ``weights`` in the registry as a base (once per model), so a copy of any round traces against
        its own base; their projection h = X w, or None without fingerprints. The model file itself is kept for
        the run's first base and then every ``fingerprint.anchor_every``-th (counted in the registry, so a
        resumed run keeps the same rhythm), with its function mark's record; the others keep their projection
        alone (black-box tracing reads a mark by running the base model: a record without one is never read)."""
        if self.fp is None or self.registry is None:
            return None
        if self._based is None or self._based[0] is not token:
            label = f"global model after round {after}"
            since = self.registry.rounds_since_kept()
            keep = since is None or since + 1 >= self.fingerprint.anchor_every
            base = add_earlier_base(self.registry, self.fp, weights, self.strength, label, keep)
            self._based = (token, base.reference)
            if base.kept is not False and self.function_mark(token, weights) is not None:
                assert self._fm is not None and self._fm[2] is not None
                record_function_mark(self.registry, weights, self._fm[2])
        return self._based[1]

    def function_mark(self, token: object, weights: Weights) -> tuple[FunctionMark, str] | None:
        """The function mark of ``weights`` (fitted once per model), or None. A model the mark cannot be fitted
        to (FunctionMarkUnfit: no linear head, features NaN on the held-out data, too few held-out inputs to
        read it) gets copies with the white-box mark alone and one logged line, never a failed round. A spec
        that names another model is the caller's mistake: the run stops on it first."""
        if self.function is None or self.registry is None:
            return None
        if self._fm is None or self._fm[0] is not token:
            prepared = self._fit(token, weights)
            self._fm = (token, None if prepared is None else prepared[:2], prepared)
        return self._fm[1]

    def _fit(self, token: object, weights: Weights) -> PreparedMark | None:
        """The function mark prepared for ``weights`` (once per model: see :meth:`function_mark`; recorded by
        :meth:`record_base` for a base that keeps its model, and by the final issue), or None, said once per
        reason: the run's initial model (fingerprint.function_initial) or FunctionMarkUnfit."""
        assert self.function is not None and self.registry is not None
        if token is self.initial and not self.fingerprint.function_initial:
            self.console.print("  copies of the initial model carry the white-box mark alone: the function mark is "
                               "fitted to features a round has trained (fingerprint.function_initial = true marks "
                               "a pretrained initial model's copies too)")  # fmt: skip
            return None
        try:
            return prepare_function_mark(self.registry, weights, self.function)
        except FunctionMarkUnfit as exc:  # a mistake of the caller's (another model, a bad budget) stays loud
            if str(exc) != self._fm_refused:
                self._fm_refused = str(exc)
                self.console.print(f"  [yellow]copies of this model carry no function mark: {exc}. Black-box "
                                   "tracing cannot read them; white-box tracing can (fingerprint.function_budget"
                                   " = 0 turns the function mark off)[/]")  # fmt: skip
            return None

    def copy_for(self, customer: str, token: object, weights: Weights) -> Weights:
        """``customer``'s copy of ``weights`` (``weights`` themselves without fingerprints)."""
        if self.fp is None or self.registry is None:
            return weights
        return mark(self.fp, self.strength, self.function_mark(token, weights), weights, self.bits_of(customer))

    def score(
        self, issued: dict[str, Weights], reference: np.ndarray | None, function: tuple[Any, Weights | None]
    ) -> dict[str, float]:
        """What the copies issued in a round read back as: the largest bit error of the white-box mark against
        the weights they were made from (projection ``reference``), and the smallest function-mark cosine."""
        out: dict[str, float] = {}
        if self.fp is not None and reference is not None and issued:
            out["max_bit_error"] = max(
                float(np.mean((self.fp.extract(copy, reference, self.strength) > 0) != self.bits[c]))
                for c, copy in issued.items()
            )
        fm, made_from = function
        if fm is not None and self.function is not None and made_from is not None and issued:
            spec, x = self.function.model, self.function.heldout
            view = features_and_logits(models.from_spec(spec, made_from), x)  # the base's side, once for every copy
            out["min_function_cosine"] = min(
                fm[0].health(view, models.from_spec(spec, copy), self.bits[c], x) for c, copy in issued.items()
            )
        return out

    def final(self, out: Path, token: object, weights: Weights, customers: list[str], rounds: int) -> None:
        """Every customer's copy of the final model, recorded in the registry and written to ``out/customers``."""
        if self.registry is None:
            return
        note = f"final copy, {rounds} rounds"
        function = self.function if self.function_mark(token, weights) is not None else None  # said once if refused
        copies = issue_copies(self.registry, weights, sorted(customers), note, self.strength, function)
        for name, copy in copies.items():
            save_state_dict(copy, out / "customers" / f"{name}.safetensors")
        if copies and self.fp is not None:
            reference = self.fp.project(weights)
            errors = [float(np.mean((self.fp.extract(c, reference, self.strength) > 0) != self.bits_of(n)))
                      for n, c in copies.items()]  # fmt: skip
            change = max(relative_change(c, weights) for c in copies.values())
            self.console.print(f"final copies: {len(copies)} in {out / 'customers'}, each within {change:.2e} of the "
                               f"global model's norm, bit error at most {max(errors):.3f}; registry "
                               f"{out / 'registry'}")  # fmt: skip
        self.registry.close()

    def contest(self, customer: str, why: str) -> None:
        """Two nodes claimed ``customer`` (Nodes suspended it): said, and marked in the registry, so a tracer
        reports a copy that reads as this customer's as contested instead of accusing it."""
        self.console.print(
            f"  [red]identity {shown(repr(customer))} suspended ({shown(why)}): no node gets "
            "its copies; a copy that reads as its own is reported contested, not accused[/]"
        )
        if self.registry is not None:
            self.registry.contest(customer, f"two nodes claimed this identity in a run ({why}): its copies may "
                                            "have reached either")  # fmt: skip

    def contested(self) -> dict[str, str]:
        """The registry's contested customers (none without fingerprints)."""
        return {} if self.registry is None else self.registry.contested()

    def bits_of(self, customer: str) -> np.ndarray:
        """``customer``'s code row (drawn the first time), read from the registry once."""
        if customer not in self.bits and self.registry is not None:
            self.bits[customer] = self.registry.customer(customer).bits
        return self.bits[customer]
