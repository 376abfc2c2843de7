"""Trace a suspect model against a registry: who is accused, how sure, and how clean the extraction was.

A suspect is untrusted: non-finite or absurd weights are an error, never a verdict. It is aligned to the
registry's base (fingerprint.align: permuted, rescaled, widened units undone), its soft code is read
robustly (weights the suspect set to exactly zero are erasures; tracing.bound: outliers saturated), centred
on the code's expected row (tracing.bound.centred), and the threshold is certified for that very observation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import torch

from securemark.errors import SecureMarkError
from securemark.fingerprint.align import AlignmentError, UnitGroup, align, chain_groups
from securemark.fingerprint.arch import Arch, check_covers, groups_of
from securemark.fingerprint.carrier import CarrierLayout, CarrierMismatch, StateDict
from securemark.fingerprint.embed import Fingerprinter
from securemark.modelio import first_bad_entry, match_names
from securemark.registry import Base, Registry, RegistryError
from securemark.registry.marks import fingerprinter
from securemark.tracing.bound import Observation
from securemark.tracing.mixture import ROUGH, Reading, read_bases
from securemark.tracing.verdict import Scorer, Suspect, TraceReport, Verdict

__all__ = ["NotAligned", "Scorer", "Suspect", "SuspectError", "TraceReport", "Tracer", "Verdict", "trace"]

ABSURD = 1e30  # no trained model holds a weight near float32's overflow (3.4e38)
MAX_ALIGNMENTS = 4  # anchors one suspect is aligned to (Tracer.observe)
LOADED = 6  # anchor models a Tracer keeps in memory at once


def _bracket(anchors: list[int], base: int) -> list[int]:
    """The anchors on either side of base number ``base`` (the nearer first; the later of two as near)."""
    below = [a for a in anchors if a <= base]
    above = [a for a in anchors if a >= base]
    sides = [x for x in (below[-1] if below else None, above[0] if above else None) if x is not None]
    return sorted(dict.fromkeys(sides), key=lambda a: (abs(a - base), -a))


def fill_erasures(suspect: StateDict, base: StateDict) -> tuple[dict, int]:
    """The suspect with every weight it holds at exactly 0 where the base does not read as the base's value.

    A zero carries no trace of the mark: it is a pruned weight, a unit removed (alignment reads the units a
    suspect lacks as zeros, and entries below 1e-9 of their tensor's typical magnitude as 0), a quantization
    step. Read as 0 it would add -v, often 20x the mark, to its code
    position; read as the base it adds nothing: an erasure. The rule uses the suspect and the base only, never
    a code row, so an innocent's score stays independent of the observation and the bound holds.
    """
    out, count = dict(suspect), 0
    for name, b in base.items():
        t = suspect.get(name)
        if t is None or not b.is_floating_point() or t.shape != b.shape:
            continue
        hole = (t == 0) & (b != 0)
        n = int(hole.sum())
        if n:
            out[name], count = torch.where(hole, b.to(t.dtype), t), count + n
    return out, count


class NotAligned(CarrierMismatch):
    """The suspect could not be aligned to the base and cannot be read as it is either (its shapes differ)."""

    exit_status = 3


class SuspectError(SecureMarkError, ValueError):
    """The suspect holds values no verdict can be built on (NaN, inf, absurd magnitudes)."""


def check_suspect(sd: StateDict) -> None:
    """Raise SuspectError naming the first floating tensor with a non-finite or absurd (>= 1e30) entry."""
    bad = first_bad_entry(sd, ABSURD)
    if bad is not None:
        name, index, value = bad
        raise SuspectError(
            f"tensor {name!r} holds {value:g} at {index}: a suspect with non-finite or absurd (|w| >= {ABSURD:g})"
            " weights cannot be traced; it is no verdict"
        )


class Tracer:
    """A registry read once for many suspects: bases (their projections, and the models kept), codebook, bias
    and the secret projection are loaded and derived here, so each :meth:`trace` costs one to four
    alignments (see :meth:`observe`), their readings and one scoring pass (the evaluation harness and
    ``securemark trace DIR suspects/`` trace many suspects against one registry).

    Unit groups for alignment, first found: ``groups`` (explicit, e.g. ``--align-spec``), those of ``arch``
    (derived from the model's graph now), those the registry recorded at ``registry init --arch``, those of
    the base read as a sequential chain. Groups that leave a weight of the base out are refused. Without any,
    suspects are read in their own coordinates and every report says "aligned": false with the reason.
    ``aligned=False`` reads suspects in their own coordinates on purpose.
    ``every_base=False`` reads them against the current base only (the registry's earlier bases ignored).
    """

    def __init__(
        self, registry: Registry, groups: Sequence[UnitGroup] | None = None, aligned: bool = True,
        every_base: bool = True, arch: Arch | None = None,
    ) -> None:  # fmt: skip
        self.bases = registry.bases() if every_base else registry.bases()[-1:]
        if not self.bases:
            raise RegistryError(f"registry {registry.directory} has issued no copy yet: nothing to trace against")
        self.scorer = Scorer(registry)
        self.names, self.params = self.scorer.names, self.scorer.params
        self.base = self.bases[-1]  # the current base (or the latest kept)
        current = registry.base()
        self._current = None if current is None else current.digest
        self._registry = registry
        self._fp: Fingerprinter | None = None
        # which bases keep their model (anchors); the models are read when a suspect is first aligned to them
        self._kept = [aligned and registry.keeps_model(b) for b in self.bases]
        self._loaded: dict[int, StateDict] = {}
        self._refs = np.stack([b.reference for b in self.bases])
        self._strengths = np.array([b.strength for b in self.bases])
        self._carrier_size = CarrierLayout(self.params.carrier, self.base.tensors).size
        self._groups, self._alignment = self._unit_groups(groups, aligned, arch)

    def _unit_groups(
        self, groups: Sequence[UnitGroup] | None, aligned: bool, arch: Arch | None
    ) -> tuple[list[UnitGroup] | None, str]:
        if not aligned:
            return None, "off: disabled"
        last = max((i for i, k in enumerate(self._kept) if k), default=None)  # one model read, not every anchor
        kept = [] if last is None else [m for m in (self._model(last),) if m is not None]
        if not kept:
            return None, "off: the registry keeps no base model (made before alignment existed)"
        recorded = self._registry.arch()
        exempt: list[str] = []
        try:
            if groups is not None:
                chosen, how = list(groups), "explicit unit groups"
            elif arch is not None:
                record = arch.record()
                changed = recorded is not None and recorded.get("graph") != record["graph"]
                chosen, exempt = groups_of(record), record["exempt"]
                how = f"unit groups of {arch.target}" + (" (its graph differs from the registered one)" * changed)
            elif recorded is not None:
                chosen, exempt = groups_of(recorded), list(recorded.get("exempt", []))
                how = f"unit groups of {recorded.get('target')} (registered)"
            else:
                chosen, how = chain_groups(kept[-1]), "unit groups derived from the base (a sequential chain)"
            check_covers(chosen, kept[-1], exempt)
        except AlignmentError as exc:
            return None, f"off: {exc}"
        if any(m.outer > 1 for g in chosen for m in g.members):  # a known gap, said where it applies
            how += "; maps inside attention heads (q and k rotated against each other) are not undone"
        return chosen, how

    def prepare(self, suspect: StateDict, base: int = -1) -> tuple[StateDict, dict[str, object]]:
        """The suspect checked (SuspectError), aligned to base number ``base`` (default: the current one) and
        its zeros read as erasures, with what alignment did."""
        check_suspect(suspect)
        return self._prepare_checked(suspect, base)

    def _prepare_checked(self, suspect: StateDict, base: int) -> tuple[StateDict, dict[str, object]]:
        model = self._model(base)
        if self._groups is None or model is None:
            why = self._alignment if model is not None or self._groups is None else "off: this base's model is not kept"
            return suspect, {"status": why, "aligned": False}
        mark_rms = self.bases[base].strength * np.sqrt(self.params.length / self._carrier_size)  # per weight
        try:
            aligned, rep = align(suspect, model, self._groups, noise=mark_rms)
        except AlignmentError as exc:  # read as it is; the report says it is not aligned and why
            try:
                self._fingerprinter(suspect).layout.check(suspect)
            except CarrierMismatch as mismatch:
                raise NotAligned(f"not aligned ({exc}), and unreadable as it is: {mismatch}") from None
            return suspect, {"status": f"off: {exc}", "aligned": False}
        filled, erased = fill_erasures(aligned, model)
        try:
            check_suspect(filled)  # undoing a pirate's scales can overflow an absurd suspect's float32
        except SuspectError as exc:
            raise SuspectError(f"after alignment to the base: {exc}") from None
        return filled, {"status": "aligned: " + self._alignment, "aligned": True, **asdict(rep), "erased": erased}

    def extract(self, suspect: StateDict, base: int = -1) -> np.ndarray:
        """The raw soft code y = (X v - h) / s (L,) of a suspect prepared for base number ``base``."""
        b = self.bases[base]
        return (self._project(suspect) - b.reference) / b.strength

    def _project(self, suspect: StateDict) -> np.ndarray:
        """X v(suspect); CarrierMismatch names a misshapen tensor."""
        try:
            fp = self._fingerprinter(suspect)
            fp.layout.check(suspect)
        except CarrierMismatch as exc:
            raise NotAligned(f"not aligned, and unreadable as it is: {exc} (alignment {self._alignment})") from None
        return fp.project(suspect)

    def _fingerprinter(self, model: StateDict) -> Fingerprinter:
        if self._fp is None:
            self._fp = fingerprinter(self._registry, model)
        return self._fp

    def observe(self, suspect: StateDict) -> tuple[Observation, dict[str, object]]:
        """Check, align, extract and read robustly: the observation the scores are computed from.

        A federation records every round's model as a base, and keeps the model file of a few (anchors, see
        fingerprint.anchor_every); the others keep their projection h = X w alone. The suspect is aligned to
        the current anchor and read against every base (tracing.mixture: the base, or the affine combination
        of up to three, with the least energy); then aligned to the anchor nearest the base that reading
        chose, if it is another; while the best reading is rough (RMS above :data:`ROUGH`), to the anchors on
        both sides of its choice, then the run's first anchor (at most :data:`MAX_ALIGNMENTS` alignments).
        Late bases often differ by less than the mark's noise, so the choice among them is close to a coin
        toss: following it from anchor to anchor would buy alignments, not readings. The suspect read in its
        own coordinates is one more candidate (alignment can mislead: it undoes rescales a pirate's
        extrapolation only seems to hold). The least-energy reading is kept. The base a copy was made from
        leaves the mark and the pirate's changes, any other adds the training drift between the two; an anchor near that
        base matches the suspect's units the way that base would (an early copy aligned to a much-trained
        model alone gets units matched wrongly). Every choice depends on the suspect and the bases alone,
        never on an innocent's code row, so an innocent's row is still independent of the observation and its
        certified threshold holds unchanged (no multiple-testing correction is needed; the bases' own faint
        dependence on the rows of the customers who trained them is in tracing.mixture). Cost: at most four
        alignments, and one projection read per base."""
        check_suspect(suspect)
        suspect = match_names(suspect, (n for base in self.bases for n, _ in base.tensors))  # a DDP "module." prefix
        anchors = [i for i, k in enumerate(self._kept) if k] if self._groups is not None else []
        tried: dict[int, Reading] = {}
        best: tuple[Reading, dict[str, object], int] | None = None
        queue = [anchors[-1] if anchors else len(self.bases) - 1]
        while len(tried) < MAX_ALIGNMENTS:
            if not queue and anchors and best is not None:
                rough = best[0].energy > ROUGH**2 * len(best[0].obs.y)
                near = _bracket(anchors, best[0].parts[0][0])  # the nearer side first
                queue = [a for a in (near if rough else near[:1] if len(tried) == 1 else []) if a not in tried]
                if not queue and rough and anchors[0] not in tried:
                    queue = [anchors[0]]  # a reading this rough may come of units matched wrongly: the run's start
            if not queue:
                break
            anchor = queue.pop(0)
            prepared, alignment = self._prepare_checked(suspect, anchor)
            tried[anchor] = reading = read_bases(self._project(prepared), self._refs, self._strengths)
            if best is None or reading.energy < best[0].energy:
                best = (reading, alignment, anchor)
            if not anchors:
                break
        assert best is not None
        if anchors and best[1].get("aligned"):  # its own coordinates too: an alignment can also mislead
            own = self._own_reading(suspect)
            if own is not None and own[0].energy < best[0].energy:
                status = f"{best[1]['status']}; read in its own coordinates, closer to the bases than aligned"
                best = (own[0], {"status": status, "aligned": True, "own_coordinates": True, "erased": own[1]}, best[2])
        assert best is not None
        reading, alignment, anchor = best
        if len(self.bases) > 1:
            alignment = {**alignment, "base": self._label(self.bases[reading.parts[0][0]]),
                         "bases_tried": len(self.bases), "aligned_to": self._label(self.bases[anchor]),
                         "alignments": len(tried)}  # fmt: skip
            if len(reading.parts) > 1:
                alignment["mixture"] = [[self._label(self.bases[i]), round(w, 4)] for i, w in reading.parts]
        return reading.obs, alignment

    def _model(self, i: int) -> StateDict | None:
        """Base ``i``'s model (checked against its digest), read once and kept for the next suspects, the last
        few only (LOADED): a registry of a long run keeps many anchors, a suspect is aligned to at most four."""
        if not self._kept[i]:
            return None
        if i not in self._loaded:
            if len(self._loaded) >= LOADED:
                del self._loaded[next(iter(self._loaded))]
            model = self._registry.base_model(self.bases[i])
            if model is None:
                raise RegistryError(f"base {self.bases[i].digest[:12]}'s model file went missing while tracing")
            self._loaded[i] = model
        return self._loaded[i]

    def _own_reading(self, suspect: StateDict) -> tuple[Reading, int] | None:
        """The suspect read as it is (erasures filled against the current anchor), or None when its shapes
        are not the bases'. A candidate like any other: it depends on the suspect and the bases alone."""
        try:
            self._fingerprinter(suspect).layout.check(suspect)
        except CarrierMismatch:
            return None
        model = self._model(max(i for i, k in enumerate(self._kept) if k))
        assert model is not None
        filled, erased = fill_erasures(suspect, model)
        return read_bases(self._project(filled), self._refs, self._strengths), erased

    def _label(self, base: Base) -> str:
        if self._current is not None and base.digest == self._current:
            return "current"
        return base.label or f"base {base.digest[:12]}"

    def accuse(self, y: np.ndarray) -> Verdict:
        return self.scorer.accuse(y)

    def trace(self, suspect: StateDict, top_k: int = 10, hard: bool = False) -> TraceReport:
        """Align the suspect, extract its soft code and score every customer.

        ``hard=True`` scores the signs of the soft code only (the classic hard-decision Tardos decoder); the
        threshold is certified for whichever observation is scored.
        """
        start = time.perf_counter()
        obs, alignment = self.observe(suspect)
        return self.scorer.report(obs, alignment, start, top_k, hard)


def trace(
    suspect: StateDict, registry: Registry, top_k: int = 10, hard: bool = False,
    groups: Sequence[UnitGroup] | None = None, aligned: bool = True, arch: Arch | None = None,
) -> TraceReport:  # fmt: skip
    """One suspect against ``registry`` (see :class:`Tracer`)."""
    return Tracer(registry, groups, aligned, arch=arch).trace(suspect, top_k, hard)
