"""What a round reports: client metrics averaged (without weights: the example counts are secret), and the
line the console prints for each round."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Message


def metrics_of(reply: Message) -> dict[str, Any]:
    recs = list(reply.content.metric_records.values())
    return dict(recs[0]) if recs else {}


def mean_metrics(records: list[dict[str, Any]]) -> dict[str, float]:
    keys = set().union(*records) if records else set()
    out = {}
    for k in sorted(keys):
        vals = [v for r in records if (v := finite_float(r.get(k))) is not None]
        if vals:
            out[k] = float(np.mean(vals))
    return out


def finite_float(value: Any) -> float | None:
    """A metric as a finite float, or None (not a number, a bool, too large for a float, NaN, infinite)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        out = float(value)
    except OverflowError:
        return None
    return out if math.isfinite(out) else None


def round_line(m: dict[str, Any]) -> str:
    parts = [f"round {m['round']}: {m['status']}"]
    if "global_accuracy" in m:
        parts.append(f"acc {m['global_accuracy']:.3f}")
    if "copies_mean_accuracy" in m:
        parts.append(f"copies {m['copies_mean_accuracy']:.3f} (min {m['copies_min_accuracy']:.3f})")
    if "max_bit_error" in m:
        parts.append(f"bit error {m['max_bit_error']:.3f}")
    if "min_function_cosine" in m:
        parts.append(f"function mark cosine {m['min_function_cosine']:.3f}")
    if "survived" in m:
        parts.append(f"survived {m['survived']}/{m['sampled']}")
    if "clipped" in m:  # masked rounds: values cut to their tensor's quantization range
        parts.append(f"clipped {m['clipped']:,}" + (f" ({m['clipped_share']:.1e})" if m["clipped"] else ""))
    parts.append(f"{m['seconds']:.1f} s")
    return "  " + ", ".join(parts)
