"""Flower's simulation engine on Ray (fractional GPUs when present, CPU otherwise): apps run in this process,
each SuperNode a Ray actor. securemark.sim runs securemark's own apps in it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from securemark.config import ConfigError, SimConfig

for _var, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
    ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0"),
):
    os.environ.setdefault(_var, _value)


class _HideRunSimulationDeprecation(logging.Filter):
    """run_simulation is the in-process entry point this runner needs (apps bound to a config object);
    ``flwr run`` is supported separately (docs/how-to/deploy.md), so Flower's notice about it is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


def backend_config(cfg: SimConfig) -> dict[str, Any]:
    """Flower's Ray backend settings: per-client resources, and the cluster to join when one is named.

    Without one, ``address="local"``: a private instance. Ray's default (no address) joins whatever RAY_ADDRESS
    or the last ``ray start`` on this machine names, and a head that was killed rather than stopped leaves that
    behind: every later run then waited for a dead cluster (seen here)."""
    r = cfg.resources
    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    init_args["address"] = r.ray_address or "local"
    return {"client_resources": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus}, "init_args": init_args}


def run_apps(server_app: Any, client_app: Any, cfg: SimConfig) -> None:
    """Flower's simulation engine on Ray: ``cfg.train.clients`` SuperNodes with ``cfg.resources`` each."""
    from flwr.simulation import run_simulation

    if cfg.resources.num_gpus > 0:
        import torch

        if not torch.cuda.is_available():  # Ray would wait forever for a GPU that is not there
            raise ConfigError(f"resources.num_gpus = {cfg.resources.num_gpus} but no CUDA GPU is visible; set it to 0")
    flwr_log = logging.getLogger("flwr")
    if not any(isinstance(f, _HideRunSimulationDeprecation) for f in flwr_log.filters):
        flwr_log.addFilter(_HideRunSimulationDeprecation())
    run_simulation(server_app, client_app, num_supernodes=cfg.train.clients, backend_config=backend_config(cfg))


def run_securemark(cfg: SimConfig, out: Path, resume: bool) -> None:
    """securemark's ServerApp (writing to ``out``; with ``resume``, going on from its checkpoint) and ClientApp in
    the engine."""
    from securemark.flower.client_app import app, simulated_signers_app
    from securemark.flower.server_app import make_server_app
    from securemark.flower.signers import simulated

    if cfg.secagg.enabled and cfg.secagg.threat == "malicious":
        if cfg.secagg.roster:
            raise ConfigError("a simulation makes its own roster for its nodes: secagg.roster is for deployments")
        roster, keys = simulated(cfg.train.clients)  # the owner runs every node: keys in its memory alone
        run_apps(make_server_app(cfg, out, resume, roster), simulated_signers_app(roster, keys), cfg)
        return
    run_apps(make_server_app(cfg, out, resume), app, cfg)
