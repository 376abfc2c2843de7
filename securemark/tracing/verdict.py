"""What a trace concludes: the scores of every customer for an observation, the accused against the threshold
certified for it, and the report. The white-box tracer (tracing.tracer) and the black-box tracer
(tracing.blackbox) both end in :class:`Scorer`, so both get the same scores and the same certified bound."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from securemark.codes import bibd, unpack_bits
from securemark.registry import Registry, RegistryError
from securemark.tracing.bound import Law, Observation, centred
from securemark.tracing.scores import PackedCodebook, accuse, exact_scores, tardos_scores

PValues = Callable[[np.ndarray], np.ndarray]
BOUND = "Chernoff + Berry-Esseen on the exact innocent law of the observation centred on the expected row"


@dataclass(frozen=True)
class Suspect:
    customer: str
    score: float
    p_value: float | None  # certified bound on P(an innocent scores this high); None for BIBD (no null)


@dataclass(frozen=True)
class TraceReport:
    accused: list[Suspect]
    scores_top: list[Suspect]
    threshold: float  # normalized (score / ||y'||, y' the centred observation), certified for this observation
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

        Tardos and random codes: soft scores of y centred on the code's expected row (tracing.bound.centred),
        against the threshold certified for the centred y's exact innocent law (p-values are certified bounds,
        computed only for the customers asked for); BIBD: the soft detector against its midway threshold (no
        null law, no bound, no p-values).
        """
        p = self.params
        if self._rows is not None:
            scores = bibd.soft_scores(y, self._rows)
            threshold = bibd.soft_threshold(bibd.plane_order_for(p.max_colluders), p.max_colluders)
            order = np.argsort(-scores)
            return Verdict(scores, threshold, order[scores[order] > threshold], None, None)
        assert self.bias is not None
        bias = self.bias
        y = centred(y, bias, p.max_colluders)  # the code's expected row removed (tracing.bound)
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
            bound="none (BIBD detector)" if tail is None else BOUND,
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
