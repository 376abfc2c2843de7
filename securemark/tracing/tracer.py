"""Trace a suspect model against a registry: who is accused, how sure, and how clean the extraction was."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from securemark.codes import bibd, unpack_bits
from securemark.fingerprint.carrier import StateDict
from securemark.fingerprint.embed import Fingerprinter
from securemark.owner import fingerprinter
from securemark.registry import Registry, RegistryError
from securemark.tracing.scores import PackedCodebook, accuse, tardos_scores

PValues = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Suspect:
    customer: str
    score: float
    p_value: float | None  # None for the BIBD detectors, which have no Gaussian null


@dataclass(frozen=True)
class TraceReport:
    accused: list[Suspect]
    scores_top: list[Suspect]
    threshold: float
    eps: float
    code: str
    users: int
    length: int
    signal_rms: float  # ||y|| / sqrt(L): 1 for an intact copy, ~mean-row norm for an average
    bit_agreement_top: float  # share of positions where sign(y) matches the top suspect's row
    seconds: float
    soft_code: np.ndarray = field(repr=False, compare=False)

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        out.pop("soft_code")
        out["accused"] = [s.customer for s in self.accused]
        out["accused_detail"] = [asdict(s) for s in self.accused]
        return out


class Tracer:
    """A registry read once for many suspects: base, codebook, bias and the secret projection are loaded and
    derived here, so each :meth:`trace` costs one extraction and one scoring pass (the evaluation harness
    traces thousands of suspects against one registry)."""

    def __init__(self, registry: Registry) -> None:
        base = registry.base()
        if base is None:
            raise RegistryError(f"registry {registry.directory} has issued no copy yet: nothing to trace against")
        self.names, self._packed = registry.codebook()
        if not self.names:
            raise RegistryError(f"registry {registry.directory} has no customers")
        self.params = registry.params
        self.base = base
        self._registry = registry
        self._fp: Fingerprinter | None = None
        length = self.params.length
        self._book = PackedCodebook.from_packed_rows(self._packed, length)
        self._bias = registry.bias() if self.params.code != "bibd" else None
        # BIBD rows are public and few (v <= a few hundred): kept unpacked for the soft detector
        self._rows = unpack_bits(self._packed, length) if self.params.code == "bibd" else None

    def extract(self, suspect: StateDict) -> np.ndarray:
        """The soft code y (L,) of ``suspect``; CarrierMismatch names any tensor of the wrong shape."""
        if self._fp is None:
            self._fp = fingerprinter(self._registry, suspect)
        else:
            self._fp.layout.check(suspect)
        return self._fp.extract(suspect, self.base.reference, self.base.strength)

    def accuse(self, y: np.ndarray) -> tuple[np.ndarray, float, np.ndarray, PValues | None]:
        """(score of every customer, threshold, accused indices most suspicious first, p-values or None).

        p-values come as a function of customer indices: computing them for 10^6 customers would cost more
        than scoring them.

        Tardos and random codes: normalized soft scores against z = Phi^-1(1 - eps/n); BIBD: the soft
        detector against its midway threshold (no Gaussian null, so no p-values).
        """
        p = self.params
        if self._rows is not None:
            scores = bibd.soft_scores(y, self._rows)
            threshold = bibd.soft_threshold(bibd.plane_order_for(p.max_colluders), p.max_colluders)
            order = np.argsort(-scores)
            return scores, threshold, order[scores[order] > threshold], None
        assert self._bias is not None
        acc = accuse(tardos_scores(self._book, y, self._bias), y, p.eps)
        return acc.normalized, acc.threshold, acc.accused, acc.p_values

    def trace(self, suspect: StateDict, top_k: int = 10, hard: bool = False) -> TraceReport:
        """Extract the soft code from ``suspect`` and score every customer.

        ``hard=True`` scores the signs of the soft code only (the classic hard-decision Tardos decoder); the
        threshold and its false-accusation bound hold for either observation.
        """
        start = time.perf_counter()
        y = self.extract(suspect)
        if hard:
            y = np.sign(y)
        scores, threshold, accused_idx, pvals = self.accuse(y)
        order = np.argsort(-scores)

        def suspects(idx: np.ndarray) -> list[Suspect]:
            pv = [None] * len(idx) if pvals is None else [float(q) for q in pvals(idx)]
            return [Suspect(self.names[i], float(scores[i]), q) for i, q in zip(idx, pv, strict=True)]

        top_row = unpack_bits(self._packed[order[0]], self.params.length)
        return TraceReport(
            accused=suspects(accused_idx),
            scores_top=suspects(order[:top_k]),
            threshold=float(threshold),
            eps=self.params.eps,
            code=self.params.code,
            users=len(self.names),
            length=self.params.length,
            signal_rms=float(np.linalg.norm(y) / np.sqrt(len(y))),
            bit_agreement_top=float(np.mean((y > 0) == top_row)),
            seconds=round(time.perf_counter() - start, 4),
            soft_code=y,
        )


def trace(suspect: StateDict, registry: Registry, top_k: int = 10, hard: bool = False) -> TraceReport:
    """One suspect against ``registry`` (see :class:`Tracer`)."""
    return Tracer(registry).trace(suspect, top_k, hard)
