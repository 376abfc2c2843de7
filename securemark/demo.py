"""The owner workflow end to end on real data (scikit-learn digits, offline, about a minute on 2 cores):
train a small CNN, issue 50 fingerprinted copies, let 4 customers collude by averaging and prune 30%, trace.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from securemark import attacks, data, models, training
from securemark.modelio import save_state_dict
from securemark.owner import issue_copies
from securemark.registry import Registry, RegistryParams
from securemark.tracing.tracer import TraceReport, trace


@dataclass(frozen=True)
class DemoResult:
    base_accuracy: float
    copies_mean_accuracy: float
    leaked_accuracy: float
    coalition: list[str]
    report: TraceReport
    unmarked_report: TraceReport


def _train(seed: int, train_set: data.Dataset, epochs: int) -> torch.nn.Module:
    model = models.build("cnn", tuple(train_set.x.shape[1:]), train_set.classes, seed=seed)  # type: ignore[arg-type]
    training.train(
        model, train_set, epochs=epochs, generator=torch.Generator().manual_seed(seed), device=torch.device("cpu")
    )
    return model


def run_demo(
    out: Path,
    *,
    customers: int = 50,
    colluders: int = 4,
    prune_ratio: float = 0.3,
    seed: int = 0,
    epochs: int = 8,
    console: Console | None = None,
) -> DemoResult:
    console = console or Console()
    rng = np.random.default_rng(seed)
    train_set, test_set = data.load_digits(seed).split(0.25, seed)
    console.print(f"[bold]1.[/] training a small CNN on {len(train_set)} real 8x8 digits")
    model = _train(seed, train_set, epochs)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_acc = training.accuracy(model, test_set, torch.device("cpu"))

    console.print(f"[bold]2.[/] registry at {out / 'registry'}; issuing {customers} fingerprinted copies")
    registry = Registry.init(out / "registry", RegistryParams(code="tardos", length=2048, max_colluders=5, eps=1e-3))
    names = [f"customer-{i:03d}" for i in range(customers)]
    copies = issue_copies(registry, base, names)
    accs = [training.accuracy_of(model, copies[n], test_set) for n in names]

    coalition = sorted(rng.choice(names, size=colluders, replace=False).tolist())
    console.print(f"[bold]3.[/] {', '.join(coalition)} average their copies and prune {prune_ratio:.0%} of the weights")
    merged, _ = attacks.collude([copies[n] for n in coalition], "average", rng)
    leaked, _ = attacks.prune(merged, prune_ratio)
    save_state_dict(leaked, out / "leaked.safetensors")
    leaked_acc = training.accuracy_of(model, leaked, test_set)

    console.print("[bold]4.[/] tracing the leaked model, and a model trained independently (unmarked)")
    report = trace(leaked, registry)
    unmarked = _train(seed + 1, train_set, epochs).state_dict()
    unmarked_report = trace(unmarked, registry)
    registry.close()
    return DemoResult(base_acc, float(np.mean(accs)), leaked_acc, coalition, report, unmarked_report)


def print_result(res: DemoResult, console: Console) -> None:
    table = Table(title="Top suspects of the leaked model")
    for col in ("customer", "score", "p-value", "accused", "colluder"):
        table.add_column(col)
    accused = {s.customer for s in res.report.accused}
    for s in res.report.scores_top[:8]:
        table.add_row(
            s.customer,
            f"{s.score:.2f}",
            f"{s.p_value:.1e}",
            "yes" if s.customer in accused else "",
            "yes" if s.customer in res.coalition else "",
        )
    console.print(table)
    console.print(
        f"certified threshold {res.report.threshold:.2f} (eps = {res.report.eps}: P(any innocent accused) <= eps)\n"
        f"accuracy: base {res.base_accuracy:.3f}, fingerprinted copies {res.copies_mean_accuracy:.3f} (mean), "
        f"leaked {res.leaked_accuracy:.3f}\n"
        f"unmarked model: {len(res.unmarked_report.accused)} accused"
    )
    names = ", ".join(s.customer for s in res.report.accused) or "nobody"
    innocent = [s.customer for s in res.report.accused if s.customer not in res.coalition]
    console.print(f"[bold]Leaked by: {names}[/]" + (f"  [red](innocents: {innocent})[/]" if innocent else ""))


def main(out: str | None = None, seed: int = 0) -> DemoResult:
    console = Console()
    directory = Path(out) if out else Path(tempfile.mkdtemp(prefix="securemark-demo-"))
    res = run_demo(directory, seed=seed, console=console)
    print_result(res, console)
    return res
