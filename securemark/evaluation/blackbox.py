"""``securemark bench blackbox``: the function mark measured end to end on the MNIST-5k quickstart model.

One registry of n customers (Tardos, the quickstart's code), copies carrying both marks, then:
fidelity of the copies; intact copies traced through a real HTTP V2 endpoint; students distilled from one
leaker or from a coalition's averaged outputs (soft labels at each temperature, hard labels; the same CNN
and an MLP), traced through TorchScript files; students of the unmarked model as controls. Every innocent
score of every trial is kept against the threshold certified for its observation: the empirical innocent tail.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from securemark import data, models, training
from securemark.attacks.distillation import distill, ensemble
from securemark.fingerprint import triggers
from securemark.fingerprint.function import FunctionMark
from securemark.owner import FunctionSpec, establish_base, establish_function_mark, mark
from securemark.registry import Registry, RegistryParams
from securemark.tracing.blackbox import BlackBoxTracer
from securemark.tracing.oracle import HttpV2Oracle, TorchScriptOracle
from securemark.tracing.serve import start
from securemark.tracing.tracer import TraceReport

SHAPE = (1, 28, 28)


@dataclass
class Cell:
    name: str
    trials: int = 0
    caught: int = 0  # trials where at least one pirate was accused
    innocents_accused: int = 0  # over all trials
    student_accuracy: list[float] = field(default_factory=list)
    leader_over_threshold: list[float] = field(default_factory=list)  # best pirate's score / threshold

    def add(self, report: TraceReport, pirates: list[str], accuracy: float | None, best: float) -> None:
        accused = {s.customer for s in report.accused}
        self.trials += 1
        self.caught += bool(accused & set(pirates))
        self.innocents_accused += len(accused - set(pirates))
        if accuracy is not None:
            self.student_accuracy.append(accuracy)
        if pirates and np.isfinite(report.threshold):
            self.leader_over_threshold.append(best / report.threshold)

    def row(self) -> dict[str, object]:
        out = asdict(self)
        out["catch"] = self.caught / self.trials if self.trials else None
        out["student_accuracy"] = float(np.mean(self.student_accuracy)) if self.student_accuracy else None
        lot = [v for v in self.leader_over_threshold if np.isfinite(v)]
        out["leader_over_threshold"] = float(np.median(lot)) if lot else None
        return out


@dataclass
class TriggerCell:
    name: str
    queries: int
    trials: int = 0
    caught_binomial: int = 0  # trials where the binomial test (bound eps) accused a pirate
    innocents_accused: int = 0
    argmax_names_a_pirate: int = 0  # trials where the best match is a pirate (no bound: someone is named)
    suspect_accuracy: list[float] = field(default_factory=list)

    def add(self, v: triggers.TriggerVerdict, pirates: list[int], accuracy: float | None) -> None:
        accused = set(v.accused.tolist())
        self.trials += 1
        self.caught_binomial += bool(accused & set(pirates))
        self.innocents_accused += len(accused - set(pirates))
        self.argmax_names_a_pirate += v.argmax in pirates
        if accuracy is not None:
            self.suspect_accuracy.append(accuracy)

    def row(self) -> dict[str, object]:
        out = asdict(self)
        out["suspect_accuracy"] = float(np.mean(self.suspect_accuracy)) if self.suspect_accuracy else None
        return out


def train_base(pool: data.Dataset, seed: int, epochs: int = 8) -> torch.nn.Module:
    model = models.build("cnn", SHAPE, pool.classes, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    training.train(model, pool, epochs=epochs, lr=0.05, generator=gen, device=torch.device("cpu"))
    return model.eval()


def _module(sd: dict) -> torch.nn.Module:
    return models.load_weights(models.build("cnn", SHAPE, 10), sd).eval()


def _agreement(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x).argmax(1) == b(x).argmax(1)).float().mean())


def run(
    *, customers: int = 1000, trials: int = 2, copies: int = 10, colluders: tuple[int, ...] = (1, 2, 4),
    temperatures: tuple[float, ...] = (1.0, 4.0), hard: bool = True, archs: tuple[str, ...] = ("cnn", "mlp"),
    budget: float = 0.03, epochs: int = 20, queries: int = 10_000, seed: int = 0, base: Path | None = None,
    triggers: int = 10,
) -> dict[str, object]:  # fmt: skip
    rng = np.random.default_rng(seed)
    pool, held = data.load("mnist5k", seed).split(0.2, seed)
    model = _module(torch.load(base, weights_only=True)) if base else train_base(pool, seed)
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_acc = training.accuracy(model, held, torch.device("cpu"))
    work = Path(tempfile.mkdtemp(prefix="securemark-bb-"))
    spec = FunctionSpec(models.spec_of("cnn", SHAPE, 10), held.x,
                        {"name": "mnist5k", "seed": seed, "test_fraction": 0.2, "files": ""}, budget)  # fmt: skip
    params = RegistryParams(code="tardos", length=1024, max_colluders=4, eps=1e-3, exclude=spec.carrier_exclude())
    reg = Registry.init(work / "registry", params)
    fp, wb = establish_base(reg, base_sd)
    fm: tuple[FunctionMark, str] = establish_function_mark(reg, base_sd, spec)
    names = [f"customer-{i:04d}" for i in range(customers)]
    rows = {n: reg.customer(n).bits for n in names}

    def copy(name: str) -> torch.nn.Module:
        return _module(mark(fp, wb.strength, fm, base_sd, rows[name]))

    tracer = BlackBoxTracer(reg)
    out: dict[str, object] = {"customers": customers, "code_length": 1024, "capacity": fm[0].basis.capacity,
                              "budget": budget, "base_accuracy": base_acc, "queries": queries}  # fmt: skip
    cells: dict[str, Cell] = {}
    innocent = {"scores": 0, "over_threshold": 0, "max_over_threshold": 0.0}

    def record(cell: str, report: TraceReport, pirates: list[str], acc: float | None) -> None:
        v = tracer.scorer.accuse(report.soft_code)
        mask = np.ones(len(v.scores), bool)
        mask[[names.index(p) for p in pirates]] = False
        best = float(np.max(v.scores[~mask])) if pirates else float("nan")
        cells.setdefault(cell, Cell(cell)).add(report, pirates, acc, best)
        innocent["scores"] += int(mask.sum())
        innocent["over_threshold"] += int(np.sum(v.scores[mask] > v.threshold))
        worst = float(np.max(v.scores[mask]) / v.threshold)
        innocent["max_over_threshold"] = max(float(innocent["max_over_threshold"]), worst)

    students = [(a, t, False) for a in archs for t in temperatures] + ([(a, 1.0, True) for a in archs] if hard else [])
    total = copies + trials + len(students) * trials * (len(colluders) + 1)
    total += (trials + len(students) * trials * (len(colluders) + 1)) if triggers else 0
    with Progress(transient=True) as bar:
        task = bar.add_task("black-box bench", total=total)
        accs, agrees = [], []
        for name in names[:copies]:  # fidelity: both marks
            issued = copy(name)
            accs.append(training.accuracy(issued, held, torch.device("cpu")))
            agrees.append(_agreement(issued, model, held.x))
            bar.advance(task)
        out["fidelity"] = {"copies": copies, "accuracy_drop_max": base_acc - min(accs),
                           "accuracy_drop_mean": base_acc - float(np.mean(accs)), "agreement_min": min(agrees),
                           "agreement_mean": float(np.mean(agrees))}  # fmt: skip
        for _ in range(trials):  # intact copies through a real HTTP endpoint, 2,000 queries
            leaker = str(rng.choice(names))
            server, url = start("leak", copy(leaker), SHAPE)
            try:
                oracle = HttpV2Oracle(url, 2000)
                record("intact, HTTP, 2000 queries", tracer.trace(oracle, 2000), [leaker], None)
            finally:
                server.shutdown()
            bar.advance(task)
        for arch, temp, is_hard in students:
            label = "hard labels" if is_hard else f"soft T={temp:g}"
            for c in (0, *colluders):  # 0: a student of the unmarked model (control)
                for _ in range(trials):
                    pirates = sorted(rng.choice(names, size=c, replace=False).tolist()) if c else []
                    teacher = ensemble([copy(p) for p in pirates] if c else [model])
                    student = models.build(arch, SHAPE, 10, seed=int(rng.integers(2**31)))
                    distill(teacher, student, pool, temperature=temp, hard=is_hard, epochs=epochs, rng=rng)
                    path = work / "student.pt"
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", DeprecationWarning)
                        torch.jit.save(torch.jit.script(student.eval()), str(path))
                    report = tracer.trace(TorchScriptOracle(path, queries), queries)
                    acc = training.accuracy(student, held, torch.device("cpu"))
                    cell = f"{arch} student, {label}, " + (f"c={c}" if c else "control (unmarked teacher)")
                    record(cell, report, pirates, acc)
                    bar.advance(task)
        if triggers:
            out["trigger_baseline"] = _trigger_baseline(
                reg, base_sd, model, pool, held, names, students, colluders, trials, triggers, epochs, rng, work, bar
            )
    out["cells"] = [cells[k].row() for k in cells]
    out["innocent_tail"] = {**innocent, "eps_per_customer": 1e-3 / customers}
    return out


def _trigger_baseline(
    reg: Registry, base_sd: dict, model: torch.nn.Module, pool: data.Dataset, held: data.Dataset, names: list[str],
    students: list[tuple[str, float, bool]], colluders: tuple[int, ...], trials: int, m: int, epochs: int,
    rng: np.random.Generator, work: Path, bar: Progress,
) -> list[dict[str, object]]:  # fmt: skip
    """The seeds' baseline in the same cells: copies fine-tuned on their customer's trigger set, students
    distilled from them, every customer's keys queried (n * m queries), binomial and argmax verdicts."""
    keys = [triggers.keys(reg.secret, i, m, SHAPE, 10) for i in range(len(names))]
    kx = np.concatenate([k[0] for k in keys])
    labels = np.stack([k[1] for k in keys])
    eps = reg.params.eps
    task = bar.task_ids[0]
    rows: dict[str, TriggerCell] = {}

    def marked(i: int) -> torch.nn.Module:
        sd = triggers.embed(_module(base_sd).train(), keys[i], pool, rng=rng)
        return _module(sd)

    def trace(suspect: torch.nn.Module, pirates: list[int], cell: str, student_acc: float | None) -> None:
        path = work / "trigger-suspect.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(suspect.eval()), str(path))
        oracle = TorchScriptOracle(path, len(kx))
        answers = oracle(kx).argmax(axis=1).reshape(labels.shape)
        v = triggers.verdict(answers, labels, 10, eps)
        rows.setdefault(cell, TriggerCell(cell, queries=len(kx))).add(v, pirates, student_acc)
        bar.advance(task)

    for _ in range(trials):
        leaker = int(rng.integers(len(names)))
        copy = marked(leaker)
        trace(copy, [leaker], "trigger-set: intact copy", training.accuracy(copy, held, torch.device("cpu")))
    for arch, temp, is_hard in students:
        label = "hard labels" if is_hard else f"soft T={temp:g}"
        for c in (0, *colluders):
            for _ in range(trials):
                pirates = sorted(rng.choice(len(names), size=c, replace=False).tolist()) if c else []
                teacher = ensemble([marked(p) for p in pirates] if c else [model])
                student = models.build(arch, SHAPE, 10, seed=int(rng.integers(2**31)))
                distill(teacher, student, pool, temperature=temp, hard=is_hard, epochs=epochs, rng=rng)
                cell = f"trigger-set: {arch} student, {label}, " + (f"c={c}" if c else "control")
                trace(student, pirates, cell, training.accuracy(student, held, torch.device("cpu")))
    return [row.row() for row in rows.values()]


def main(**kw: object) -> dict[str, object]:
    start_time = time.perf_counter()
    result = run(**kw)  # type: ignore[arg-type]
    result["seconds"] = round(time.perf_counter() - start_time, 1)
    return result
