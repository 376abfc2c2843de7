"""`securemark bench rounds`: seconds per federated round, four ways, same model, data and clients.

- plain: securemark's ServerApp with fingerprinting and masking off (FedAvg of plain updates);
- securemark: fingerprinted copies and masked aggregation (SecAgg over `cryptography`);
- malicious: the same under ``secagg.threat = "malicious"`` (signed keys, a third exchange for the signed
  survivor list);
- flower_secaggplus: Flower's own SecAgg+ (SecAggPlusWorkflow around a legacy FedAvg, secaggplus_mod; the apps
  are in securemark.flower.secaggplus).

A round is timed on the server from sampling to the updated global model (evaluation excluded, as in
metrics.json). Each variant is a fresh simulation, run ``repeats`` times in alternating order (plain,
securemark, malicious, SecAgg+, then SecAgg+, malicious, securemark, plain, ...) so a machine that slows down
or speeds up during the bench weighs on every variant alike; the figure is the median over every counted round
of a variant (each run's first round, Ray start-up and warm-up, is not counted).

What masking must cost here, whatever the code, is measured beside it: one client's encoding and masking of
an update of this size (in this process, median of 5), and the unmask exchange, a second trip through
Flower's engine, which takes up new messages every 0.1 s (``flwr.server.superlink.fleet.vce``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from securemark import data, models
from securemark.config import SimConfig
from securemark.errors import InputError, RunFailed
from securemark.fingerprint.function import features_and_logits
from securemark.modelio import load_state_dict

VARIANTS = ("plain", "securemark", "malicious", "flower_secaggplus")


def bench_config(clients: int, params: int, rounds: int, seed: int = 0) -> SimConfig:
    """MNIST-5k, an MLP sized to ``params`` parameters, every client in every round, 1 local epoch."""
    shape, classes = (1, 28, 28), 10
    width = models.mlp_width_for(params, shape, classes)
    raw = {
        "data": {"name": "mnist5k"},
        "model": {"name": "mlp", "width": width},
        "train": {"rounds": rounds, "clients": clients, "per_round": clients, "local_epochs": 1, "seed": seed},
        "fingerprint": {"length": 1024, "eval_copies": 1},
    }
    return SimConfig.from_dict(raw)


def variant_config(cfg: SimConfig, variant: str) -> SimConfig:
    on = variant in ("securemark", "malicious")
    threat = "malicious" if variant == "malicious" else "semi-honest"
    return dataclasses.replace(
        cfg,
        fingerprint=dataclasses.replace(cfg.fingerprint, enabled=on),
        secagg=dataclasses.replace(cfg.secagg, enabled=on, threat=threat),
    )


# --- the benchmark ---------------------------------------------------------------------------------
def run_variant(cfg: SimConfig, variant: str, workdir: Path) -> tuple[list[float], list[dict[str, float]]]:
    """Per-round seconds of one variant (a fresh simulation), and per round the seconds of each stage
    (securemark's ServerApp only: metrics.json's stage_seconds)."""
    from securemark.flower.secaggplus import secaggplus_apps
    from securemark.flower.simulation import run_apps
    from securemark.sim import simulate

    if variant == "flower_secaggplus":
        seconds: list[float] = []
        run_apps(*secaggplus_apps(cfg, seconds), cfg)
        if len(seconds) != cfg.train.rounds:
            raise RunFailed(f"Flower's SecAgg+ finished {len(seconds)} of {cfg.train.rounds} rounds")
        return seconds, []
    rounds = simulate(variant_config(cfg, variant), workdir / variant)["rounds"]
    failed = [m["round"] for m in rounds if m["status"] != "completed"]
    if failed:
        raise RunFailed(f"{variant}: rounds {failed} failed")
    return [float(m["seconds"]) for m in rounds], [m["stage_seconds"] for m in rounds]


def median_stages(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Each stage's median over the rounds given (hello: identities; setup: the base recorded, masking set
    up; train: copies made and sent, local training, replies in; unmask: the second exchange; sum: the
    aggregate)."""
    stages = [s for s in rounds[0]] if rounds else []
    return {s: round(statistics.median(r.get(s, 0.0) for r in rounds), 4) for s in stages}


def function_marks(out: Path, initial_marked: bool = False) -> dict[str, Any]:
    """The function mark in the copies of a run in ``out``: the rounds whose copies carried it (metrics.json's
    min_function_cosine, measured on every copy a round issued) beside the rounds whose copies should (round 1's,
    of the initial model, only with ``initial_marked``: fingerprint.function_initial), and the final copies, read
    back as a tracer reads them: for each, the cosine between its reading on the held-out data and its code
    row's expected reading (FunctionMark.health: 1 for the mark alone, 0.8-0.97 beside the white-box mark, ~0
    without it)."""
    from securemark.registry import Registry
    from securemark.registry.marks import function_mark_of

    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    health = [m["min_function_cosine"] for m in rounds if "min_function_cosine" in m]
    seen = {
        "rounds": len(rounds), "rounds_to_mark": len(rounds) - (not initial_marked), "rounds_marked": len(health),
        "rounds_min_cosine": min(health, default=None),
    }  # fmt: skip
    with Registry.open(out / "registry") as reg:
        base = reg.base()
        recorded = None if base is None else function_mark_of(reg, base.digest)
        names = sorted(p.stem for p in (out / "customers").glob("*.safetensors"))
        if recorded is None or base is None or not names:
            return {**seen, "final_copies": len(names), "final_marked": 0, "final_min_cosine": None}
        fm, _, info = recorded
        x = data.heldout(info["data"]).x
        view = features_and_logits(models.from_spec(info["model"], reg.base_model(base) or {}), x)
        cosines = [
            fm.health(view, models.from_spec(info["model"], load_state_dict(out / "customers" / f"{n}.safetensors")),
                      reg.customer(n, create=False).bits, x)
            for n in names
        ]  # fmt: skip
    marked = sum(c > MARKED for c in cosines)
    return {**seen, "final_copies": len(names), "final_marked": marked, "final_min_cosine": round(min(cosines), 4)}


MARKED = 0.7  # a health above this: the copy carries its function mark (the smoke test's bound, and why)


def client_masking_seconds(cfg: SimConfig, size: int, reps: int = 5) -> float:
    """One client's encoding and masking of an update of ``size`` values in a round of ``cfg.train.per_round``
    clients after the first (the words ``round_bits`` gives then), keys agreed: the median of ``reps``."""
    from securemark.secagg import protocol as P
    from securemark.secagg.driver import Session
    from securemark.secagg.quantize import QuantConfig, encode
    from securemark.secagg.ranges import round_bits

    n, max_weight = cfg.train.per_round, 1 << 16
    rng = np.random.default_rng(0)
    graph, threshold = P.neighbour_graph(tuple(range(1, n + 1)), cfg.secagg.graph, rng)
    bits = round_bits(cfg.secagg.bits, n, max_weight, summed=True)
    qcfg = QuantConfig.of_parts(((size, cfg.secagg.clip),), bits, max_weight, n)
    session = Session("bench")
    for i in graph:  # keys once per session, not timed
        session.join(i)
    update = rng.normal(0.0, 0.01, size)
    seconds = []
    for r in range(1, reps + 1):
        rc = P.RoundConfig("bench", r, graph, threshold, qcfg.size + qcfg.extra, qcfg.modulus_bits, qcfg.digest())
        start = time.perf_counter()
        P.client_masked_input(session.nodes[1], rc, session.server.for_client(rc, 1), encode(update, 100, qcfg, rng))
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def run_order(repeats: int) -> list[str]:
    """The variants' runs: in order, then reversed, and so on, ``repeats`` runs each."""
    return [v for k in range(repeats) for v in (VARIANTS if k % 2 == 0 else VARIANTS[::-1])]


def bench_rounds(clients: int, params: int, rounds: int, seed: int = 0, repeats: int = 2) -> dict[str, Any]:
    if rounds < 2:
        raise InputError("bench rounds needs >= 2 rounds: the first (warm-up) is not counted")
    if repeats < 1:
        raise InputError("bench rounds needs >= 1 repeat")
    cfg = bench_config(clients, params, rounds, seed)
    per_round: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    by_round: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="securemark-bench-") as tmp:
        for k, variant in enumerate(run_order(repeats)):
            seconds, stages_of = run_variant(cfg, variant, Path(tmp) / str(k))
            per_round[variant].append(seconds)
            by_round[variant] += stages_of[1:]
        first = Path(tmp) / str(run_order(repeats).index("securemark")) / "securemark"
        marks = function_marks(first, cfg.fingerprint.function_initial)
    stages = {v: median_stages(s) for v, s in by_round.items() if s}
    med = {v: statistics.median(s for run in runs for s in run[1:]) for v, runs in per_round.items()}
    n_params = sum(p.numel() for p in models.build("mlp", (1, 28, 28), 10, width=cfg.model.width).parameters())
    masking = client_masking_seconds(cfg, n_params)
    cores = max(1, min(clients, os.cpu_count() or 1))
    return {
        "clients": clients,
        "params": n_params,
        "rounds": rounds,
        "repeats": repeats,
        "plain_seconds": med["plain"],
        "securemark_seconds": med["securemark"],
        "malicious_seconds": med["malicious"],
        "flower_secaggplus_seconds": med["flower_secaggplus"],
        "securemark_over_plain": med["securemark"] / med["plain"],
        "malicious_over_plain": med["malicious"] / med["plain"],
        "flower_secaggplus_over_plain": med["flower_secaggplus"] / med["plain"],
        "securemark_over_flower_secaggplus": med["securemark"] / med["flower_secaggplus"],
        "function_mark": {"features": cfg.model.width, **marks},
        "stage_seconds": stages,  # the median of each stage over the rounds counted
        # what masking costs whatever the code: each client encodes and masks its update (clients / cores of
        # them one after another), and the unmask exchange waits on Flower's engine
        "client_masking_seconds": masking,
        "masking_compute_seconds": clients * masking / cores,
        "per_round_seconds": per_round,  # each variant's runs in the order they ran
    }
