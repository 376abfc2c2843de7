"""`securemark bench censored`: how often the black-box tracer names a leaker whose answers a server censors
(rounded, float16, clamped, only the k largest probabilities), over many trained models.

One trained model says little: which model a machine trains from the same seeds depends on its floating-point
paths, and a reading that held for one model and missed for another once passed CI on one machine and failed
on the next. So each (model, seed) cell trains its own base (``cnn`` and ``mlp``: on the 8x8 synthetic data
the test suite uses, function budget 0.05, 4 components skipped; ``quickstart``: the quickstart CNN on
MNIST-5k, 2 epochs, the apps' defaults 0.03 and 10), issues copies with both marks to 5 of 300 customers,
serves customer c004's copy through each transform in this process, and traces it. Per transform: the catch
rate, the leaker's score over the certified threshold (min and median), and every innocent accused.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from securemark import data, models, training
from securemark.errors import InputError
from securemark.owner import FunctionSpec, issue_copies
from securemark.registry import Registry, RegistryParams
from securemark.tracing.blackbox import BlackBoxTracer


def _top_k(p: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    rank = p.argsort(dim=1, descending=True).argsort(dim=1)
    return torch.where(rank < k, p, torch.zeros_like(p))


# What a server may serve instead of a copy's logits z: probabilities p = softmax(z), censored.
CENSORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "rounded": lambda p: torch.round(p * 1000.0) / 1000.0,  # three decimals
    "rounded-2": lambda p: torch.round(p * 100.0) / 100.0,  # two decimals
    "float16": lambda p: p.half().double(),
    "clamp": lambda p: p.clamp(min=1e-3),
    "top3": lambda p: _top_k(p, torch.tensor(3)),
    "top3-renormalized": lambda p: (q := _top_k(p, torch.tensor(3))) / q.sum(dim=1, keepdim=True),
    "top-k varying": lambda p: _top_k(p, (2 + torch.arange(len(p)) % 4)[:, None]),  # k = 2..5 by query
}
ARCHS = ("cnn", "mlp", "quickstart")


class Served:
    """A model answering in this process through ``CENSORS[kind]``: an oracle, as the tracer sees one."""

    def __init__(self, model: torch.nn.Module, kind: str) -> None:
        self.model, self.censor, self.used = model, CENSORS[kind], 0

    @torch.no_grad()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.used += len(x)
        return self.censor(torch.softmax(self.model(torch.from_numpy(x)).double(), dim=1)).numpy()


def leak(arch: str, seed: int, directory: Path, customers: int = 300) -> tuple[Registry, torch.nn.Module]:
    """A base of ``arch`` (ARCHS) trained from ``seed``, its registry in ``directory`` and customer c004's copy."""
    quickstart = ("mnist5k", 2, 0.2, 0.03, 10)  # data, epochs, held-out share, function budget, skip
    name, epochs, fraction, budget, skip = quickstart if arch == "quickstart" else ("synthetic", 3, 0.3, 0.05, 4)
    kind = "cnn" if arch == "quickstart" else arch
    pool, held = data.load(name, 0).split(fraction, 0)
    shape = tuple(held.x.shape[1:])
    model = models.build(kind, shape, 10, seed=seed)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    training.train(model, pool, epochs=epochs, generator=gen, device=torch.device("cpu"))
    record = {"name": name, "seed": 0, "test_fraction": fraction, "files": ""}
    spec = FunctionSpec(models.spec_of(kind, shape, 10), held.x, record, budget=budget, skip=skip)  # type: ignore[arg-type]
    params = RegistryParams(code="tardos", length=512, max_colluders=3, eps=1e-3, exclude=spec.carrier_exclude())
    reg = Registry.init(directory, params)
    copy = issue_copies(reg, dict(model.state_dict()), [f"c{i:03d}" for i in range(5)], function=spec)["c004"]
    for i in range(5, customers):
        reg.customer(f"c{i:03d}")
    return reg, models.from_spec(spec.model, copy)


def bench_censored(archs: tuple[str, ...], seeds: int, kinds: tuple[str, ...], queries: int = 800) -> dict[str, Any]:
    unknown = sorted(set(kinds) - set(CENSORS)) + sorted(set(archs) - set(ARCHS))
    if unknown:
        raise InputError(f"unknown {unknown}: censorings are {', '.join(CENSORS)}; models {', '.join(ARCHS)}")
    rows, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="securemark-censored-") as tmp, Progress(transient=True) as bar:
        task = bar.add_task("trained models", total=len(archs) * seeds)
        for arch in archs:
            for seed in range(seeds):
                reg, copy = leak(arch, seed, Path(tmp) / f"{arch}-{seed}")
                tracer = BlackBoxTracer(reg)
                for kind in kinds:
                    report = tracer.trace(Served(copy, kind), queries)
                    score = next((s.score for s in report.scores_top if s.customer == "c004"), 0.0)
                    accused = [s.customer for s in report.accused]
                    rows.append({"arch": arch, "seed": seed, "served": kind, "caught": "c004" in accused,
                                 "innocents": len([c for c in accused if c != "c004"]),
                                 "ratio": score / report.threshold})  # fmt: skip
                reg.close()
                bar.advance(task)
    cells = [_cell(rows, a, k) for a in archs for k in kinds]
    seconds = round(time.perf_counter() - start, 1)
    return {"queries": queries, "customers": 300, "length": 512, "seconds": seconds, "cells": cells}


def _cell(rows: list[dict[str, Any]], arch: str, kind: str) -> dict[str, Any]:
    mine = [r for r in rows if r["arch"] == arch and r["served"] == kind]
    ratios = [r["ratio"] for r in mine]
    return {"arch": arch, "served": kind, "models": len(mine), "caught": sum(r["caught"] for r in mine),
            "innocents_accused": sum(r["innocents"] for r in mine), "score_over_threshold_min": round(min(ratios), 3),
            "score_over_threshold_median": round(statistics.median(ratios), 3)}  # fmt: skip
