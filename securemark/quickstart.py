"""The quickstart demo (`securemark demo`): a fingerprinted, masked federation on real MNIST digits; then one
customer leaks its copy after laundering it (fine-tuning on its own data, pruning, int8 quantization) and the
tracer names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from securemark import data, models, training
from securemark.attacks import pipeline
from securemark.config import ConfigError, SimConfig
from securemark.modelio import load_state_dict, save_state_dict
from securemark.owner import partition_of
from securemark.registry import Registry
from securemark.tracing.tracer import TraceReport, trace

LAUNDERING = "finetune:epochs=1,lr=0.01 > prune:ratio=0.5 > quantize:bits=8"  # an attacks.pipeline spec


@dataclass(frozen=True)
class QuickstartResult:
    rounds: list[dict[str, Any]]
    leaker: str
    steps: list[dict[str, Any]]
    accuracy: dict[str, float]  # global, leaker's copy, leaked (laundered) model
    report: TraceReport


def leak_and_trace(
    cfg: SimConfig, out: Path, rng: np.random.Generator, launder: str = LAUNDERING
) -> tuple[str, list[dict[str, Any]], dict[str, float], TraceReport]:
    """Pick a customer of the finished run in ``out``, launder its final copy with its own data, trace it."""
    with Registry.open(out / "registry") as registry:
        names = registry.customers()
        leaker = names[int(rng.integers(len(names)))]
        copy = load_state_dict(out / "customers" / f"{leaker}.safetensors")
        own = data.client_data(cfg.data, partition_of(leaker), cfg.train.clients, cfg.train.seed)
        _, test = data.server_split(cfg.data, cfg.train.seed)
        shape = tuple(test.x.shape[1:])

        def fresh() -> torch.nn.Module:
            return models.build(cfg.model.name, shape, test.classes, width=cfg.model.width)  # type: ignore[arg-type]

        leaked, steps = pipeline.run([copy], pipeline.parse(launder), pipeline.Attacker(fresh, own, rng))
        save_state_dict(leaked, out / "leaked.safetensors")
        model = fresh()
        accuracy = {
            "global": training.accuracy_of(model, load_state_dict(out / "global.safetensors"), test),
            "leaker_copy": training.accuracy_of(model, copy, test),
            "leaked": training.accuracy_of(model, leaked, test),
        }
        report = trace(leaked, registry)
    return leaker, steps, accuracy, report


def run_quickstart(cfg: SimConfig, out: Path, seed: int = 0, console: Console | None = None) -> QuickstartResult:
    from securemark.sim import simulate  # imports flwr and ray: only here

    console = console or Console()
    if not cfg.fingerprint.enabled:
        raise ConfigError("the quickstart traces a leaked copy: fingerprint.enabled must be true")
    console.print(f"[bold]1.[/] federated training ({cfg.train.clients} clients, {cfg.train.rounds} rounds) -> {out}")
    metrics = simulate(cfg, out)
    console.print("[bold]2.[/] a customer leaks its copy after fine-tuning it on its own data, pruning, int8")
    leaker, steps, accuracy, report = leak_and_trace(cfg, out, np.random.default_rng(seed))
    return QuickstartResult(metrics["rounds"], leaker, steps, accuracy, report)


def print_quickstart(res: QuickstartResult, console: Console) -> None:
    table = Table(title="Top suspects of the leaked model")
    for col in ("customer", "score", "p-value", "accused"):
        table.add_column(col)
    accused = {s.customer for s in res.report.accused}
    for s in res.report.scores_top[:5]:
        table.add_row(s.customer, f"{s.score:.2f}", f"{s.p_value:.1e}", "yes" if s.customer in accused else "")
    console.print(table)
    last = res.rounds[-1]
    a = res.accuracy
    console.print(
        f"laundering: {', '.join(_describe(s) for s in res.steps)}\n"
        f"accuracy: global {a['global']:.3f}, leaker's copy {a['leaker_copy']:.3f}, leaked {a['leaked']:.3f}\n"
        f"training: last round copies {last.get('copies_mean_accuracy', float('nan')):.3f} (mean), "
        f"bit error {last.get('max_bit_error', float('nan')):.3f}, {last['seconds']:.1f} s/round\n"
        f"certified threshold {res.report.threshold:.2f} (eps = {res.report.eps}: P(any innocent accused) <= eps)"
    )
    names = ", ".join(s.customer for s in res.report.accused) or "nobody"
    verdict = "correct" if [s.customer for s in res.report.accused] == [res.leaker] else f"the leaker was {res.leaker}"
    console.print(f"[bold]Leaked by: {names}[/]  ({verdict})")


def _describe(step: dict[str, Any]) -> str:
    kind = step["attack"]
    if kind == "finetune":
        return f"fine-tune {step['epochs']} epoch on {step['examples']} own examples (lr {step['lr']})"
    if kind == "prune":
        return f"prune {step['ratio']:.0%}"
    if kind == "quantize":
        return f"int{step['bits']}" if step["bits"] < 16 else "float16"
    return kind
