"""The shipped ServerApp: securemark's models and data under the SecureMark strategy around Flower's FedAvg.

``run`` is what ``securemark simulate`` and ``flwr run`` execute: the run's config written to ``out``, the
rounds (see ``strategy``), then report.md. Global and copy accuracy come from ``evaluate_fn`` on the server's
held-out split. A run whose ``out`` holds an unfinished run's checkpoint with the same config resumes it: so a
restarted ServerApp (``flwr run`` again with the same ``output``) goes on from the last completed round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from rich.console import Console

from securemark import data, models, training
from securemark.config import ConfigError, SimConfig
from securemark.flower.checkpoint import CHECKPOINT
from securemark.flower.strategy import SecureMark
from securemark.owner import FunctionSpec, function_spec
from securemark.report import write_report
from securemark.secagg.roster import Roster


def train_config(cfg: SimConfig) -> ConfigRecord:
    """What every train message's ``config`` holds: the data and model sections, seed and local training."""
    flat = {k: v for k, v in cfg.to_flat().items() if k.startswith(("data.", "model."))}
    t = cfg.train
    return ConfigRecord(
        {**flat, "seed": t.seed, "local_epochs": t.local_epochs, "lr": t.lr, "batch_size": t.batch_size}
    )


def strategy_for(
    cfg: SimConfig, out: Path, max_weight: int, console: Console | None = None, function: FunctionSpec | None = None,
    model: torch.nn.Module | None = None, example_input: tuple[int, ...] | None = None, roster: Roster | None = None,
) -> SecureMark:  # fmt: skip
    t = cfg.train
    inner = FedAvg(fraction_train=t.per_round / t.clients, min_train_nodes=t.per_round, min_available_nodes=t.clients)
    inner.fraction_evaluate, inner.min_evaluate_nodes = 0.0, 0  # evaluation runs on the server (evaluate_fn)
    return SecureMark(
        inner,
        out,
        fingerprint=cfg.fingerprint,
        secagg=cfg.secagg,
        identity=cfg.fingerprint.identity,
        max_weight=max_weight,
        console=console,
        function=function,
        model=model,
        example_input=example_input,
        roster=roster,
    )


def resumable(out: Path) -> bool:
    return (out / CHECKPOINT / "state.json").is_file()


def run(
    grid: Grid, cfg: SimConfig, out: Path, console: Console | None = None, resume: bool | None = None,
    roster: Roster | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """All rounds of ``cfg`` on ``grid``; returns metrics.json's rounds. ``resume``: go on from ``out``'s
    checkpoint (None: when there is one). ``roster``: the malicious threat's (else ``secagg.roster``'s file)."""
    console = console or Console(stderr=True)
    resume = resumable(out) if resume is None else resume
    if resume:
        saved = out / "config.toml"
        if not saved.is_file() or saved.read_text() != cfg.to_toml(out):
            raise ConfigError(f"{out} holds a run with another config than this one ({saved}); refusing to resume it")
    train_set, test = data.server_split(cfg.data, cfg.train.seed)
    model = models.build(
        cfg.model.name, tuple(test.x.shape[1:]), test.classes, seed=cfg.train.seed, width=cfg.model.width
    )
    # no client can hold more examples than the training share
    example = (1, *test.x.shape[1:])  # the architecture registered: copies rewritten without changing outputs trace
    strategy = strategy_for(cfg, out, len(train_set), console, function_spec(cfg, test), model, example, roster)

    def evaluate(_round: int, arrays: ArrayRecord) -> MetricRecord:
        return MetricRecord({"accuracy": training.accuracy_of(model, arrays.to_torch_state_dict(), test)})

    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        if (out / "metrics.json").exists() or (out / "registry").exists():  # before config.toml is overwritten
            raise FileExistsError(f"{out} already holds a run; choose another output directory")
        (out / "config.toml").write_text(cfg.to_toml(out))
    c = cfg
    console.print(
        f"[bold]securemark[/]: {c.train.clients} clients, {c.train.rounds} rounds, "
        f"fingerprint={'on' if c.fingerprint.enabled else 'off'}, secagg={'on' if c.secagg.enabled else 'off'}"
    )
    initial = ArrayRecord({k: v.detach().clone() for k, v in model.state_dict().items()})
    strategy.start(
        grid,
        initial,
        num_rounds=c.train.rounds,
        timeout=c.secagg.timeout,
        train_config=train_config(cfg),
        evaluate_fn=evaluate,
        resume=resume,
    )
    write_report(out, cfg, strategy.rounds)
    return strategy.rounds


def make_server_app(
    cfg: SimConfig | None = None, out: Path | None = None, resume: bool | None = None, roster: Roster | None = None
) -> ServerApp:
    """A ServerApp bound to ``cfg`` (simulation), or reading Flower's run config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or SimConfig.from_flat(dict(context.run_config))
        run(grid, run_cfg, out or Path(run_cfg.output), resume=resume, roster=roster)

    return app


app = make_server_app()
