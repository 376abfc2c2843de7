"""`securemark bench simulate CONFIG`: one federation, measured end to end.

Seconds per round (from metrics.json), the peak resident memory of the whole run (this process plus every
process it starts: Ray's GCS, raylet and worker actors; sampled from /proc, Linux only), the server's masking
stages summed over rounds, and the outputs checked: every customer's final copy written, recorded, and traced
back to that customer alone; and copies made from the first round's model (the most training drift away from
the final one), traced against every kept round's model and against the final model alone.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from securemark.config import SimConfig
from securemark.errors import RunFailed

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # gone meanwhile
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and parentheses
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants."""
    kids, todo, total = _children(), [root], 0
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        with suppress(OSError):  # gone meanwhile
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    return total


class PeakMemory:
    """The largest :func:`tree_rss` of this process seen while the ``with`` block runs (every ``interval`` s)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(os.getpid()))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if not Path("/proc/self/statm").exists():
            raise RunFailed("bench simulate reads memory from /proc: Linux only")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _traced(out: Path) -> dict[str, int]:
    """Every final copy in ``out/customers`` traced: how many name their customer, how many name them alone,
    and the innocents accused over all of them (eps bounds the chance of any per trace, so n traces may show
    about n x eps)."""
    from securemark.modelio import load_state_dict
    from securemark.registry import Registry
    from securemark.tracing.tracer import Tracer

    files = sorted((out / "customers").glob("*.safetensors"))
    named = alone = innocents = 0
    with Registry.open(out / "registry") as reg:
        tracer = Tracer(reg)
        for f in files:
            accused = [s.customer for s in tracer.trace(load_state_dict(f), top_k=1).accused]
            named += f.stem in accused
            alone += accused == [f.stem]
            innocents += sum(name != f.stem for name in accused)
    return {"copies_issued": len(files), "copies_naming_their_customer": named,
            "copies_naming_their_customer_alone": alone, "innocents_accused": innocents}  # fmt: skip


EARLY_SAMPLE = 50


def _early_traced(out: Path) -> dict[str, Any]:
    """Copies of the first kept base (what round 1's customers received) for up to EARLY_SAMPLE customers, each
    traced with every kept base and with the final one alone: how many name their customer alone, and the
    median RMS of the observation (1 for an intact copy read against its own base; drift adds to it)."""
    from securemark.registry import Registry
    from securemark.registry.marks import fingerprinter
    from securemark.tracing.tracer import Tracer

    with Registry.open(out / "registry") as reg:
        first, names = reg.bases()[0], reg.customers()[:EARLY_SAMPLE]
        model = reg.base_model(first)
        if model is None:
            raise RunFailed(f"{out}/registry does not keep the model of its first base")
        fp = fingerprinter(reg, model)
        tracers = {"every_base": Tracer(reg), "final_base_only": Tracer(reg, every_base=False)}
        alone = dict.fromkeys(tracers, 0)
        rms: dict[str, list[float]] = {how: [] for how in tracers}
        for name in names:
            copy = fp.embed(model, reg.customer(name, create=False).bits, first.strength)
            for how, tracer in tracers.items():
                report = tracer.trace(copy, top_k=1)
                alone[how] += [s.customer for s in report.accused] == [name]
                rms[how].append(report.signal_rms)
        bases = len(reg.bases())
    figures: dict[str, Any] = {"bases_kept": bases, "first_round_copies": len(names)}
    for how in tracers:
        figures[f"first_round_copies_alone_{how}"] = alone[how]
        figures[f"first_round_median_signal_rms_{how}"] = round(statistics.median(rms[how]), 3)
    return figures


def bench_simulate(cfg: SimConfig, out: Path) -> dict[str, Any]:
    from securemark.sim import simulate

    start = time.perf_counter()
    with PeakMemory() as mem:
        metrics = simulate(cfg, out)
    seconds = time.perf_counter() - start
    rounds = metrics["rounds"]
    stages: dict[str, float] = {}
    for m in rounds:
        for stage, s in m.get("stage_seconds", {}).items():
            stages[stage] = round(stages.get(stage, 0.0) + s, 3)
    traced = {**_traced(out), **_early_traced(out)} if cfg.fingerprint.enabled else {}
    return {
        "clients": cfg.train.clients,
        "per_round": cfg.train.per_round,
        "rounds": len(rounds),
        "completed_rounds": sum(m["status"] == "completed" for m in rounds),
        "seconds_total": round(seconds, 1),
        "seconds_per_round_median": statistics.median(m["seconds"] for m in rounds),
        "peak_rss_gib": round(mem.peak / 2**30, 2),
        "masking_stage_seconds": stages,  # each stage of a round summed over rounds; "sum": the aggregation
        "final_accuracy": rounds[-1]["global_accuracy"],
        **traced,
        "out": str(out),
    }
