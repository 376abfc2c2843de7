"""The evaluation loop: for every scheme, attack pipeline and coalition size, run independent trials (draw a
coalition, attack its copies, trace the result) and summarize each cell.

Randomness is paired across schemes: trial t of (attack, c) draws its coalition and its attack's randomness
from ``default_rng([seed, attack, c, t])``, so every scheme faces the same coalitions (by index) and the same
fine-tuning batches. Owner secrets come from ``os.urandom`` as always (Registry.init); they are not seeded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from securemark import data, models
from securemark.attacks import pipeline
from securemark.config import ConfigError, SimConfig, check_ray_option, shown
from securemark.errors import InputError
from securemark.evaluation.config import EvalConfig
from securemark.evaluation.schemes import Scheme, SharedScheme, make_scheme, scheme_customers
from securemark.evaluation.stats import summarize
from securemark.evaluation.trials import Runner, SerialRunner, Setting
from securemark.modelio import load_state_dict


def load_source(cfg: EvalConfig, console: Console) -> tuple[SimConfig | None, Setting]:
    """The base model of a finished simulate run (trained first from ``source.config`` when missing), or of
    a run a user's app made (no simulate config: :func:`app_setting`, with None for the config)."""
    run = Path(cfg.source.run)
    if not (run / "global.safetensors").is_file():
        if not cfg.source.config:
            raise FileNotFoundError(
                f"{run} holds no finished run (global.safetensors); run 'securemark simulate' first or set "
                "source.config to train it here"
            )
        from securemark.sim import simulate  # imports flwr and ray: only when training

        console.print(f"training the base model with {cfg.source.config} -> {run}")
        simulate(SimConfig.load(cfg.source.config, list(cfg.source.overrides)), run)
    if not (run / "config.toml").is_file():
        return None, app_setting(run, cfg.source.data, cfg.evaluate.seed)
    sim = SimConfig.load(run / "config.toml")
    pool, test = data.server_split(sim.data, sim.train.seed)
    shape = tuple(test.x.shape[1:])

    def fresh() -> torch.nn.Module:
        return models.build(sim.model.name, shape, test.classes, width=sim.model.width)  # type: ignore[arg-type]

    return sim, Setting(load_state_dict(run / "global.safetensors"), pool, test, fresh)


def app_setting(run: Path, held_out: str, seed: int) -> Setting:
    """A run a user's own Flower app made with ``SecureMark(..., model=, example_input=)``: the model rebuilt from
    the architecture its registry records (imported from the working directory or PYTHONPATH, as ``--arch``),
    the held-out data from ``held_out`` (an .npz of x and y), split in halves: the pirate's pool, the test set."""
    from securemark.fingerprint.arch import Arch
    from securemark.registry import Registry

    with Registry.open(run / "registry") as reg:
        record = reg.arch()
    if record is None:
        raise InputError(f"{run} holds no simulate config and its registry no architecture: the app that made it "
                         "must pass SecureMark(..., model=Net(), example_input=(1, C, H, W))")  # fmt: skip
    if not held_out:
        raise InputError(f"{run} was made by an app (no config.toml): give its held-out data as --data x.npz "
                         "(arrays x: N,C,H,W and y: labels) or source.data")  # fmt: skip
    arch = Arch(str(record["target"]), dict(record.get("kwargs", {})), tuple(record.get("example", ())))
    pool, test = data.load_labelled(held_out).split(0.5, seed)
    return Setting(load_state_dict(run / "global.safetensors"), pool, test, arch.build)


@contextmanager
def _runner(ray_address: str | None, cfg: EvalConfig) -> Iterator[Runner]:
    """Trials in this process, or as Ray tasks (the actors start at once: their start, importing torch,
    overlaps the loading of the source and the building of the first scheme)."""
    if ray_address is None:
        yield SerialRunner(cfg)
        return
    from securemark.flower.ray_trials import ray_runner  # imports ray: only when asked for

    with ray_runner(ray_address, cfg) as run:
        yield run


def fidelity(scheme: Scheme, s: Setting, copies: int, rng: np.random.Generator) -> dict[str, Any]:
    """Accuracy of a random sample of customers' copies against the global model's."""
    picked = rng.choice(scheme.customers, size=min(copies, scheme.customers), replace=False)
    acc = [s.accuracy(scheme.copy(int(j))) for j in picked]
    return {
        "global_accuracy": s.global_accuracy,
        "copies": len(acc),
        "copies_mean_accuracy": float(np.mean(acc)),
        "copies_min_accuracy": float(np.min(acc)),
        "copies_max_accuracy": float(np.max(acc)),
        "drop_pp": 100.0 * (s.global_accuracy - float(np.mean(acc))),
    }


def fidelity_sweep(
    scheme: SharedScheme, cfg: EvalConfig, s: Setting, advance: Callable[[], None]
) -> list[dict[str, Any]]:
    """Per budget: copy accuracy and, when ``fidelity.attack`` is set, the single traitor's score after it.

    The Tardos score is normalized by ||y||, so reading at the registry's strength is exact for any budget.
    """
    f = cfg.fidelity
    steps = pipeline.parse(f.attack) if f.attack else []
    rows = []
    for b_index, budget in enumerate(f.budgets):
        strength = scheme.fp.strength_for_budget(s.base, budget)
        rng = np.random.default_rng([cfg.evaluate.seed, 10_000, b_index])
        acc, scores, agreement, caught, innocents = [], [], [], 0, 0
        for j in rng.choice(scheme.customers, size=min(f.copies, scheme.customers), replace=False):
            copy = scheme.copy(int(j), strength)
            acc.append(s.accuracy(copy))
            if steps:
                attacker = pipeline.Attacker(s.fresh, s.pool, rng, length=cfg.code.length, budget=budget)
                outcome = scheme.trace(pipeline.run([copy], steps, attacker)[0])
                scores.append(float(outcome.scores[j]))
                agreement.append(scheme.survival(outcome, np.array([j]))[0])
                caught += int(j in outcome.accused)
                innocents += int(np.sum(outcome.accused != j))
            advance()
        rows.append({
            "budget": budget, "strength": strength, "copies": len(acc),
            "copies_mean_accuracy": float(np.mean(acc)), "copies_min_accuracy": float(np.min(acc)),
            "drop_pp": 100.0 * (s.global_accuracy - float(np.mean(acc))),
            "traitor_score": float(np.mean(scores)) if scores else None,
            "bit_agreement": float(np.mean(agreement)) if agreement else None,
            "catch_rate": caught / len(acc) if steps else None, "innocents_accused": innocents if steps else None,
        })  # fmt: skip
    return rows


@contextmanager
def _progress(console: Console, total: int) -> Iterator[tuple[Progress, Any]]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=False) as bar:
        yield bar, bar.add_task("evaluate", total=total)


def plan(cfg: EvalConfig) -> list[tuple[str, str, int]]:
    """The cells to run, (scheme, attack, coalition size), in order.

    A pipeline that starts with ``collude`` is a coalition's attack and runs for c >= 2; one without is a
    single copy's and runs for c <= 1 (c = 0: the unmarked base, a control). The rest are not cells: a
    collusion of one copy would only repeat the laundering that follows it. BIBD serves q^2 + q + 1
    customers, so larger coalitions than that are left out too.
    """
    cells = []
    for name in cfg.evaluate.schemes:
        customers = scheme_customers(name, cfg)
        for attack, spec in cfg.attacks.items():
            colludes = pipeline.parse(spec)[0].name == "collude"
            for size in cfg.evaluate.coalition_sizes:
                if (size >= 2) == colludes and size <= customers:
                    cells.append((name, attack, size))
    return cells


def evaluate(
    cfg: EvalConfig, out: Path, console: Console | None = None, ray_address: str | None = None
) -> dict[str, Any]:
    """Run every cell of ``cfg``; write results.json, results.csv, trials.jsonl, report.md and plots to ``out``.

    Trials run in this process, or with ``ray_address`` as Ray tasks (``local``, ``auto``, ``ray://host:port``;
    see securemark.flower.ray_trials): the records are the same either way, trial by trial."""
    try:
        return _evaluate(cfg, Path(out), console or Console(stderr=True), ray_address)
    finally:
        if ray_address is not None:  # Ray actors started ahead (the CLI) that no runner took over
            from securemark.flower.ray_trials import release_prestarted

            release_prestarted()


def _evaluate(cfg: EvalConfig, out: Path, console: Console, ray_address: str | None) -> dict[str, Any]:
    from securemark.evaluation.outputs import write_outputs  # matplotlib: only once there is something to plot

    if (out / "results.json").exists():
        raise FileExistsError(f"{out} already holds an evaluation; choose another --out")
    if ray_address is not None:
        check_ray_option(ray_address)
    to_run = plan(cfg)
    if not to_run and not cfg.blackbox.trials:
        raise ConfigError("no cell to run: collude pipelines need coalition sizes >= 2, the others sizes 0 or 1")
    start = time.perf_counter()
    # before anything is written: a missing source leaves no stray output; one that must be trained first is
    # trained before the runner starts (training runs Ray itself, and shuts it down when done)
    loaded = None
    if not (Path(cfg.source.run) / "global.safetensors").is_file():
        if ray_address is not None:
            from securemark.flower.ray_trials import release_prestarted

            release_prestarted()
        loaded = load_source(cfg, console)
    with _runner(ray_address, cfg) as run:
        sim, s = loaded or load_source(cfg, console)
        setup = black_box_setup(cfg, sim, s) if cfg.blackbox.trials else None  # checked before any cell runs
        run.share(s)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(cfg.to_toml(out))
        cells, fid, sweep = _run_schemes(cfg, s, out, run, console) if to_run else ([], {}, [])
    results: dict[str, Any] = {
        "source": _source_record(cfg, sim),
        "global_accuracy": s.global_accuracy,
        "fidelity": fid,
        "fidelity_sweep": sweep,
        "cells": cells,
    }
    if setup is not None:
        if cells:  # kept if the black-box cells fail
            results["seconds"] = round(time.perf_counter() - start, 1)
            write_outputs(out, cfg, _finite(results))
        results["blackbox"] = black_box_cells(cfg, setup, console)
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_outputs(out, cfg, _finite(results))
    return results


def _run_schemes(
    cfg: EvalConfig, s: Setting, out: Path, run: Runner, console: Console
) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """Every scheme's trials, fidelity and (for the first Tardos or random scheme) the fidelity sweep: the
    cells, the fidelity per scheme, the sweep. Each trial is logged to ``out/trials.jsonl`` as it ends."""
    e, f, to_run = cfg.evaluate, cfg.fidelity, plan(cfg)
    sweep_scheme = next((n for n in e.schemes if n in ("tardos", "random")), None) if f.budgets else None
    swept = len(f.budgets) * min(f.copies, scheme_customers(sweep_scheme, cfg)) if sweep_scheme else 0
    total = len(to_run) * e.trials + swept
    cells: list[dict[str, Any]] = []
    fid: dict[str, Any] = {}
    sweep: list[dict[str, Any]] = []
    got: dict[tuple[str, str, int, int], dict[str, Any]] = {}
    schemes: list[tuple[Scheme, list[tuple[str, int]]]] = []  # each with its (attack, coalition size) cells
    with (out / "trials.jsonl").open("w") as log, _progress(console, total) as (bar, task):

        def done(record: dict[str, Any]) -> None:
            log.write(json.dumps(_finite(record)) + "\n")
            got[(record["scheme"], record["attack"], record["coalition_size"], record["trial"])] = record
            bar.update(
                task, advance=1, description=f"{record['scheme']} {record['attack']} c={record['coalition_size']}"
            )

        try:
            for name in e.schemes:  # on Ray, a scheme's trials run while the next scheme is built here
                bar.update(task, description=f"{name}: issuing {scheme_customers(name, cfg)} customers")
                scheme = make_scheme(name, cfg, s.base, out / "registries", s.arch)
                here = [(attack, size) for n, attack, size in to_run if n == name]
                schemes.append((scheme, here))
                fid[name] = fidelity(scheme, s, f.copies, np.random.default_rng([e.seed, 20_000]))
                run.submit(scheme, [(attack, size, t) for attack, size in here for t in range(e.trials)], done)
                if name == sweep_scheme:
                    bar.update(task, description=f"{name}: fidelity sweep")
                    assert isinstance(scheme, SharedScheme)
                    sweep = fidelity_sweep(scheme, cfg, s, lambda: bar.advance(task))
            run.wait(done)
            for scheme, here in schemes:
                cells += [_cell(scheme.name, a, cfg, scheme, [got[(scheme.name, a, c, t)] for t in range(e.trials)])
                          for a, c in here]  # fmt: skip
        finally:
            for scheme, _ in schemes:
                scheme.close()
    return cells, fid, sweep


def black_box_setup(cfg: EvalConfig, sim: SimConfig | None, s: Setting) -> Any:
    """What the black-box cells run on (evaluation.blackbox.Setup): the run's global model, the training pool
    (the pirates' data) and the server's held-out share (the tracer's queries), checked against
    ``blackbox.queries`` before any cell runs. A run of a user's app has no black-box cells yet (the function
    mark is fitted to models securemark can rebuild by name): refused, not skipped."""
    if sim is None:
        raise InputError("black-box cells need a securemark simulate run; set blackbox.trials = 0 for an app's run")
    from securemark.evaluation import blackbox
    from securemark.fingerprint.function import Basis
    from securemark.tracing.blackbox import SHIFTS

    b = cfg.blackbox
    shape = tuple(int(d) for d in s.test.x.shape[1:])
    spec = models.spec_of(sim.model.name, shape, s.test.classes, sim.model.width)  # type: ignore[arg-type]
    model = models.from_spec(spec, s.base)
    most = len(SHIFTS) * len(s.test)
    least = 2 * (Basis.fit(model, s.test.x).directions.shape[1] + 1)  # FunctionMark.min_queries
    if not least <= b.queries <= most:
        raise ConfigError(f"blackbox.queries = {b.queries}: this run's held-out share ({len(s.test)} inputs) "
                         f"serves {least}..{most} queries")  # fmt: skip
    return blackbox.Setup(model, spec, s.pool, s.test, data.heldout_record(sim.data, sim.train.seed))


def black_box_cells(cfg: EvalConfig, setup: Any, console: Console) -> dict[str, Any]:
    """The black-box cells (evaluation.blackbox), in this process, with the config's code and carrier."""
    from securemark.evaluation import blackbox

    b, e, c = cfg.blackbox, cfg.evaluate, cfg.code
    console.print(f"black-box cells: {len(b.students)} students x {len(b.coalition_sizes) + 1} sizes x {b.trials}")
    white_box = {"budget": c.budget, "carrier_mode": c.carrier_mode, "include": c.include}
    return blackbox.run(
        setup, customers=e.customers, trials=b.trials, copies=b.copies, colluders=b.coalition_sizes,
        students=b.student_cells(), budget=b.budget, epochs=b.epochs, queries=b.queries, seed=e.seed,
        triggers=b.triggers, tail=b.tail, length=c.length, max_colluders=c.max_colluders, eps=c.eps,
        white_box=white_box,
    )  # fmt: skip


def _cell(scheme_name: str, attack: str, cfg: EvalConfig, scheme: Scheme, trials: list[dict]) -> dict[str, Any]:
    is_shared = isinstance(scheme, SharedScheme)
    return {
        "scheme": scheme_name,
        "code": scheme_name if is_shared else "random",  # the baseline's fingerprints are random bits
        "tracer": "shared-projection score" if is_shared else "per-customer projection argmax",
        "attack": attack,
        "pipeline": cfg.attacks[attack],
        "coalition_size": trials[0]["coalition_size"],
        "customers": scheme.customers,
        "length": scheme.length,
        "max_colluders": cfg.code.max_colluders,
        "eps": cfg.code.eps if is_shared else None,
        "budget": cfg.code.budget,
        **summarize(trials),
    }


def _finite(obj: Any) -> Any:
    """NaN -> None throughout, so results are strict JSON."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _source_record(cfg: EvalConfig, sim: SimConfig | None) -> dict[str, str]:
    if sim is not None:
        return {"run": shown(cfg.source.run), "data": sim.data.name, "model": sim.model.name}
    return {"run": shown(cfg.source.run), "data": shown(cfg.source.data), "model": "the app's registered architecture"}
