"""Pure statistics of trial outcomes: Wilson score intervals and per-cell summaries."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Z95 = 1.959963984540054  # Phi^-1(0.975)


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion: sound at 0 and n successes, where the normal
    approximation collapses to a zero-width interval (0 of 200 gives [0, 0.0188], not [0, 0])."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    p = successes / trials
    z2n = z * z / trials
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / trials + z2n / (4 * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(trials: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One cell's figures from its trial records (see trials.run_trial for the fields)."""
    n = len(trials)
    if n == 0:
        raise ValueError("a cell needs at least one trial")
    size = trials[0]["coalition_size"]
    caught = sum(t["caught"] for t in trials)
    with_innocent = sum(t["innocents_accused"] > 0 for t in trials)
    measured = [a for t in trials if (a := t["accuracy"]) is not None and math.isfinite(a)]  # see accuracy_trials
    out: dict[str, Any] = {
        "trials": n,
        "catch_rate": caught / n if size > 0 else None,  # a control (no colluder) has nobody to catch
        "catch_low": wilson(caught, n)[0] if size > 0 else None,
        "catch_high": wilson(caught, n)[1] if size > 0 else None,
        "all_caught_rate": sum(t["colluders_accused"] == size for t in trials) / n if size > 0 else None,
        "colluders_accused_mean": _mean([t["colluders_accused"] for t in trials]),
        "innocents_accused": sum(t["innocents_accused"] for t in trials),
        "trials_with_innocent": with_innocent,
        "innocent_rate_high": wilson(with_innocent, n)[1],  # 95% upper bound on P(a trial accuses an innocent)
        "accuracy": _mean(measured),
        "accuracy_min": min(measured, default=float("nan")),
        "bit_agreement": _mean([t["bit_agreement"] for t in trials]),
        "survival": _mean([t["survival"] for t in trials]),
        "top_colluder_score": _mean([t["top_colluder_score"] for t in trials if size > 0]),
        "top_innocent_score": _mean([t["top_innocent_score"] for t in trials]),
        "tracing_seconds": _mean([t["tracing_seconds"] for t in trials]),
        "attack_seconds": _mean([t["attack_seconds"] for t in trials]),
    }
    return out


def meets_target(cell: dict[str, Any], catch: float = 0.99) -> bool:
    """The acceptance target: catch_rate >= ``catch`` (for real coalitions) and no innocent accused."""
    caught_enough = cell["catch_rate"] is None or cell["catch_rate"] >= catch
    return bool(caught_enough and cell["innocents_accused"] == 0)
