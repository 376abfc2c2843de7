"""Black-box cells: the function mark measured end to end, for ``securemark bench blackbox`` (the MNIST-5k
quickstart CNN trained centrally) and ``securemark evaluate`` (a finished run's global model).

One registry of n customers (Tardos), copies carrying both marks, then: fidelity of the copies; intact copies
traced through a real HTTP V2 endpoint; students distilled from one leaker or from a coalition's averaged
outputs (soft labels at each temperature, hard labels; the same CNN and an MLP), traced through TorchScript
files; students of the unmarked model as controls. Every innocent score of every trial is kept against the
threshold certified for its observation: the empirical innocent tail, which the ``tail`` stage extends with
suspects that are innocent of everyone but one (independently trained models, other customers' intact copies,
students of other customers' copies).
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass
class Cell:
    name: str
    trials: int = 0
    caught: int = 0  # trials where at least one pirate was accused
    innocents_accused: int = 0  # over all trials
    student_accuracy: list[float] = field(default_factory=list)
    leader_over_threshold: list[float] = field(default_factory=list)  # best pirate's score / threshold

    guilty_trials: int = 0  # trials with a pirate to catch (0 for controls)

    def add(self, report: TraceReport, pirates: list[str], accuracy: float | None, best: float) -> None:
        accused = {s.customer for s in report.accused}
        self.trials += 1
        self.guilty_trials += bool(pirates)
        self.caught += bool(accused & set(pirates))
        self.innocents_accused += len(accused - set(pirates))
        if accuracy is not None:
            self.student_accuracy.append(accuracy)
        if pirates and np.isfinite(report.threshold):
            self.leader_over_threshold.append(best / report.threshold)

    def row(self) -> dict[str, object]:
        out = asdict(self)
        out["catch"] = self.caught / self.guilty_trials if self.guilty_trials else None
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

    guilty_trials: int = 0  # trials with a pirate to catch (0 for controls)

    def add(self, v: triggers.TriggerVerdict, pirates: list[int], accuracy: float | None) -> None:
        accused = set(v.accused.tolist())
        self.trials += 1
        self.guilty_trials += bool(pirates)
        self.caught_binomial += bool(accused & set(pirates))
        self.innocents_accused += len(accused - set(pirates))
        self.argmax_names_a_pirate += v.argmax in pirates
        if accuracy is not None:
            self.suspect_accuracy.append(accuracy)

    def row(self) -> dict[str, object]:
        out = asdict(self)
        guilty = self.guilty_trials
        out["catch"] = self.caught_binomial / guilty if guilty else None
        out["argmax_names_a_pirate"] = self.argmax_names_a_pirate if guilty else None
        out["suspect_accuracy"] = float(np.mean(self.suspect_accuracy)) if self.suspect_accuracy else None
        return out


Student = tuple[str, float, bool]  # (architecture, temperature, hard labels)


def students_of(archs: tuple[str, ...], temperatures: tuple[float, ...], hard: bool) -> list[Student]:
    return [(a, t, False) for a in archs for t in temperatures] + ([(a, 1.0, True) for a in archs] if hard else [])


@dataclass
class Setup:
    """What the cells share: the unmarked model, its spec (models.spec_of), the pirate's unlabeled pool (its
    labels are used only to train the tail's independent models), the owner's held-out data and its record."""

    model: torch.nn.Module
    spec: dict[str, object]
    pool: data.Dataset
    held: data.Dataset
    record: dict[str, object]

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = (int(d) for d in self.held.x.shape[1:])
        return c, h, w

    def module(self, sd: dict) -> torch.nn.Module:
        return models.from_spec(self.spec, sd)

    def fresh(self, arch: str, seed: int) -> torch.nn.Module:
        return models.build(arch, self.shape, self.held.classes, seed=seed)


@dataclass
class Tail:
    """Innocent scores against their certified thresholds, by kind of suspect."""

    scores: int = 0
    over_threshold: int = 0
    max_over_threshold: float = 0.0
    by_suspect: dict[str, list[int]] = field(default_factory=dict)  # kind -> [suspects, innocent scores]

    def add(self, kind: str, scores: np.ndarray, threshold: float, innocent: np.ndarray) -> None:
        ratio = scores[innocent] / threshold
        self.scores += int(innocent.sum())
        self.over_threshold += int(np.sum(ratio > 1))
        self.max_over_threshold = max(self.max_over_threshold, float(ratio.max()))
        counts = self.by_suspect.setdefault(kind, [0, 0])
        counts[0] += 1
        counts[1] += int(innocent.sum())


class Noisy(torch.nn.Module):
    """A model whose every answer carries fresh Gaussian noise of standard deviation ``sigma`` on its logits.
    It is served as TorchScript, in a child process of its own: the noise comes from that process's torch
    generator (a module cannot carry a torch.Generator through torch.jit.save)."""

    def __init__(self, inner: torch.nn.Module, sigma: float) -> None:
        super().__init__()
        self.inner, self.sigma = inner, float(sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.inner(x)
        return z + self.sigma * torch.randn_like(z)


def _agreement(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x).argmax(1) == b(x).argmax(1)).float().mean())


def _scripted(model: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(model.eval()), str(path))
    return path


def run(
    setup: Setup, *, customers: int = 1000, trials: int = 2, copies: int = 10, colluders: tuple[int, ...] = (1, 2, 4),
    students: list[Student] | None = None, budget: float = 0.03, epochs: int = 20, queries: int = 10_000,
    seed: int = 0, triggers: int = 10, tail: int = 0, length: int = 1024, max_colluders: int = 4, eps: float = 1e-3,
    white_box: dict[str, Any] | None = None, noise: tuple[float, ...] = (),
) -> dict[str, object]:  # fmt: skip
    """Every cell on ``setup``; ``tail`` adds that many suspects of each innocent kind to the tail;
    ``white_box``: the white-box mark's registry parameters (budget, carrier_mode, include); ``noise``: for
    each standard deviation, intact copies served with fresh Gaussian noise on every logit (the cell's
    student_accuracy is then what the pirate's users get: top-1 of the noisy answers)."""
    students = students_of(("cnn", "mlp"), (1.0, 4.0), True) if students is None else students
    rng = np.random.default_rng(seed)
    model, pool, held = setup.model, setup.pool, setup.held
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cpu = torch.device("cpu")
    base_acc = training.accuracy(model, held, cpu)
    scratch = tempfile.TemporaryDirectory(prefix="securemark-bb-")  # the throwaway registry and its owner key:
    work = Path(scratch.name)  # removed at the end, or when an exception drops this frame (weakref finalizer)
    spec = FunctionSpec(setup.spec, held.x, setup.record, budget)
    params = RegistryParams(code="tardos", length=length, max_colluders=max_colluders, eps=eps,
                            exclude=spec.carrier_exclude(), **(white_box or {}))  # fmt: skip
    reg = Registry.init(work / "registry", params)
    fp, wb = establish_base(reg, base_sd)
    fm: tuple[FunctionMark, str] = establish_function_mark(reg, base_sd, spec)
    names = [f"customer-{i:04d}" for i in range(customers)]
    rows = {n: reg.customer(n).bits for n in names}

    def copy(name: str) -> torch.nn.Module:
        return setup.module(mark(fp, wb.strength, fm, base_sd, rows[name]))

    tracer = BlackBoxTracer(reg)
    out: dict[str, object] = {"customers": customers, "code_length": length, "capacity": fm[0].basis.capacity,
                              "budget": budget, "base_accuracy": base_acc, "queries": queries}  # fmt: skip
    cells: dict[str, Cell] = {}
    innocent = Tail()

    def record(cell: str, report: TraceReport, pirates: list[str], acc: float | None, kind: str) -> None:
        v = tracer.scorer.accuse(report.soft_code)
        mask = np.ones(len(v.scores), bool)
        mask[[names.index(p) for p in pirates]] = False
        best = float(np.max(v.scores[~mask])) if pirates else float("nan")
        cells.setdefault(cell, Cell(cell)).add(report, pirates, acc, best)
        innocent.add(kind, v.scores, v.threshold, mask)

    def student_of(teacher_models: list[torch.nn.Module], arch: str, temp: float, is_hard: bool) -> torch.nn.Module:
        student = setup.fresh(arch, int(rng.integers(2**31)))
        distill(ensemble(teacher_models), student, pool, temperature=temp, hard=is_hard, epochs=epochs, rng=rng)
        return student

    def trace_file(suspect: torch.nn.Module) -> TraceReport:
        return tracer.trace(TorchScriptOracle(_scripted(suspect, work / "suspect.pt"), queries), queries)

    total = copies + trials * (1 + len(noise)) + len(students) * trials * (len(colluders) + 1) + 3 * tail
    total += (trials + len(students) * trials * (len(colluders) + 1)) if triggers else 0
    with Progress(transient=True) as bar:
        task = bar.add_task("black-box cells", total=total)
        accs, agrees = [], []
        for name in names[:copies]:  # fidelity: both marks
            issued = copy(name)
            accs.append(training.accuracy(issued, held, cpu))
            agrees.append(_agreement(issued, model, held.x))
            bar.advance(task)
        out["fidelity"] = {"copies": copies, "accuracy_drop_max": base_acc - min(accs),
                           "accuracy_drop_mean": base_acc - float(np.mean(accs)), "agreement_min": min(agrees),
                           "agreement_mean": float(np.mean(agrees))}  # fmt: skip
        for _ in range(trials):  # intact copies through a real HTTP endpoint, 2,000 queries
            leaker = str(rng.choice(names))
            server, url = start("leak", copy(leaker), setup.shape)
            try:
                report = tracer.trace(HttpV2Oracle(url, 2000), 2000)
            finally:
                server.shutdown()
            record("intact, HTTP, 2000 queries", report, [leaker], None, "another customer's copy")
            bar.advance(task)
        for sigma in noise:  # the cheapest laundering: noise on the answers, paid for in the users' accuracy
            for _ in range(trials):
                leaker = str(rng.choice(names))
                served = Noisy(copy(leaker), sigma)
                acc = training.accuracy(served, held, cpu)
                record(f"intact + logit noise, std {sigma:g}", trace_file(served), [leaker], acc,
                       "another customer's copy")  # fmt: skip
                bar.advance(task)
        for arch, temp, is_hard in students:
            label = "hard labels" if is_hard else f"soft T={temp:g}"
            for c in (0, *colluders):  # 0: a student of the unmarked model (control)
                for _ in range(trials):
                    pirates = sorted(rng.choice(names, size=c, replace=False).tolist()) if c else []
                    student = student_of([copy(p) for p in pirates] if c else [model], arch, temp, is_hard)
                    acc = training.accuracy(student, held, cpu)
                    cell = f"{arch} student, {label}, " + (f"c={c}" if c else "control (unmarked teacher)")
                    kind = "student of other customers' copies" if c else "student of the unmarked model"
                    record(cell, trace_file(student), pirates, acc, kind)
                    bar.advance(task)
        for t in range(tail):  # suspects innocent of all but (at most) one customer
            arch = ("cnn", "mlp")[t % 2]
            own = setup.fresh(arch, int(rng.integers(2**31)))
            training.train(own, pool, epochs=4, lr=0.05, generator=torch.Generator().manual_seed(t), device=cpu)
            record("tail: independently trained model", trace_file(own), [], None, "independently trained model")
            leaker = str(rng.choice(names))
            record("tail: intact copy", trace_file(copy(leaker)), [leaker], None, "another customer's copy")
            leaker = str(rng.choice(names))
            temp = float(rng.uniform(1.0, 4.0))
            cell = f"tail: {arch} student of one copy, soft T in [1, 4]"
            record(cell, trace_file(student_of([copy(leaker)], arch, temp, False)), [leaker], None,
                   "student of other customers' copies")  # fmt: skip
            bar.advance(task, 3)
        if triggers:
            out["trigger_baseline"] = _trigger_baseline(
                reg, base_sd, setup, names, students, colluders, trials, triggers, epochs, rng, work, bar
            )
    reg.close()
    scratch.cleanup()
    out["cells"] = [cells[k].row() for k in cells]
    out["innocent_tail"] = {**asdict(innocent), "eps_per_customer": eps / customers}
    return out


def _trigger_baseline(
    reg: Registry, base_sd: dict, setup: Setup, names: list[str], students: list[Student], colluders: tuple[int, ...],
    trials: int, m: int, epochs: int, rng: np.random.Generator, work: Path, bar: Progress,
) -> list[dict[str, object]]:  # fmt: skip
    """The seeds' baseline in the same cells: copies fine-tuned on their customer's trigger set, students
    distilled from them, every customer's keys queried (n * m queries), binomial and argmax verdicts."""
    classes = setup.held.classes
    keys = [triggers.keys(reg.secret, i, m, setup.shape, classes) for i in range(len(names))]
    kx = np.concatenate([k[0] for k in keys])
    labels = np.stack([k[1] for k in keys])
    eps = reg.params.eps
    task = bar.task_ids[0]
    rows: dict[str, TriggerCell] = {}
    cpu = torch.device("cpu")

    def marked(i: int) -> torch.nn.Module:
        return setup.module(triggers.embed(setup.module(base_sd).train(), keys[i], setup.pool, rng=rng))

    def trace(suspect: torch.nn.Module, pirates: list[int], cell: str, student_acc: float | None) -> None:
        oracle = TorchScriptOracle(_scripted(suspect, work / "trigger-suspect.pt"), len(kx))
        answers = oracle(kx).argmax(axis=1).reshape(labels.shape)
        v = triggers.verdict(answers, labels, classes, eps)
        rows.setdefault(cell, TriggerCell(cell, queries=len(kx))).add(v, pirates, student_acc)
        bar.advance(task)

    for _ in range(trials):
        leaker = int(rng.integers(len(names)))
        copy = marked(leaker)
        trace(copy, [leaker], "trigger-set: intact copy", training.accuracy(copy, setup.held, cpu))
    for arch, temp, is_hard in students:
        label = "hard labels" if is_hard else f"soft T={temp:g}"
        for c in (0, *colluders):
            for _ in range(trials):
                pirates = sorted(rng.choice(len(names), size=c, replace=False).tolist()) if c else []
                teacher = ensemble([marked(p) for p in pirates] if c else [setup.model])
                student = setup.fresh(arch, int(rng.integers(2**31)))
                distill(teacher, student, setup.pool, temperature=temp, hard=is_hard, epochs=epochs, rng=rng)
                cell = f"trigger-set: {arch} student, {label}, " + (f"c={c}" if c else "control")
                trace(student, pirates, cell, training.accuracy(student, setup.held, cpu))
    return [row.row() for row in rows.values()]
