"""Run masked aggregation in one process: a session of nodes and the server, round after round, with dropouts.

``drop`` names the clients that vanish in a round: ``"masked"`` (never sent a masked input) or ``"unmask"``
(sent its input, then vanished). Timings are kept per stage, clients and server apart.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from securemark.secagg import protocol as P

DROP_STAGES = ("masked", "unmask")


@dataclass
class RoundResult:
    total: np.ndarray
    survivors: tuple[int, ...]
    seconds: dict[str, float] = field(default_factory=dict)  # "client.masked", "server.sum", ...
    mask_bytes: int = 0  # mask bytes clients generated and applied


@dataclass
class Session:
    """Every node's long-term keys and the server's copy of their public halves; set up once."""

    name: str
    nodes: dict[int, P.NodeKeys] = field(default_factory=dict)
    server: P.SessionKeys = field(init=False)

    def __post_init__(self) -> None:
        self.server = P.SessionKeys(self.name)

    def join(self, i: int) -> None:
        """Set up (or re-key) node ``i``: new long-term keys, registered with the server."""
        self.nodes[i] = P.NodeKeys(self.name, i)
        self.server.register(i, *self.nodes[i].public())


def run_round(
    session: Session,
    cfg: P.RoundConfig,
    inputs: Mapping[int, np.ndarray],
    drop: Mapping[str, set[int]] | None = None,
    server: P.ServerRound | None = None,
) -> RoundResult:
    """Drive one round; raises the protocol's error (e.g. TooFewSurvivors) when it cannot finish."""
    drop = drop or {}
    secs: dict[str, float] = defaultdict(float)
    srv = server or P.ServerRound(cfg)
    for i in cfg.clients:
        if i not in session.nodes:
            session.join(i)

    def timed(key: str, fn: Callable[..., Any], *args: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args)
        secs[key] += time.perf_counter() - t
        return out

    mask_bytes = 0
    for i in cfg.clients:
        if i in drop.get("masked", set()):
            continue
        peer_keys = session.server.for_client(cfg, i)
        m = timed("client.masked", P.client_masked_input, session.nodes[i], cfg, peer_keys, inputs[i])
        mask_bytes += (1 + len(cfg.neighbours[i])) * m.y.nbytes
        timed("server.masked", P.server_receive_masked, srv, i, m)
    survivors = P.server_close_inputs(srv)
    for i in survivors:
        if i in drop.get("unmask", set()):
            continue
        cts, peer_keys = P.server_shares_for(srv, i), session.server.for_client(cfg, i)
        reveals, bad = timed("client.unmask", P.client_unmask, session.nodes[i], cfg, peer_keys, survivors, cts)
        timed("server.unmask", P.server_receive_unmask, srv, i, reveals, bad)
    total = timed("server.sum", P.server_sum, srv)
    return RoundResult(total, survivors, dict(secs), mask_bytes)
