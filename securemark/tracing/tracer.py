"""Trace a suspect model against a registry: who is accused, how sure, and how clean the extraction was."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from securemark.codes import bibd
from securemark.fingerprint.carrier import StateDict
from securemark.owner import fingerprinter
from securemark.registry import Registry, RegistryError
from securemark.tracing.scores import accuse, tardos_scores


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


def trace(suspect: StateDict, registry: Registry, top_k: int = 10, hard: bool = False) -> TraceReport:
    """Extract the soft code from ``suspect`` and score every customer of ``registry``.

    ``hard=True`` scores the signs of the soft code only (the classic hard-decision Tardos decoder); the
    threshold and its false-accusation bound hold for either observation.
    """
    start = time.perf_counter()
    base = registry.base()
    if base is None:
        raise RegistryError(f"registry {registry.directory} has issued no copy yet: nothing to trace against")
    names, book = registry.packed_codebook()
    if not names:
        raise RegistryError(f"registry {registry.directory} has no customers")
    fp = fingerprinter(registry, suspect)  # raises naming any tensor of the wrong shape
    y = fp.extract(suspect, base.reference, base.strength)
    if hard:
        y = np.sign(y)
    p = registry.params
    if p.code == "bibd":
        rows = np.array([registry.code_row(i) for i in range(len(names))])
        scores = bibd.soft_scores(y, rows)
        threshold = bibd.soft_threshold(bibd.plane_order_for(p.max_colluders), p.max_colluders)
        order = np.argsort(-scores)
        accused_idx = order[scores[order] > threshold]
        pvals = None
    else:
        acc = accuse(tardos_scores(book, y, registry.bias()), y, p.eps)
        scores, threshold, accused_idx = acc.normalized, acc.threshold, acc.accused
        order = np.argsort(-scores)
        pvals = acc.p_values

    def suspects(idx: np.ndarray) -> list[Suspect]:
        pv = pvals(idx) if pvals is not None else [None] * len(idx)
        return [
            Suspect(names[i], float(scores[i]), None if q is None else float(q)) for i, q in zip(idx, pv, strict=True)
        ]

    top = order[:top_k]
    top_row = registry.customer(names[top[0]], create=False).bits
    return TraceReport(
        accused=suspects(accused_idx),
        scores_top=suspects(top),
        threshold=float(threshold),
        eps=p.eps,
        code=p.code,
        users=len(names),
        length=p.length,
        signal_rms=float(np.linalg.norm(y) / np.sqrt(len(y))),
        bit_agreement_top=float(np.mean((y > 0) == top_row)),
        seconds=round(time.perf_counter() - start, 4),
        soft_code=y,
    )
