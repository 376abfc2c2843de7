"""Run masked aggregation in one process: a session of nodes and the server, round after round, with dropouts.

``drop`` names the clients that vanish in a round: ``"masked"`` (never sent a masked input), ``"sign"`` (sent
its input, then vanished before signing the survivors: the malicious threat's extra exchange) or ``"unmask"``
(vanished before revealing). Timings are kept per stage, clients and server apart.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securemark.secagg import protocol as P
from securemark.secagg.roster import Roster, public_hex

DROP_STAGES = ("masked", "sign", "unmask")


@dataclass
class RoundResult:
    total: np.ndarray
    survivors: tuple[int, ...]
    seconds: dict[str, float] = field(default_factory=dict)  # "client.masked", "server.sum", ...
    mask_bytes: int = 0  # mask bytes clients generated and applied


@dataclass
class Session:
    """Every node's long-term keys and the server's copy of their public halves; set up once. With ``signers``
    (the malicious threat: node -> its signing key and roster), each node's keys travel signed."""

    name: str
    nodes: dict[int, P.NodeKeys] = field(default_factory=dict)
    server: P.SessionKeys = field(init=False)
    signers: dict[int, P.Signer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.server = P.SessionKeys(self.name)

    @classmethod
    def signing(cls, name: str, clients: list[int]) -> Session:
        """A session of the malicious threat: a roster of members ``m<i>`` with fresh keys, one per client."""
        keys = {i: Ed25519PrivateKey.generate() for i in clients}
        roster = Roster({f"m{i}": bytes.fromhex(public_hex(k)) for i, k in keys.items()})
        return cls(name, signers={i: P.Signer(roster, k) for i, k in keys.items()})

    def signed(self, clients: tuple[int, ...], threshold: int, train: bytes = bytes(32), signers: int = 0) -> tuple:
        """The malicious threat's fields of a ``RoundConfig`` for ``clients`` (joined first): roster, members,
        signatures needed (default: two thirds and the threshold), session keys, training digest."""
        n = len(clients)
        m = signers or P.signers_needed(n, threshold)
        members = tuple((i, self.signers[i].member) for i in clients)
        keys = tuple((i, *self.server.keys[i]) for i in clients)
        return self.signers[clients[0]].roster.digest, members, m, keys, train

    def join(self, i: int) -> None:
        """Set up (or re-key) node ``i``: new long-term keys, registered with the server."""
        self.nodes[i] = P.NodeKeys(self.name, i)
        c_pk, s_pk = self.nodes[i].public()
        signer, signed = self.signers.get(i), None
        if signer is not None:
            signed = signer.member, signer.sign(P.advert(signer.roster.digest, self.name, i, c_pk, s_pk))
        self.server.register(i, c_pk, s_pk, signed)


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
        peer_keys, adverts, signer = session.server.for_client(cfg, i), session.server.adverts_for(cfg, i), None
        if cfg.malicious:
            signer = session.signers[i]
        m = timed("client.masked", P.client_masked_input, session.nodes[i], cfg, peer_keys, inputs[i], 1, signer,
                  adverts)  # fmt: skip
        mask_bytes += (1 + len(cfg.neighbours[i])) * m.y.nbytes
        timed("server.masked", P.server_receive_masked, srv, i, m)
    survivors = P.server_close_inputs(srv)
    signatures = {}
    if cfg.malicious:
        for i in survivors:
            if i not in drop.get("sign", set()):
                signer = session.signers[i]
                signatures[i] = timed("client.sign", P.sign_survivors, session.nodes[i], cfg, signer, survivors)
        if len(signatures) < cfg.signers:
            raise P.TooFewSurvivors(f"{len(signatures)} survivors signed, {cfg.signers} signatures needed")
    for i in survivors:
        if i in drop.get("unmask", set()) | drop.get("sign", set()):
            continue
        cts, peer_keys = P.server_shares_for(srv, i), session.server.for_client(cfg, i)
        signer = session.signers.get(i) if cfg.malicious else None
        reveals, bad = timed("client.unmask", P.client_unmask, session.nodes[i], cfg, peer_keys, survivors, cts,
                             signer, signatures)  # fmt: skip
        timed("server.unmask", P.server_receive_unmask, srv, i, reveals, bad)
    total = timed("server.sum", P.server_sum, srv)
    return RoundResult(total, survivors, dict(secs), mask_bytes)
