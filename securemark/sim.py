"""Run a federation in Flower's simulation engine on Ray (fractional GPUs when present, CPU otherwise)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from securemark.config import SimConfig

for _var, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
    ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0"),
):
    os.environ.setdefault(_var, _value)


def backend_config(cfg: SimConfig) -> dict[str, Any]:
    return {
        "client_resources": {"num_cpus": cfg.resources.num_cpus, "num_gpus": cfg.resources.num_gpus},
        "init_args": {"include_dashboard": False, "log_to_driver": False},
    }


def simulate(cfg: SimConfig, out: Path) -> dict[str, Any]:
    """Run all rounds; returns metrics.json's content. Raises if the ServerApp did not finish."""
    from flwr.simulation import run_simulation

    from securemark.flower.client_app import app as client_app
    from securemark.flower.server_app import make_server_app

    out = Path(out)
    if (out / "metrics.json").exists():
        raise FileExistsError(f"{out} already holds a run; choose another --out")
    run_simulation(
        make_server_app(cfg, out), client_app, num_supernodes=cfg.train.clients, backend_config=backend_config(cfg)
    )
    if not (out / "report.md").exists():
        raise RuntimeError(f"the simulation ended without finishing the run; see the log above (output: {out})")
    return json.loads((out / "metrics.json").read_text())
