"""Black-box tracing: query a suspect on natural inputs, read the function mark, score with the white-box
tracer's scorer (same Tardos score, same certified bound).

The owner picks the inputs: its held-out data (the run's server share, or ``--query-data FILE.npz``), then,
when the budget asks for more, the same images shifted by up to two pixels. They are ordinary digits, not
secret out-of-distribution triggers a pirate could learn to spot and refuse. With several bases (a
federation keeps each round's model) the answers are read against every base that carries a function mark
and the least-energy reading is kept, by the white-box tracer's rule: the choice depends on the answers
and the bases, never on an innocent's code row, so the bound holds unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from securemark import models
from securemark.errors import InputError
from securemark.fingerprint.function import FunctionMark, Reading, features_and_logits, last_linear
from securemark.registry import Base, Registry, RegistryError
from securemark.registry.marks import function_mark_of
from securemark.tracing.bound import robust_observation
from securemark.tracing.oracle import Gauge, Oracle, OracleError, gauges, remapped
from securemark.tracing.verdict import Scorer, TraceReport

SHIFTS = [(dy, dx) for dy in (0, 1, -1, 2, -2) for dx in (0, 1, -1, 2, -2)]  # (0, 0) first: the data itself


def query_inputs(x: torch.Tensor | np.ndarray, count: int) -> np.ndarray:
    """``count`` query inputs from natural images ``x`` (N, C, H, W): x itself, then x shifted by (0, 1),
    (0, -1), ... up to two pixels each way (24 shifted versions, so at most 25 N inputs)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or len(x) == 0:
        raise InputError(f"query data must be a non-empty array (N, C, H, W), got shape {list(x.shape)}")
    rounds = -(-count // len(x))
    if rounds > len(SHIFTS):
        raise InputError(f"{count} queries need more than {len(SHIFTS)} shifted versions of {len(x)} inputs")
    out = [np.roll(x, SHIFTS[r], axis=(2, 3)) for r in range(rounds)]
    return np.concatenate(out)[:count]


def load_query_data(path: str | Path) -> np.ndarray:
    """Inputs from an .npz file (the array ``x``, or its only array) or an .npy file, shaped (N, C, H, W);
    pickled objects are refused."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            x = loaded
        else:
            with loaded as z:
                names = list(z.keys())
                key = "x" if "x" in names else (names[0] if len(names) == 1 else None)
                if key is None:
                    raise ValueError(f"it holds {names}; name the query inputs 'x'")
                x = z[key]
    except Exception as exc:  # zip, CRC, pickle and format errors all mean: not query data
        raise InputError(f"cannot read query data {path}: {exc}") from None
    if x.dtype.kind not in "fiu":
        raise InputError(f"query data {path}: expected real numbers, got dtype {x.dtype}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or len(x) == 0 or not np.all(np.isfinite(x)):
        raise InputError(f"query data {path}: expected finite inputs (N, C, H, W), got shape {list(x.shape)}")
    return x


@dataclass(frozen=True)
class MarkedBase:
    """A base whose copies carry a function mark: the mark and the base model, runnable."""

    label: str
    mark: FunctionMark
    model: nn.Module = field(repr=False)
    data: dict[str, object]


def marked_bases(registry: Registry) -> list[MarkedBase]:
    """Every base of ``registry`` with a function-mark record (current one last), with its model rebuilt; a
    damaged record or a model that does not fit it is a RegistryError, never a silent miss."""
    out = []
    current = registry.base()
    for base in registry.bases():
        recorded = function_mark_of(registry, base.digest)
        if recorded is None:
            continue
        mark, layer_name, info = recorded
        label = "current" if current is not None and base.digest == current.digest else base.label or base.digest[:12]
        out.append(MarkedBase(label, mark, _model(registry, base, mark, layer_name, info), dict(info.get("data", {}))))
    return out


def _model(registry: Registry, base: Base, mark: FunctionMark, layer_name: str, info: dict) -> nn.Module:
    """The base model, runnable, checked against the mark's record."""
    try:
        sd = registry.base_model(base)
        if sd is None:
            raise ValueError("the base's model file is missing")
        model = models.from_spec(info["model"], sd)
        name, layer = last_linear(model)
        basis = mark.basis
        if name != layer_name or layer.out_features != basis.classes or layer.in_features != basis.mean.shape[0]:
            raise ValueError(f"the model's last layer {name} ({layer.in_features} -> {layer.out_features}) is not "
                             f"the recorded {layer_name}")  # fmt: skip
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise RegistryError(f"the function-mark record of base {base.digest[:12]} is unusable: {exc}") from None
    return model


# A reading bent back to the base (oracle.remapped) fits the base's spread by construction, so it is kept only
# when it fits far better than every plain one: it halves their least misfit. Answers served as they are
# read as they always did (`bench blackbox --trials 4 --colluders 1 --temperatures 1 4 --archs cnn mlp`: of
# its 36 traces, 4 intact copies and 32 students, one student's reading changed, and nobody was accused).
BENT = 0.5


NO_VERDICT = "the answers show each query's top class alone and carry no readable mark: no black-box verdict"


def _refuse_top_alone(out: np.ndarray) -> None:
    """OracleError when, with 3 or more classes, every row of answers ``out`` (checked by gauges: real, finite,
    [Q, C]) holds one value and C - 1 copies of another (the top class and a filler: a top-1 answer, or a
    one-hot label): no output mark survives that, and "nobody accused" would read as a finding of innocence."""
    rows = np.sort(np.asarray(out, dtype=np.float64), axis=1)
    if rows.shape[1] >= 3:
        low_filler = np.all(rows[:, :-1] == rows[:, :1], axis=1)  # filler below the top
        high_filler = np.all(rows[:, 1:] == rows[:, -1:], axis=1)  # or above the bottom (negated scores)
        if np.all(low_filler | high_filler):
            raise OracleError(NO_VERDICT)


def _readable(g: Gauge) -> bool:
    """Whether reading ``g`` sees some query beyond its top class: a censored reading with at most one entry
    above its floor in every row sees nothing (its misfit is 0 of 0, and would win the choice below)."""
    return g.floor is None or bool(np.any(np.sum(g.scores > g.floor, axis=1) >= 2))


def _best(mark: FunctionMark, ways: list[Gauge], z: np.ndarray, h: np.ndarray) -> tuple[Reading, Gauge]:
    """The reading of the answers, among ``ways`` (at least one), closest to the base's logits ``z``."""
    return min(((mark.read(g.scores, z, h, g.floor), g) for g in ways), key=lambda rg: rg[0].misfit)


class BlackBoxTracer:
    """A registry read once for many black-box suspects."""

    def __init__(self, registry: Registry, query_data: np.ndarray | None = None) -> None:
        if registry.params.code == "bibd":
            raise RegistryError("black-box tracing reads Tardos or random codes; this registry uses BIBD")
        self.bases = marked_bases(registry)
        if not self.bases:
            raise RegistryError(
                f"no copy issued from {registry.directory} carries a function mark: black-box tracing needs one "
                "(issue copies with a function budget > 0)"
            )
        self.scorer = Scorer(registry)
        self._data = self._default_data() if query_data is None else query_data

    def _default_data(self) -> np.ndarray:
        """The held-out share of the data the current base's mark was fitted on."""
        from securemark.data import heldout

        d = self.bases[-1].data
        if not d:
            raise RegistryError("the registry does not say which data its mark was fitted on: pass --query-data")
        try:
            return heldout(d).x.numpy()
        except (OSError, ValueError) as exc:  # e.g. local data files moved since the mark was fitted
            why = f"the held-out data the mark was fitted on cannot be loaded ({exc}): pass --query-data FILE.npz"
            raise RegistryError(why + " (the same share, or other natural inputs)") from None

    def trace(self, oracle: Oracle, queries: int = 2000, outputs: str = "auto", top_k: int = 10) -> TraceReport:
        """Query ``oracle`` on ``queries`` inputs, read the mark against each marked base (under the way of
        reading the answers, oracle.gauges and oracle.remapped, that fits that base best), keep the
        least-energy reading and accuse. Both choices use the answers and the owner's models, never a code
        row: the bound holds. Everything that can be checked without the suspect (enough queries, inputs the
        base accepts) is checked before the first query is spent."""
        start = time.perf_counter()
        need = max(mb.mark.min_queries for mb in self.bases)
        if queries < need:
            raise InputError(f"{queries} queries are too few for this registry's mark: it needs at least {need}")
        x = query_inputs(self._data, queries)
        inputs = torch.from_numpy(x.copy())  # the owner's copy: nothing the suspect does can touch it
        base_views = []
        for mb in reversed(self.bases):  # the current base first: it wins ties
            try:
                base_views.append((mb, *features_and_logits(mb.model, inputs)))
            except RuntimeError as exc:
                why = str(exc).splitlines()[0]
                raise InputError(f"the query inputs {list(x.shape[1:])} do not fit the base model: {why}") from None
        out = oracle(x)
        readings = [g for g in gauges(out, outputs) if _readable(g)]  # gauges() refuses what is no prediction
        _refuse_top_alone(out)
        if not readings:  # e.g. a two-class model's top-1 answer read as censored probabilities
            raise OracleError(f"{NO_VERDICT}: read as censored, no query shows two entries above the floor")
        best = None
        for mb, h, z in base_views:  # per base, the way of reading the answers that fits them best
            reading, gauge = _best(mb.mark, readings, z, h)  # gauges() returns at least one way or raises
            if bent_ways := [r for g in readings for r in remapped(g, z)]:
                bent = _best(mb.mark, bent_ways, z, h)
                if bent[0].misfit < BENT * reading.misfit:
                    reading, gauge = bent
            obs = robust_observation(reading.y)
            energy = float(np.dot(obs.y, obs.y))
            if best is None or energy < best[0]:
                best = (energy, obs, reading, gauge, mb.label)
        assert best is not None
        _, obs, reading, gauge, label = best
        info: dict[str, object] = {
            "status": "black box: outputs only", "queries": int(oracle.used), "outputs": gauge.kind,
            "censored_below": None if gauge.floor is None else round(float(np.exp(gauge.floor)), 8),
            "scale": round(reading.scale, 4), "residual_rms": round(reading.residual_rms, 4),
            "explained_rms": round(reading.explained_rms, 4), "capacity": self.bases[-1].mark.basis.capacity,
            "base": label, "bases_tried": len(self.bases),
        }  # fmt: skip
        return self.scorer.report(obs, info, start, top_k)
