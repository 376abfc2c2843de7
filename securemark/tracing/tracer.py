"""Trace a suspect model against a registry: who is accused, how sure, and how clean the extraction was.

A suspect is untrusted: non-finite or absurd weights are an error, never a verdict. It is aligned to the
registry's base (fingerprint.align: permuted, rescaled, widened units undone), its soft code is read
robustly (weights the suspect set to exactly zero are erasures; tracing.bound: outliers saturated), and the
threshold is certified for that very observation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from securemark.codes import bibd, unpack_bits
from securemark.errors import SecureMarkError
from securemark.fingerprint.align import AlignmentError, UnitGroup, align, chain_groups
from securemark.fingerprint.arch import Arch, check_covers, groups_of
from securemark.fingerprint.carrier import CarrierLayout, CarrierMismatch, StateDict
from securemark.fingerprint.embed import Fingerprinter
from securemark.modelio import first_bad_entry, match_names
from securemark.registry import Base, Registry, RegistryError
from securemark.registry.marks import fingerprinter
from securemark.tracing.bound import Law, Observation, robust_observation
from securemark.tracing.scores import PackedCodebook, accuse, exact_scores, tardos_scores

PValues = Callable[[np.ndarray], np.ndarray]
ABSURD = 1e30  # no trained model holds a weight near float32's overflow (3.4e38)


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


@dataclass(frozen=True)
class Suspect:
    customer: str
    score: float
    p_value: float | None  # certified bound on P(an innocent scores this high); None for BIBD (no null)


@dataclass(frozen=True)
class TraceReport:
    accused: list[Suspect]
    scores_top: list[Suspect]
    threshold: float  # normalized (score / ||y||), certified for this observation
    eps: float
    bound: str  # how the threshold was certified
    innocent_tail: float | None  # certified P(one given innocent accused) at the threshold
    false_accusation_bound: float | None  # customers x innocent_tail: P(any innocent accused) <= this <= eps
    code: str
    users: int
    length: int
    signal_rms: float  # ||y|| / sqrt(L) after clipping: 1 for an intact copy, ~mean-row norm for an average
    clipped: int  # coordinates of y saturated as outliers
    bit_agreement_top: float  # share of positions where sign(y) matches the top suspect's row
    alignment: dict[str, object]  # what alignment to the base undid, or why it did not run ("aligned": bool)
    seconds: float
    soft_code: np.ndarray = field(repr=False, compare=False)
    # customers who score above the threshold but whose identity two nodes claimed in a run (Registry.contest):
    # not accused, since their copies may have reached either node; name -> why
    contested: dict[str, str] = field(default_factory=dict)

    @property
    def aligned(self) -> bool:
        """False when the suspect was read in its own coordinates (no unit groups, or it could not be aligned):
        a rewritten copy (units permuted, rescaled) would escape such a reading."""
        return self.alignment.get("aligned") is not False

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        out.pop("soft_code")
        if not np.isfinite(self.threshold):
            out["threshold"] = None  # a zero observation: nobody can be accused (strict JSON has no Infinity)
        out["accused"] = [s.customer for s in self.accused]
        out["aligned"] = self.aligned
        out["accused_detail"] = [asdict(s) for s in self.accused]
        return out


class Tracer:
    """A registry read once for many suspects: base, codebook, bias and the secret projection are loaded and
    derived here, so each :meth:`trace` costs one alignment, one extraction and one scoring pass (the
    evaluation harness traces thousands of suspects against one registry).

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
        self._models = [registry.base_model(b) if aligned else None for b in self.bases]
        self._carrier_size = CarrierLayout(self.params.carrier, self.base.tensors).size
        self._groups, self._alignment = self._unit_groups(groups, aligned, arch)

    def _unit_groups(
        self, groups: Sequence[UnitGroup] | None, aligned: bool, arch: Arch | None
    ) -> tuple[list[UnitGroup] | None, str]:
        if not aligned:
            return None, "off: disabled"
        kept = [m for m in self._models if m is not None]
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
        model = self._models[base]
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

        With several bases (a federation keeps each round's model) the suspect is aligned to each and read
        against it, and the observation with the least energy is kept: the base a suspect was made from leaves
        the mark and the pirate's changes, any other adds the training drift between the two. (Aligning to the
        current base only and reading every base from that one projection is cheaper, and wrong: an early
        copy aligned to a much-trained model gets units matched wrongly and then fits no base.) The choice
        depends on the suspect and the bases alone, never on an innocent's code row, so an innocent's row is
        still independent of the observation and its certified threshold holds unchanged (no multiple-testing
        correction is needed). Cost: one alignment per base."""
        check_suspect(suspect)
        suspect = match_names(suspect, (n for base in self.bases for n, _ in base.tensors))  # a DDP "module." prefix
        best: tuple[float, Observation, dict[str, object], int] | None = None
        for i in reversed(range(len(self.bases))):  # the current base first: it wins ties
            prepared, alignment = self._prepare_checked(suspect, i)
            obs = robust_observation(self.extract(prepared, i))
            energy = float(np.dot(obs.y, obs.y))
            if best is None or energy < best[0]:
                best = (energy, obs, alignment, i)
        assert best is not None
        _, obs, alignment, i = best
        if len(self.bases) > 1:
            alignment = {**alignment, "base": self._label(self.bases[i]), "bases_tried": len(self.bases)}
        return obs, alignment

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


class Scorer:
    """A registry's customers, code and bias, read once: scores an observation and writes the report. The
    white-box :class:`Tracer` and the black-box tracer (tracing.blackbox) both end here, so both get the
    same scores and the same certified bound."""

    def __init__(self, registry: Registry) -> None:
        self.names, self._packed = registry.codebook()
        if not self.names:
            raise RegistryError(f"registry {registry.directory} has no customers")
        self.params = registry.params
        length = self.params.length
        self._book = PackedCodebook.from_packed_rows(self._packed, length)
        self.bias = registry.bias() if self.params.code != "bibd" else None
        self.contested = registry.contested()
        # BIBD rows are public and few (v <= a few hundred): kept unpacked for the soft detector
        self._rows = unpack_bits(self._packed, length) if self.params.code == "bibd" else None

    def accuse(self, y: np.ndarray) -> Verdict:
        """Score every customer for observation ``y`` and accuse.

        Tardos and random codes: soft scores against the threshold certified for this y's exact innocent law
        (p-values are certified bounds, computed only for the customers asked for); BIBD: the soft detector
        against its midway threshold (no null law, no bound, no p-values).
        """
        p = self.params
        if self._rows is not None:
            scores = bibd.soft_scores(y, self._rows)
            threshold = bibd.soft_threshold(bibd.plane_order_for(p.max_colluders), p.max_colluders)
            order = np.argsort(-scores)
            return Verdict(scores, threshold, order[scores[order] > threshold], None, None)
        assert self.bias is not None
        bias = self.bias
        acc = accuse(tardos_scores(self._book, y, bias), Law.of(y, bias), p.eps,
                     lambda users: exact_scores(self._book, users, y, bias))  # fmt: skip
        return Verdict(acc.normalized, acc.threshold, acc.accused, acc.p_values, acc.innocent_tail)

    def report(
        self, obs: Observation, alignment: dict[str, object], start: float, top_k: int = 10, hard: bool = False
    ) -> TraceReport:
        """Accuse on ``obs`` (its signs only with ``hard``) and report; ``start``: perf_counter at the start."""
        y = np.sign(obs.y) if hard else obs.y
        v = self.accuse(y)
        order = np.argsort(-v.scores)

        shown = np.union1d(v.accused, order[:top_k]).astype(np.int64)  # p-values once per reported customer
        pv = dict(zip(shown.tolist(), [None] * len(shown) if v.p_values is None else v.p_values(shown).tolist(),
                      strict=True))  # fmt: skip

        def suspects(idx: np.ndarray) -> list[Suspect]:
            return [Suspect(self.names[i], float(v.scores[i]), pv[int(i)]) for i in idx]

        top_row = unpack_bits(self._packed[order[0]], self.params.length)
        tail = v.innocent_tail
        accused = suspects(v.accused)
        return TraceReport(
            accused=[s for s in accused if s.customer not in self.contested],
            scores_top=suspects(order[:top_k]),
            threshold=float(v.threshold),
            eps=self.params.eps,
            bound="none (BIBD detector)" if tail is None else "Chernoff + Berry-Esseen on the exact innocent law",
            innocent_tail=tail,
            false_accusation_bound=None if tail is None else tail * len(self.names),
            code=self.params.code,
            users=len(self.names),
            length=self.params.length,
            signal_rms=float(np.linalg.norm(y) / np.sqrt(len(y))),
            clipped=obs.clipped,
            bit_agreement_top=float(np.mean((y > 0) == top_row)),
            alignment=alignment,
            seconds=round(time.perf_counter() - start, 4),
            soft_code=y,
            contested={s.customer: self.contested[s.customer] for s in accused if s.customer in self.contested},
        )


@dataclass(frozen=True)
class Verdict:
    scores: np.ndarray  # every customer's score (normalized for Tardos/random)
    threshold: float
    accused: np.ndarray  # indices, most suspicious first
    p_values: PValues | None
    innocent_tail: float | None


def trace(
    suspect: StateDict, registry: Registry, top_k: int = 10, hard: bool = False,
    groups: Sequence[UnitGroup] | None = None, aligned: bool = True, arch: Arch | None = None,
) -> TraceReport:  # fmt: skip
    """One suspect against ``registry`` (see :class:`Tracer`)."""
    return Tracer(registry, groups, aligned, arch=arch).trace(suspect, top_k, hard)
