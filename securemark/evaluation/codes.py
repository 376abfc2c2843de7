"""Monte-Carlo evaluation of a code under a collusion attack: catch rate and false accusations."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from securemark.codes import bibd, tardos
from securemark.codes.base import CODE_KINDS
from securemark.codes.channel import ATTACKS, collude
from securemark.codes.random import uniform_bias
from securemark.errors import InputError
from securemark.tracing.bound import Law, centred, robust_observation
from securemark.tracing.scores import accuse


@dataclass(frozen=True)
class CodeTrialSpec:
    code: str = "tardos"
    users: int = 1000
    colluders: int = 5
    length: int = 2048
    attack: str = "average"
    noise: float = 0.0
    trials: int = 200
    eps: float = 1e-3
    seed: int = 0
    max_colluders: int | None = None  # Tardos cutoff / BIBD design; defaults to ``colluders``
    detector: str = "and"  # BIBD only: "and" or "soft"

    def validate(self) -> None:
        if self.code not in CODE_KINDS:
            raise InputError(f"code must be one of {CODE_KINDS}, got {self.code!r}")
        if self.attack not in ATTACKS:
            raise InputError(f"attack must be one of {ATTACKS}, got {self.attack!r}")
        if not 1 <= self.colluders <= self.users:
            raise InputError(f"need 1 <= colluders <= users, got {self.colluders} and {self.users}")
        if self.trials < 1 or self.length < 1 or self.noise < 0:
            raise InputError("trials and length must be >= 1 and noise >= 0")
        if self.detector not in ("and", "soft"):
            raise InputError(f"detector must be 'and' or 'soft', got {self.detector!r}")
        if not 0 < self.eps < 1:  # NaN fails this too
            raise InputError(f"eps must lie in (0, 1), got {self.eps}")


def _accuse_scored(spec: CodeTrialSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """One trial of a scored code (Tardos or random): (accused users, coalition, normalized threshold).

    The reading and threshold are the tracer's own: the observation clipped, centred on the code's expected row
    and scored against the threshold certified for its exact innocent law (tracing.bound).
    """
    c_max = spec.max_colluders or spec.colluders
    if spec.code == "tardos":
        bias = tardos.arcsine_bias(rng.random(spec.length), c_max)
    else:
        bias = uniform_bias(spec.length)
    rows = tardos.draw_rows(bias.astype(np.float32), rng.random((spec.users, spec.length), dtype=np.float32))
    coalition = rng.choice(spec.users, size=spec.colluders, replace=False)
    y = collude(2.0 * rows[coalition] - 1.0, spec.attack, rng, spec.noise)
    y = centred(robust_observation(y).y, bias, c_max)
    w, offset = tardos.score_weights(y, bias)
    scores = rows.astype(np.float32) @ w.astype(np.float32) - offset
    acc = accuse(scores, Law.of(y, bias), spec.eps, lambda users: tardos.soft_scores_reference(rows[users], y, bias))
    return acc.accused, coalition, acc.threshold


def _accuse_bibd(
    spec: CodeTrialSpec, rng: np.random.Generator, rows: np.ndarray, q: int
) -> tuple[np.ndarray, np.ndarray]:
    c_max = spec.max_colluders or spec.colluders
    coalition = rng.choice(spec.users, size=spec.colluders, replace=False)
    y = collude(2.0 * rows[coalition] - 1.0, spec.attack, rng, spec.noise)
    if spec.detector == "and":
        return bibd.and_detector(y, rows, c_max), coalition
    return np.flatnonzero(bibd.soft_scores(y, rows) > bibd.soft_threshold(q, c_max)), coalition


def evaluate_code(spec: CodeTrialSpec, progress: bool = False) -> dict[str, object]:
    """Run ``spec.trials`` independent trials and summarize them."""
    spec.validate()
    rng = np.random.default_rng(spec.seed)
    start = time.perf_counter()
    if spec.code == "bibd":
        q = bibd.plane_order_for(spec.max_colluders or spec.colluders)
        rows = bibd.code_rows(q)
        if spec.users > len(rows):
            raise InputError(f"PG(2,{q}) serves at most {len(rows)} users; asked for {spec.users}")
        c_max = spec.max_colluders or spec.colluders
        # the detector's own cut: AND reads a position as 1 above 1 - 1/c_max; soft compares line means
        threshold = 1.0 - 1.0 / c_max if spec.detector == "and" else bibd.soft_threshold(q, c_max)
        rows, length = rows[: spec.users], rows.shape[1]
    else:
        length, threshold = spec.length, float("nan")  # per trial: the mean is reported

    caught = all_caught = false_acc = trials_false = accused_total = 0
    thresholds = []
    trial_range: Iterable[int] = range(spec.trials)
    if progress:
        from rich.console import Console
        from rich.progress import track

        label = f"{spec.code} {spec.attack} c={spec.colluders}"
        trial_range = track(trial_range, description=label, console=Console(stderr=True))
    for _ in trial_range:
        if spec.code == "bibd":
            accused, coalition = _accuse_bibd(spec, rng, rows, q)
        else:
            accused, coalition, t = _accuse_scored(spec, rng)
            thresholds.append(t)
        guilty = np.isin(accused, coalition)
        n_guilty, n_innocent = int(guilty.sum()), int((~guilty).sum())
        caught += n_guilty >= 1
        all_caught += n_guilty == spec.colluders
        false_acc += n_innocent
        trials_false += n_innocent > 0
        accused_total += len(accused)
    out = asdict(spec)
    out.update(
        length=length,
        threshold=threshold if spec.code == "bibd" else float(np.mean(np.asarray(thresholds)[np.isfinite(thresholds)])),
        catch_rate=caught / spec.trials,
        all_caught_rate=all_caught / spec.trials,
        false_accusations=false_acc,
        trials_with_false_accusation=trials_false,
        mean_accused=accused_total / spec.trials,
        seconds=round(time.perf_counter() - start, 3),
    )
    return out
