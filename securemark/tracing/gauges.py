"""The ways a suspect's answers can be read, as pure numpy on the answers alone: as logits, as probabilities,
as probabilities with a constant added (to every answer or per query), and each of them bent back to a base's
logits by rank. No model, no transport: tracing.oracle fetches the answers, tracing.blackbox keeps the reading
that fits the base best.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from securemark.tracing.errors import OracleError

OUTPUT_KINDS = ("auto", "probs", "logits")
ABSURD = 1e12  # no model's logits or log-probabilities come near: such answers are refused, never read


@dataclass(frozen=True)
class Gauge:
    """One way to read a suspect's answers: log-scores (Q x C), what the answers were read as, and the
    censoring floor (a log-score; None when nothing is censored)."""

    scores: np.ndarray
    kind: str
    floor: float | None


def gauges(out: np.ndarray, kind: str = "auto") -> list[Gauge]:
    """Every way ``out`` can be read under ``kind``: "logits" (as they are), "probs" (their logs), and for
    probabilities served with a constant added, to every answer or per query (p - 0.01, a floor lifted off
    zero, label smoothing), "probs minus a constant" and "probs minus a constant per query". ``auto`` offers
    all that apply. The tracer keeps the one under which the answers are closest to the base's (a choice
    made from the answers and the owner's model alone, so the bound holds whichever is kept). A factor,
    common or per query, is a constant per row in log space, which the reader's centring removes.

    Probabilities are often post-processed before they are served: rounded, kept to the top k, clamped, or
    shifted. Every value at or below the smallest positive one reported is censored: when the answers show
    it (zeros, or several values tied at the smallest), the floor is the log of that value, and the reader
    leaves every entry at the floor out of its fit (fingerprint.function.masked_fit)."""
    if np.iscomplexobj(out):  # a cast to float would drop the imaginary part without a word
        raise OracleError("the suspect answered complex numbers: not a prediction")
    out = np.asarray(out, dtype=np.float64)
    if out.ndim != 2 or out.shape[1] < 2:
        raise OracleError(f"expected outputs of shape [batch, classes], got {list(out.shape)}")
    if not np.all(np.isfinite(out)):
        raise OracleError("the suspect answered NaN or inf: no verdict can be built on it")
    if np.max(np.abs(out)) > ABSURD:
        raise OracleError(f"the suspect answered values beyond {ABSURD:g}: absurd for a model's outputs, no verdict")
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"outputs must be one of {OUTPUT_KINDS}, got {kind!r}")
    found = [Gauge(out, "logits", None)] if kind != "probs" else []
    if kind == "logits":
        return found
    lo, row_lo = float(out.min()), out.min(axis=1, keepdims=True)
    candidates = [(out, "probs")] if lo >= 0 else []
    if lo != 0:
        candidates.append((_shifted(out, lo), "probs minus a constant"))
    if np.ptp(row_lo) > 0:
        candidates.append((_shifted(out, row_lo), "probs minus a constant per query"))
    found += [_probabilities(p, k) for p, k in candidates if np.any(p > 0)]
    if not found:
        raise OracleError("the suspect's answers hold no positive probability however read: no verdict")
    return found


def remapped(gauge: Gauge, base_logits: np.ndarray) -> list[Gauge]:
    """``gauge`` read through a monotone map of its values, fitted so that the answers' values are spread as
    the base's logits are: each score replaced by the base's value of the same rank, pooled over all answers
    (ties share their mean). A server that bends its outputs by any increasing function, common to every
    entry (``z**3``, a calibration curve), keeps every top-1 and hides a mark a linear reading looks for;
    matching the values back to the base's undoes the bend up to the mark itself, which moves the spread by
    (3% of its RMS)**2. Two targets: the base's logits as they are, and minus each row's top (for a bend of
    ``z - max z``). A censored gauge is left as it is (its floor is one value many ranks share).

    The map is fitted on the answers and the base alone, so an innocent's row stays independent of it."""
    if gauge.floor is not None:
        return []
    z = np.asarray(base_logits, dtype=np.float64)
    match = _rank_matcher(gauge.scores)
    return [Gauge(match(t), f"{gauge.kind}, bent back to the base's {name}", None)
            for t, name in ((z, "logits"), (z - z.max(axis=1, keepdims=True), "logits below each top"))]  # fmt: skip


def _rank_matcher(scores: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``scores`` ranked once; the function returned replaces each entry by the entry of a ``target`` (same
    size) of the same pooled rank, a run of tied scores getting the mean of the targets its ranks span."""
    order = np.argsort(scores, axis=None, kind="stable")
    ranked = scores.ravel()[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    counts = np.diff(np.r_[starts, ranked.size])

    def match(target: np.ndarray) -> np.ndarray:
        out = np.empty(scores.size)
        out[order] = np.repeat(np.add.reduceat(np.sort(target, axis=None), starts) / counts, counts)
        return out.reshape(scores.shape)

    return match


def _shifted(out: np.ndarray, offset: float | np.ndarray) -> np.ndarray:
    """``out - offset``, the entries within the offset's own rounding of it (float32: 6e-8) set to 0."""
    shifted = out - offset
    shifted[shifted <= 1e-6 * np.abs(offset)] = 0.0
    return shifted


def _probabilities(out: np.ndarray, kind: str) -> Gauge:
    positive = out[out > 0]
    low = positive.min()
    censored = bool(np.any(out == 0)) or int(np.sum(out == low)) > 1  # zeros, or ties at a floor: post-processed
    return Gauge(np.log(np.maximum(out, low)), kind, float(np.log(low)) if censored else None)
