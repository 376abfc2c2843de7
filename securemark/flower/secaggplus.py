"""Flower's own SecAgg+ as apps, for ``securemark bench rounds`` (securemark.bench.rounds): SecAggPlusWorkflow
around a legacy FedAvg on the server, secaggplus_mod on the clients, on the same model and data as securemark's
apps, each fit round timed on the server."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from securemark import data, models, training
from securemark.config import SimConfig


class _TrainClient(NumPyClient):
    def __init__(self, cfg: SimConfig, pid: int) -> None:
        self.cfg = cfg
        self.pid = pid
        self.local = data.client_data(cfg.data, pid, cfg.train.clients, cfg.train.seed)
        shape = tuple(self.local.x.shape[1:])
        self.model = models.build(cfg.model.name, shape, self.local.classes, width=cfg.model.width)  # type: ignore[arg-type]

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        names = list(self.model.state_dict())
        self.model.load_state_dict({n: torch.from_numpy(np.asarray(p)) for n, p in zip(names, parameters, strict=True)})
        t = self.cfg.train
        gen = training.client_generator(t.seed, int(config["round"]), self.pid)
        loss = training.train(
            self.model, self.local, epochs=t.local_epochs, lr=t.lr, batch_size=t.batch_size, generator=gen
        )
        weights = [v.detach().cpu().numpy() for v in self.model.state_dict().values()]
        return weights, len(self.local), {"train_loss": loss}


def secaggplus_apps(cfg: SimConfig, round_seconds: list[float]) -> tuple[ServerApp, ClientApp]:
    """Flower's SecAgg+ apps; each fit round's duration is appended to ``round_seconds``."""

    def client_fn(context: Context) -> Any:
        return _TrainClient(cfg, int(context.node_config["partition-id"])).to_client()

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        t = cfg.train
        _, test = data.server_split(cfg.data, t.seed)
        shape = tuple(test.x.shape[1:])
        model = models.build(cfg.model.name, shape, test.classes, seed=t.seed, width=cfg.model.width)  # type: ignore[arg-type]
        strategy = FedAvg(
            fraction_fit=t.per_round / t.clients,
            fraction_evaluate=0.0,
            min_fit_clients=t.per_round,
            min_available_clients=t.clients,
            initial_parameters=ndarrays_to_parameters([v.numpy() for v in model.state_dict().values()]),
            on_fit_config_fn=lambda r: {"round": r},
        )
        shares = t.per_round if t.per_round % 2 else t.per_round - 1  # odd, as SecAgg+ wants below all clients
        secagg = SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=shares // 2 + 1, max_weight=5000)

        def timed_fit(g: Grid, ctx: Context) -> None:
            start = time.perf_counter()
            secagg(g, ctx)
            round_seconds.append(time.perf_counter() - start)

        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=t.rounds), strategy=strategy)
        DefaultWorkflow(fit_workflow=timed_fit)(grid, legacy)

    return server, ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
