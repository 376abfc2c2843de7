"""Run a federation into an output folder: the folder checked (a fresh run, or a stopped one to resume),
securemark's apps run in Flower's simulation engine (securemark.flower.simulation), the run's metrics read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from securemark.config import SimConfig
from securemark.errors import RunFailed
from securemark.flower.simulation import run_securemark


def simulate(cfg: SimConfig, out: Path, resume: bool = False) -> dict[str, Any]:
    """Run all rounds (with ``resume``, those after ``out``'s checkpoint); returns metrics.json's content.
    Raises if the ServerApp did not finish."""
    from securemark.flower.checkpoint import CHECKPOINT, checked_state  # flwr and torch: only when run
    from securemark.flower.server_app import resumable

    out = Path(out)
    if resume and not resumable(out):
        raise FileNotFoundError(f"{out} holds no checkpoint of an unfinished run to resume")
    if resume and checked_state(out / CHECKPOINT / "state.json")["round"] >= cfg.train.rounds:
        raise FileExistsError(f"{out} holds a finished run of {cfg.train.rounds} rounds; nothing to resume")
    if not resume and ((out / "metrics.json").exists() or (out / "registry").exists()):
        raise FileExistsError(f"{out} already holds a run; choose another --out, or --resume it")
    (out / "report.md").unlink(missing_ok=True)
    run_securemark(cfg, out, resume)
    if not (out / "report.md").exists():
        raise RunFailed(f"the simulation ended without finishing the run; see the log above (output: {out})")
    return json.loads((out / "metrics.json").read_text())
