"""Run one masked-aggregation round in one process: every client and the server, with dropouts.

``drop[stage]`` names the clients that vanish just before sending their ``stage`` message: ADVERTISE (never
joins), SHARE (advertised keys only), MASKED (shared keys, sent no input), UNMASK (sent its input, then
vanished). Timings are kept per stage, clients and server apart.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from securemark.secagg import protocol as P
from securemark.secagg.protocol import Stage


@dataclass
class RoundResult:
    total: np.ndarray
    survivors: tuple[int, ...]
    seconds: dict[str, float] = field(default_factory=dict)  # "client.MASKED", "server.SUM", ...
    mask_bytes: int = 0  # mask bytes clients generated and applied


def run_round(
    cfg: P.RoundConfig,
    inputs: Mapping[int, np.ndarray],
    drop: Mapping[Stage, set[int]] | None = None,
    server: P.ServerState | None = None,
) -> RoundResult:
    """Drive all stages; raises the protocol's error (e.g. TooFewSurvivors) when the round cannot finish."""
    drop = drop or {}
    secs: dict[str, float] = defaultdict(float)
    srv = server or P.ServerState(cfg)
    alive = set(cfg.clients)

    def stage_clients(stage: Stage) -> list[int]:
        alive.difference_update(drop.get(stage, set()))
        return sorted(alive)

    def timed(key: str, fn: Callable[..., Any], *args: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args)
        secs[key] += time.perf_counter() - t
        return out

    clients = {i: P.ClientState(cfg, i) for i in cfg.clients}
    for i in stage_clients(Stage.ADVERTISE):
        timed(
            "server.ADVERTISE",
            P.server_receive_keys,
            srv,
            i,
            *timed("client.ADVERTISE", P.client_advertise, clients[i]),
        )
    srv.close(Stage.ADVERTISE, len(srv.keys))

    for i in stage_clients(Stage.SHARE):
        cts = timed("client.SHARE", P.client_share_keys, clients[i], P.server_keys_for(srv, i))
        timed("server.SHARE", P.server_receive_shares, srv, i, cts)
    srv.close(Stage.SHARE, len(srv.shared))

    mask_bytes = 0
    for i in stage_clients(Stage.MASKED):
        y = timed("client.MASKED", P.client_masked_input, clients[i], P.server_shares_for(srv, i), inputs[i])
        mask_bytes += (1 + len(clients[i].sharers)) * y.nbytes
        timed("server.MASKED", P.server_receive_masked, srv, i, y)
    srv.close(Stage.MASKED, len(srv.inputs))

    survivors = P.server_survivors(srv)
    for i in stage_clients(Stage.UNMASK):
        if i in srv.inputs:
            b, s = timed("client.UNMASK", P.client_unmask, clients[i], survivors)
            timed("server.UNMASK", P.server_receive_unmask, srv, i, b, s)
    total = timed("server.SUM", P.server_sum, srv)
    return RoundResult(total, survivors, dict(secs), mask_bytes)
