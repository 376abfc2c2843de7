"""The fingerprinting schemes an evaluation compares, behind one small interface: issue customer j's copy,
trace a suspect, and say how much of the coalition's fingerprint survived in it.

* :class:`SharedScheme` is securemark: one secret projection shared by all customers, a collusion-resistant
  code (Tardos, random +-1 or BIBD) in a fresh registry, traced by :class:`~securemark.tracing.tracer.Tracer`.
* :class:`FedTrackerScheme` is the per-customer-projection baseline with argmax tracing.

Customers are registered (each gets its code row) but copies are embedded only when a trial needs them:
embedding is deterministic, so customer j's copy is the same whenever it is made, and a thousand full models
never sit in memory. No delivery is recorded: an evaluation delivers nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from securemark.codes import unpack_bits
from securemark.evaluation.config import EvalConfig
from securemark.fingerprint.carrier import CarrierSpec, StateDict
from securemark.fingerprint.fedtracker import PerCustomerFingerprints, argmax_trace
from securemark.fingerprint.keys import OwnerSecret
from securemark.owner import establish_base
from securemark.registry import Registry, RegistryParams
from securemark.tracing.tracer import Tracer


@dataclass(frozen=True)
class Outcome:
    accused: np.ndarray  # customer indices
    scores: np.ndarray  # (n,) each customer's score in the scheme's own units
    threshold: float | None  # None: argmax, no threshold
    soft: np.ndarray  # the extracted soft code: (L,) shared, (n, L) per customer


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norm if norm > 0 else 0.0


def registry_params(code: str, cfg: EvalConfig) -> RegistryParams:
    c = cfg.code
    return RegistryParams(
        code=code, length=c.length, max_colluders=c.max_colluders, eps=c.eps, budget=c.budget,
        carrier_mode=c.carrier_mode, include=c.include,
    )  # fmt: skip


def scheme_customers(name: str, cfg: EvalConfig) -> int:
    """How many customers a scheme serves: all asked for, except what a BIBD design caps."""
    capacity = None if name == "fedtracker" else registry_params(name, cfg).capacity
    return min(cfg.evaluate.customers, capacity or cfg.evaluate.customers)


class SharedScheme:
    def __init__(self, registry: Registry, base: StateDict) -> None:
        """The scheme over a registry whose customers are registered (``create``, or a copy of one)."""
        self.name = registry.params.code
        self.registry = registry
        self.base_model = base
        self.fp, self.base = establish_base(registry, base)
        _, packed = registry.codebook()
        self.rows = unpack_bits(packed, registry.params.length)  # (n, L) bool
        self.tracer = Tracer(registry)

    @classmethod
    def create(
        cls, code: str, cfg: EvalConfig, base: StateDict, directory: Path, arch: dict[str, Any] | None = None
    ) -> SharedScheme:
        """A new registry with its customers; ``arch``: the model's architecture record (its unit groups)."""
        registry = Registry.init(directory, registry_params(code, cfg))
        if arch is not None:
            registry.set_arch(arch)
        for j in range(scheme_customers(code, cfg)):
            registry.customer(f"customer-{j:05d}")
        return cls(registry, base)

    @property
    def customers(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        return self.rows.shape[1]

    def copy(self, j: int, strength: float | None = None) -> dict:
        return self.fp.embed(self.base_model, self.rows[j], self.base.strength if strength is None else strength)

    def trace(self, suspect: StateDict) -> Outcome:
        obs, _ = self.tracer.observe(suspect)
        v = self.tracer.accuse(obs.y)
        return Outcome(v.accused, v.scores, v.threshold, obs.y)

    def survival(self, outcome: Outcome, coalition: np.ndarray) -> tuple[float, float]:
        """(bit agreement, cosine): the share of positions where all colluders hold the same symbol that
        sign(y) still shows, and cos(y, mean of the colluders' +-1 rows). Both are 1 for an intact copy."""
        if len(coalition) == 0:
            return float("nan"), float("nan")
        rows = self.rows[coalition]
        common = rows.all(axis=0) | ~rows.any(axis=0)  # (L,) positions the marking assumption protects
        agree = (outcome.soft[common] > 0) == rows[0, common]
        return float(agree.mean()) if common.any() else float("nan"), _cosine(outcome.soft, (2.0 * rows - 1).mean(0))

    def close(self) -> None:
        self.registry.close()


class FedTrackerScheme:
    name = "fedtracker"

    def __init__(self, cfg: EvalConfig, base: StateDict) -> None:
        c = cfg.code
        spec = CarrierSpec(include=c.include, mode=c.carrier_mode)
        self.base_model = base
        self.fps = PerCustomerFingerprints.create(
            OwnerSecret.generate(), spec, base, cfg.evaluate.customers, c.length, c.budget
        )  # a fresh secret held in memory only: nothing of this baseline outlives the evaluation

    @property
    def customers(self) -> int:
        return self.fps.customers

    @property
    def length(self) -> int:
        return self.fps.length

    def copy(self, j: int, strength: float | None = None) -> dict:
        if strength is not None:
            raise ValueError("the fedtracker baseline embeds at its configured budget only")
        return self.fps.embed(self.base_model, j)

    def trace(self, suspect: StateDict) -> Outcome:
        soft = self.fps.extract_all(suspect)  # (n, L)
        agreement = self.fps.agreement(soft)
        return Outcome(argmax_trace(agreement), agreement, None, soft)

    def survival(self, outcome: Outcome, coalition: np.ndarray) -> tuple[float, float]:
        """Mean over colluders of their own fingerprint's bit agreement and cosine (no shared code here)."""
        if len(coalition) == 0:
            return float("nan"), float("nan")
        cos = [_cosine(outcome.soft[j], 2.0 * self.fps.bits[j] - 1) for j in coalition]
        return float(outcome.scores[coalition].mean()), float(np.mean(cos))

    def close(self) -> None:
        pass


Scheme = SharedScheme | FedTrackerScheme


def make_scheme(
    name: str, cfg: EvalConfig, base: StateDict, directory: Path, arch: dict[str, Any] | None = None
) -> Scheme:
    if name == "fedtracker":
        return FedTrackerScheme(cfg, base)
    return SharedScheme.create(name, cfg, base, directory / name, arch)
