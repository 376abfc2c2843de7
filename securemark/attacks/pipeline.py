"""Attack pipelines written as text, e.g. ``collude:average > finetune:epochs=1,fraction=0.1 > prune:ratio=0.5``.

A step is ``name`` or ``name:key=value,...``; ``collude:median`` is short for ``collude:method=median``.
A pipeline starts from the coalition's copies: a ``collude`` step must come first when there are several;
with a single copy it is skipped (and recorded as skipped). Every step's record is kept, in order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from securemark.attacks import launder as L
from securemark.attacks import rewrite as R
from securemark.attacks.collude import COLLUSION_METHODS, collude
from securemark.data import Dataset
from securemark.fingerprint.groups import UnitGroup

StateDict = Mapping[str, torch.Tensor]

# step -> its parameters and their types (the first is the shorthand positional one for collude)
STEPS: dict[str, dict[str, type]] = {
    "collude": {"method": str, "alpha": float, "align": int},
    "finetune": {"epochs": int, "lr": float, "fraction": float},
    "prune": {"ratio": float, "scope": str},
    "quantize": {"bits": int},
    "noise": {"std": float},
    "overwrite": {"budget": float, "length": int},
    "distill": {"epochs": int, "lr": float, "temperature": float, "fraction": float},
    "spike": {"count": int, "low": float, "high": float, "dead": int},
    "permute": {},
    "rescale": {"low": float, "high": float},
    "widen": {"extra": int, "splits": int},
    "signflip": {"share": float},
    "obfuscate": {"dead": int},
}
_FINITE = "finite and > 0"
# what each parameter may be, checked when a pipeline is parsed: a bad config fails before any work is done
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "method": (lambda v: v in COLLUSION_METHODS, "one of " + ", ".join(COLLUSION_METHODS)),
    "alpha": (lambda v: np.isfinite(v), "finite"),
    "align": (lambda v: v in (0, 1), "0 or 1"),
    "epochs": (lambda v: 0 <= v <= 10_000, "0..10000"),
    "lr": (lambda v: np.isfinite(v) and v > 0, _FINITE),
    "fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "scope": (lambda v: v in ("global", "layer"), "global or layer"),
    "bits": (lambda v: v in (4, 8, 16), "4, 8 or 16"),
    "std": (lambda v: np.isfinite(v) and v >= 0, "finite and >= 0"),
    "budget": (lambda v: np.isfinite(v) and v > 0, _FINITE),
    "length": (lambda v: 16 <= v <= 1 << 20, "16..2^20"),
    "temperature": (lambda v: np.isfinite(v) and v > 0, _FINITE),
    "count": (lambda v: 0 <= v <= 1_000_000, "0..10^6"),
    "low": (lambda v: np.isfinite(v) and v > 0, _FINITE),
    "high": (lambda v: np.isfinite(v) and v > 0, _FINITE),
    "dead": (lambda v: v in (0, 1), "0 or 1"),
    "extra": (lambda v: 0 <= v <= 100_000, "0..10^5"),
    "splits": (lambda v: 0 <= v <= 100_000, "0..10^5"),
    "share": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}
assert all(k in RANGES for params in STEPS.values() for k in params)
DEAD_PROBE = 512  # examples of the pirate's own data that find inputs which are always zero


@dataclass(frozen=True)
class Step:
    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Attacker:
    """What the pirate holds besides the copies: the architecture, its own data, randomness."""

    model: Callable[[], torch.nn.Module]  # a freshly initialized model of the right architecture
    data: Dataset  # its own (labelled) data; distillation ignores the labels
    rng: np.random.Generator
    length: int = 1024  # overwrite: the attacker's own code length
    budget: float = 0.05  # overwrite: the attacker's own fidelity budget
    groups: Sequence[UnitGroup] | None = None  # the architecture's unit groups (None: read as a sequential chain)


def parse(spec: str) -> list[Step]:
    """``"collude:average > prune:ratio=0.5"`` -> [Step("collude", {"method": "average"}), ...]."""
    steps = []
    for raw in (part.strip() for part in spec.split(">")):
        if not raw:
            raise ValueError(f"empty step in attack pipeline {spec!r}")
        name, _, args = raw.partition(":")
        name = name.strip()
        if name not in STEPS:
            raise ValueError(f"unknown attack {name!r} in {spec!r}; known: {', '.join(STEPS)}")
        params: dict[str, Any] = {}
        for item in filter(None, (a.strip() for a in args.split(","))):
            key, eq, value = item.partition("=")
            if not eq and name == "collude":
                key, value = "method", key
            elif not eq:
                raise ValueError(f"{raw!r}: expected key=value, got {item!r}")
            key = key.strip()
            if key not in STEPS[name]:
                raise ValueError(f"{raw!r}: unknown parameter {key!r}; {name} takes {', '.join(STEPS[name])}")
            try:
                params[key] = STEPS[name][key](value.strip())
            except ValueError:
                raise ValueError(f"{raw!r}: {key} must be {STEPS[name][key].__name__}, got {value!r}") from None
            ok, allowed = RANGES[key]
            if not ok(params[key]):
                raise ValueError(f"{raw!r}: {key} must be {allowed}, got {value.strip()!r}")
        if params.get("low", 0) > params.get("high", np.inf):
            raise ValueError(f"{raw!r}: low must be <= high")
        steps.append(Step(name, params))
    if any(s.name == "collude" for s in steps[1:]):
        raise ValueError(f"{spec!r}: collude can only be the first step")
    return steps


def run(copies: Sequence[StateDict], steps: Sequence[Step], attacker: Attacker) -> tuple[dict, list[dict]]:
    """Apply ``steps`` to the coalition's ``copies``; returns the pirate model and one record per step."""
    if not copies:
        raise ValueError("an attack needs at least one copy")
    if len(copies) > 1 and (not steps or steps[0].name != "collude"):
        raise ValueError(f"{len(copies)} copies need a collude step first")
    current: dict = dict(copies[0])
    records: list[dict] = []
    for step in steps:
        p = step.params
        if step.name == "collude":
            if len(copies) == 1:
                records.append({"attack": "collude", "skipped": "a single copy"})
                continue
            held = _mutually_aligned(copies, attacker) if p.get("align", 0) else copies
            current, rec = collude(held, p.get("method", "average"), attacker.rng, p.get("alpha", 0.5))
            rec["mutually_aligned"] = bool(p.get("align", 0))
        elif step.name == "finetune":
            current, rec = L.finetune(
                current, attacker.model(), attacker.data, epochs=p.get("epochs", 1), lr=p.get("lr", 0.01),
                fraction=p.get("fraction", 1.0), rng=attacker.rng,
            )  # fmt: skip
        elif step.name == "prune":
            current, rec = L.prune(current, p.get("ratio", 0.5), p.get("scope", "global"))
        elif step.name == "quantize":
            current, rec = L.quantize(current, p.get("bits", 8))
        elif step.name == "noise":
            current, rec = L.add_noise(current, p["std"], attacker.rng)
        elif step.name == "overwrite":
            current, rec = L.overwrite(
                current, p.get("length", attacker.length), p.get("budget", attacker.budget), attacker.rng
            )
        elif step.name in ("spike", "obfuscate"):
            dead = _dead(current, attacker) if p.get("dead", 1) else None
            if step.name == "spike":
                current, rec = R.spike(current, attacker.rng, p.get("count", 0), p.get("low", 5.0),
                                       p.get("high", 500.0), dead)  # fmt: skip
            else:
                current, rec = R.obfuscate(current, attacker.rng, dead, groups=attacker.groups)
        elif step.name == "permute":
            current, rec = R.permute(current, attacker.rng, groups=attacker.groups)
        elif step.name == "rescale":
            current, rec = R.rescale(current, attacker.rng, p.get("low", 0.25), p.get("high", 4.0), attacker.groups)
        elif step.name == "signflip":
            current, rec = R.signflip(current, attacker.rng, p.get("share", 0.5), attacker.groups)
        elif step.name == "widen":
            current, rec = R.widen(current, attacker.rng, p.get("extra", 4), p.get("splits", 2), attacker.groups)
        else:  # distill
            unlabeled = attacker.data.sample(p.get("fraction", 1.0), attacker.rng)
            current, rec = L.distill(
                current, attacker.model(), attacker.model(), unlabeled, epochs=p.get("epochs", 5),
                lr=p.get("lr", 0.05), temperature=p.get("temperature", 2.0), rng=attacker.rng,
            )  # fmt: skip
        records.append(rec)
    return current, records


def _dead(sd: StateDict, attacker: Attacker) -> dict[str, torch.Tensor]:
    """Weights whose input is zero on the pirate's own data (a widened copy runs too: models.load_weights)."""
    return R.dead_inputs(attacker.model(), sd, attacker.data.x[:DEAD_PROBE])


def _mutually_aligned(copies: Sequence[StateDict], attacker: Attacker) -> list[dict]:
    """Coalition members that each permuted and rescaled their own copy, then aligned theirs to the first
    member's with the owner's own tool (it needs no secret): what a coalition must do before it can merge
    weights. (Widening comes after the merge, in ``obfuscate``: split units of two different widenings do not
    average into the same function.)"""
    from securemark.fingerprint.align import align

    g = attacker.groups
    held = [R.permute(R.signflip(R.rescale(c, attacker.rng, groups=g)[0], attacker.rng, groups=g)[0], attacker.rng,
                      groups=g)[0] for c in copies]  # fmt: skip
    return [held[0]] + [align(c, held[0], g)[0] for c in held[1:]]
