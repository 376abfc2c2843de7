"""``securemark bench trace-rounds``: a federation's registry against its number of rounds.

A real run in process: FedAvg over ``customers`` clients of the offline MNIST-5k digits (``per_round`` sampled
each round, local SGD), every round's global model recorded as a base the way the Flower server records it
(:meth:`securemark.flower.copies.Copies.record_base`: the projection always, the model file every
``anchor_every`` rounds), the final model as the current base. Then, from the models kept in memory:

- registry bytes per round, averaged over the run, against one model file, and registry bytes and trace
  seconds after a quarter, half, three quarters and all of the run (a trace aligns to at most four anchors,
  so its seconds stop growing once the run has them; reading every base's projection is the part that grows);
- seconds to trace one suspect against every base, against the current base alone (one alignment), side by
  side on the same suspects;
- copies of round 1 (made from the initial model), of the middle round and final copies, intact and pruned
  50% then int8-quantized: named alone;
- customers who average their own copies of rounds 1 and R, mix 3 rounds, or extrapolate past the final
  copy (``attacks.mix_rounds``): caught, and innocents accused.
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
from rich.console import Console

from securemark import attacks, data, models, training
from securemark.config import FingerprintConfig
from securemark.errors import InputError
from securemark.flower.copies import Copies
from securemark.owner import customer_name, establish_base, mark
from securemark.registry import Registry
from securemark.tracing.tracer import Tracer

Weights = dict[str, torch.Tensor]


def train_rounds(
    model: str, params: int, rounds: int, clients: int, per_round: int, seed: int, scheme: str = "iid",
    lr: float = 0.05, seen: Callable[[int, Weights, Weights], None] | None = None,
) -> tuple[list[Weights], float]:  # fmt: skip
    """The global model after each of ``rounds`` FedAvg rounds, the initial model first (R + 1 models), and
    the final model's accuracy on the held-out fifth of the digits. ``seen(client, start, trained)`` is called
    after each client's local training."""
    pool, test = data.load_mnist5k(seed).split(0.2, seed)
    rng = np.random.default_rng(seed)
    parts = data.partition(pool.y.numpy(), clients, scheme, rng)
    shape, classes = tuple(pool.x.shape[1:]), pool.classes
    width = models.mlp_width_for(params, shape, classes) if model == "mlp" else 0  # type: ignore[arg-type]
    net = models.build(model, shape, classes, seed=seed, width=width)  # type: ignore[arg-type]
    history = [{k: v.detach().clone() for k, v in net.state_dict().items()}]
    for r in range(1, rounds + 1):
        total: dict[str, torch.Tensor] = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in history[-1].items()}
        count = 0
        for c in rng.choice(clients, size=per_round, replace=False):
            local = pool.subset(parts[c])
            if not len(local):
                continue
            net.load_state_dict(history[-1])
            training.train(net, local, lr=lr, generator=training.client_generator(seed, r, int(c)))
            if seen is not None:
                seen(int(c), history[-1], net.state_dict())
            for k, v in net.state_dict().items():
                total[k] += v.double() * len(local)
            count += len(local)
        history.append({k: (v / count).to(history[0][k].dtype) for k, v in total.items()})
    return history, training.accuracy_of(net, history[-1], test)


def bench_trace_rounds(
    model: str = "mlp", params: int = 1_000_000, rounds: int = 100, customers: int = 100, per_round: int = 10,
    anchor_every: int = 16, length: int = 1024, max_colluders: int = 4, copies: int = 20, trials: int = 100,
    timed: int = 10, seed: int = 0, out: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The figures of the module docstring (``out``: where the registry goes; a temporary folder by default)."""
    if not (max(copies, per_round, timed) <= customers and rounds >= 2 and min(copies, trials, timed) >= 1):
        raise InputError(f"need copies, per-round and timed <= customers ({customers}), rounds >= 2, and copies, "
                         "trials, timed >= 1")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="securemark-trace-rounds-") as tmp:
        folder = Path(tmp) if out is None else out
        t0 = time.perf_counter()
        history, accuracy = train_rounds(model, params, rounds, customers, per_round, seed)
        train_seconds = time.perf_counter() - t0
        fc = FingerprintConfig(length=length, max_colluders=max_colluders, anchor_every=anchor_every)
        run = Copies(fc, None, Console(quiet=True))
        run.create(folder, history[0])
        assert run.registry is not None and run.fp is not None
        reg, fp = run.registry, run.fp
        names = [customer_name(i) for i in range(customers)]
        bits = {n: reg.customer(n).bits for n in names}  # code rows: what any registry of these customers holds
        first = reg.size()
        marks = {max(1, rounds * q // 4) for q in (1, 2, 3)}
        series = []  # registry bytes and trace seconds against rounds, as the run goes
        for r in range(rounds):  # copies of round r + 1 are made from the model after round r
            run.record_base(object(), history[r], after=r)
            if r + 1 in marks:
                series.append(_checkpoint(reg, r + 1, [mark(fp, run.strength, None, history[r], bits[n])
                                                       for n in names[:timed]]))  # fmt: skip
        establish_base(reg, history[-1], run.strength)
        size = reg.size()
        model_bytes = (folder / "registry" / "bases").glob("*.safetensors").__next__().stat().st_size
        grown = size["database_bytes"] + size["model_bytes"] - first["database_bytes"] - first["model_bytes"]
        tracer, single = Tracer(reg), Tracer(reg, every_base=False)
        rng = np.random.default_rng(seed + 1)

        def copy(name: str, r: int) -> Weights:
            return mark(fp, run.strength, None, history[r], bits[name])

        named = {}
        for label, r in (("round_1", 0), ("mid_run", rounds // 2), ("final", rounds)):
            for kind in ("intact", "pruned_int8"):
                hits = 0
                for name in rng.choice(names, size=copies, replace=False):
                    suspect = copy(name, r)
                    if kind == "pruned_int8":
                        suspect = attacks.quantize(attacks.prune(suspect, 0.5)[0], 8)[0]
                    hits += [s.customer for s in tracer.trace(suspect).accused] == [name]
                named[f"{label}_{kind}"] = f"{hits}/{copies}"
        timing = _timing(tracer, single, [copy(n, rounds) for n in names[:timed]])
        series.append({"rounds": rounds, "registry_bytes": size["database_bytes"] + size["model_bytes"],
                       "trace_seconds": timing["trace_seconds_every_base"]})  # fmt: skip
        mixed = _mixed(tracer, copy, names, rounds, trials, rng)
        reg.close()
    return {
        "model": model, "parameters": sum(v.numel() for v in history[0].values()), "rounds": rounds,
        "customers": customers, "code": f"tardos L={length} c_max={max_colluders}", "anchor_every": anchor_every,
        "train_seconds": round(train_seconds, 1), "final_accuracy": round(accuracy, 4), "model_file_bytes": model_bytes,
        "registry_bytes": size["database_bytes"] + size["model_bytes"], "model_files": size["model_files"],
        "bases": size["bases"], "growth_per_round_bytes": round(grown / rounds),
        "growth_per_round_vs_model_file": round(grown / rounds / model_bytes, 4),
        **timing, "against_rounds": series, "named_alone": named, **mixed,
    }  # fmt: skip


def _checkpoint(reg: Registry, rounds: int, suspects: list[Weights]) -> dict[str, Any]:
    """The registry's bytes after ``rounds`` bases, and the median seconds to trace ``suspects`` against it."""
    size, tracer = reg.size(), Tracer(reg)
    seconds = []
    for suspect in suspects:
        s0 = time.perf_counter()
        tracer.trace(suspect)
        seconds.append(time.perf_counter() - s0)
    return {"rounds": rounds, "registry_bytes": size["database_bytes"] + size["model_bytes"],
            "trace_seconds": round(statistics.median(seconds), 4)}  # fmt: skip


def _timing(tracer: Tracer, single: Tracer, suspects: list[Weights]) -> dict[str, Any]:
    """Median seconds per trace against every base and against the current base alone, alternating."""
    every: list[float] = []
    one: list[float] = []
    for suspect in suspects:
        for t, into in ((tracer, every), (single, one)):
            s0 = time.perf_counter()
            t.trace(suspect)
            into.append(time.perf_counter() - s0)
    a, b = statistics.median(every), statistics.median(one)
    return {"trace_seconds_every_base": round(a, 4), "trace_seconds_single_base": round(b, 4),
            "trace_every_vs_single": round(a / b, 2)}  # fmt: skip


def _mixed(tracer: Tracer, copy: Any, names: list[str], rounds: int, trials: int, rng: np.random.Generator) -> dict:
    """Customers (one drawn per trial) who average their own copies of rounds 1 and R, mix 3 random rounds
    (random convex weights), or extrapolate past the final copy (4 x final - 3 x round 1's): caught,
    innocents accused, and how many readings combined bases."""
    out: dict[str, Any] = {}
    for kind in ("first_and_last", "three_rounds", "extrapolated"):
        caught = innocents = mixtures = 0
        for _ in range(trials):
            name = str(rng.choice(names))
            picked = [0, rounds] if kind != "three_rounds" else sorted(rng.choice(rounds + 1, 3, replace=False))
            weights = {"first_and_last": None, "three_rounds": rng.dirichlet(np.ones(3)),
                       "extrapolated": [-3.0, 4.0]}[kind]  # fmt: skip
            suspect, _ = attacks.mix_rounds([copy(name, int(r)) for r in picked], rng, weights)
            report = tracer.trace(suspect)
            accused = [s.customer for s in report.accused]
            caught += name in accused
            innocents += sum(a != name for a in accused)
            mixtures += "mixture" in report.alignment
        out[f"mixed_{kind}"] = {"caught": f"{caught}/{trials}", "innocents_accused": innocents,
                                "read_as_mixture": f"{mixtures}/{trials}"}  # fmt: skip
    return out
