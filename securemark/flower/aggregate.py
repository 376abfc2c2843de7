"""A round's sum of updates, two interchangeable ways: in clear (:class:`PlainSum`, the baseline) or masked
(:class:`MaskedSum`, ``secagg.protocol``: the server learns only the weighted sum). Both give the weighted mean
of the updates that counted, their total weight and who they came from; the strategy needs nothing else.

A round with either: ``setup`` gives the records each sampled node's train message carries, ``need`` the
number of good replies after which the exchange waits only the grace period, ``collect`` the mean from the
replies (a masked sum runs its second exchange, the unmask, there), ``after_failure`` the model the next round
starts from when this one failed (a masked round that failed after nodes revealed shares moves it on: those
nodes refuse to train from a model they helped unmask a sum of, ``secagg.starts``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg, Strategy
from rich.console import Console

from securemark.config import SecAggSettings
from securemark.errors import RoundFailed
from securemark.flower import wire
from securemark.flower.exchange import Need, StageClock, accept
from securemark.flower.nodes import Nodes
from securemark.secagg import protocol as P
from securemark.secagg.quantize import QuantConfig, decode
from securemark.secagg.ranges import GROWTH, Ranges, round_bits
from securemark.secagg.roster import Roster

CLIPPED_WARN = 1e-5  # a round whose share of clipped values passes this is said on the console, with the cure

_MEAN_ONLY = (
    "masked aggregation reveals only the weighted sum of the updates; SecureMark wraps strategies whose aggregate "
    "is a weighted mean (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad)"
)
REFUSED = {
    "FedMedian": "its aggregate is a coordinate-wise median of individual models",
    "FedTrimmedAvg": "it trims individual clients' values",
    "MultiKrum": "it selects models by distances between individual updates",
    "Bulyan": "it selects and trims individual updates",
    "QFedAvg": "it weights each update by that client's loss",
    "FedXgbBagging": "it merges tree ensembles, not arrays",
    "FedXgbCyclic": "it passes one client's model on, unaveraged",
}


def check_inner(strategy: Strategy) -> None:
    """Refuse (ValueError) an inner strategy whose aggregate masked aggregation cannot compute."""
    for cls in type(strategy).__mro__:
        if cls.__name__ in REFUSED:
            raise ValueError(f"SecureMark cannot wrap {type(strategy).__name__}: {REFUSED[cls.__name__]}; {_MEAN_ONLY}")
    if not isinstance(strategy, FedAvg):
        raise ValueError(f"SecureMark cannot wrap {type(strategy).__name__}: {_MEAN_ONLY}")
    for name in ("fraction_train", "fraction_evaluate", "min_available_nodes", "min_train_nodes", "min_evaluate_nodes"):
        value = getattr(strategy, name)
        top = 1 if name.startswith("fraction") else math.inf  # more than all nodes would be waited for forever
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= top:
            raise ValueError(f"{type(strategy).__name__}.{name} must be a number in [0, {top}], got {value!r}")


@dataclass
class Aggregate:
    mean: np.ndarray  # the weighted mean of the updates that counted
    weight: int  # their total weight (example count)
    counted: list[int]  # the nodes whose update counted
    info: dict[str, Any]  # what metrics.json records of the round (survived, dropped, stage seconds, ...)


Tensors = list[tuple[str, int, float]]  # the global model's floating tensors: (name, size, largest |value|)
Inner = dict[int, Message]  # the inner strategy's train messages, by node


def tensor_scales(weights: Mapping[str, torch.Tensor], names: list[str]) -> Tensors:
    """The update's tensors as masking sizes their ranges (``secagg.ranges``), in the update's order."""
    return [(n, weights[n].numel(), float(weights[n].abs().max()) if weights[n].numel() else 0.0) for n in names]


class Sum(Protocol):
    def setup(self, r: int, sampled: list[int], tensors: Tensors, inner: Inner) -> dict[int, dict[str, Any]]: ...

    def need(self) -> Need: ...

    def collect(self, r: int, replies: dict[int, Message], clock: StageClock) -> Aggregate: ...

    def resume(self, rounds: list[dict[str, Any]]) -> None: ...

    def after_failure(self, flat: np.ndarray) -> np.ndarray | None: ...


class PlainSum:
    """Updates in clear with their weights: what a round costs without masking."""

    def __init__(self, max_weight: int, console: Console) -> None:
        self.max_weight, self.console = max_weight, console
        self.sampled: list[int] = []
        self.size = 0

    def setup(self, r: int, sampled: list[int], tensors: Tensors, inner: Inner) -> dict[int, dict[str, Any]]:
        self.sampled, self.size = sampled, sum(n for _, n, _ in tensors)
        return {}

    def resume(self, rounds: list[dict[str, Any]]) -> None:
        """Nothing a plain sum keeps between rounds."""

    def need(self) -> int:
        return len(self.sampled) // 2 + 1

    def after_failure(self, flat: np.ndarray) -> np.ndarray | None:
        """A failed plain round leaves the model as it was."""
        return None

    def collect(self, r: int, replies: dict[int, Message], clock: StageClock) -> Aggregate:
        clock.lap("train")
        parsed: dict[int, tuple[int, np.ndarray]] = {}
        for n, rep in replies.items():
            got = accept(self.console, n, _plain_update, rep.content, self.size, self.max_weight)
            if got is not None:
                parsed[n] = got
        if not parsed:
            raise RoundFailed("no client returned a valid update")
        total = sum(w for w, _ in parsed.values())
        mean = np.zeros(self.size)
        for w, u in parsed.values():  # in place (each u is this call's own copy): no temporary per client
            u *= w / total
            mean += u
        clock.lap("sum")
        info = {"survived": len(parsed), "dropped": len(self.sampled) - len(parsed), "stage_seconds": clock.laps}
        return Aggregate(mean, total, list(parsed), info)


@dataclass
class _MaskedRound:
    ids: dict[int, int]  # node -> its id in the masking session
    srv: P.ServerRound
    qcfg: QuantConfig
    sampled: int
    names: list[str]  # the tensors of the update's parts, in order

    @property
    def node_of(self) -> dict[int, int]:
        return {i: n for n, i in self.ids.items()}


class MaskedSum:
    """Masked updates, their unmask exchange and the sum (``secagg.protocol``); a node whose shares cannot be
    opened or rebuilt fails the round and is banned."""

    def __init__(
        self, nodes: Nodes, secagg: SecAggSettings, max_weight: int, console: Console, rng: np.random.Generator,
        weight_key: str = "num-examples",
    ) -> None:  # fmt: skip
        self.nodes, self.secagg, self.max_weight, self.console, self.rng = nodes, secagg, max_weight, console, rng
        self.weight_key = weight_key  # the metric nodes weigh by: part of a signed round's training configuration
        self.round: _MaskedRound | None = None
        self.ranges = Ranges(secagg.clip)
        self.moved = 0.0  # how far the last completed round moved the global model (the norm of its mean update)
        self.revealed = False  # this round's nodes were asked to reveal shares
        self.scale = 1.0  # of the step after a failed round: doubled by each replay refusal since a completed round

    def after_failure(self, flat: np.ndarray) -> np.ndarray | None:
        """After a round that failed once its nodes revealed shares, a random step for the global model (``flat``):
        half of what the last completed round moved it (a hundredth of the model's norm before any). Those nodes
        refuse the unchanged model, and a server lying about a failure could take another sum from it; past the
        replay check's 2% of an update, the step changes the model no more than a round's noise. A step too small
        for some node (it refused the model as a replay) is followed by one twice as large (64 times at most).
        None when the round failed before unmask (nobody revealed) and no node refused a replay: the model stays."""
        # a node names a replay in its error reason, which a hostile node can write too: refusals count from more
        # than half of the round's nodes (a replay makes every node that trained from the model refuse it)
        replays = sum("Replay:" in why for why in self.nodes.failures.get(wire.TRAIN, []))
        refused = self.round is not None and replays > self.round.sampled / 2
        if not self.revealed and not refused:
            return None
        self.scale = min(self.scale * (2.0 if refused else 1.0), 64.0)
        base = 0.5 * self.moved or 1e-2 * float(np.linalg.norm(flat)) or 1e-3 * flat.size**0.5  # a zero model too
        size = base * self.scale
        step = self.rng.standard_normal(flat.size)
        return step * (size / max(float(np.linalg.norm(step)), 1e-300))

    def setup(self, r: int, sampled: list[int], tensors: Tensors, inner: Inner) -> dict[int, dict[str, Any]]:
        """The round's masking state, and for each node the records its train message adds: the quantization
        (in its SM record: bits, weights and one range per tensor, ``secagg.ranges``), the round's configuration
        (which binds the quantization's digest into every key) and its neighbours' public keys (``inner``: the
        inner strategy's train messages, whose training configuration a signed round binds). Fewer than 2
        nodes fail the round: a lone update would be its own sum, and the protocol's threshold needs 2 holders."""
        self.round, self.revealed = None, False
        if len(sampled) < 2:
            raise RoundFailed(f"{len(sampled)} node(s) can take part in this round's masking; it needs at least 2")
        sc, keys = self.secagg, self.nodes.keys
        ids = {n: self.nodes.ids[n] for n in sampled}
        groups = self.nodes.groups.of_round(ids.values())
        graph, threshold = P.neighbour_graph(tuple(sorted(ids.values())), sc.graph, self.rng, groups)
        if groups and len(sampled) - max(len(g) for g in groups) < threshold:
            self.console.print(f"  [yellow]round {r}: {len(sampled)} nodes in groups of up to {max(map(len, groups))}, "
                               f"threshold {threshold}: one lost node fails the round[/]")  # fmt: skip
        parts = self.ranges.parts(tensors)
        bits = round_bits(sc.bits, len(sampled), self.max_weight, self.ranges.summed)
        qcfg = QuantConfig.of_parts(parts, bits, self.max_weight, len(sampled))
        size = qcfg.size + qcfg.extra
        cfg = P.RoundConfig(keys.session, r, graph, threshold, size, qcfg.modulus_bits, qcfg.digest(), groups,
                            *self._signed(ids, threshold, inner))  # fmt: skip
        quant = {
            "ranges": [c for _, c in parts], "bits": bits, "max-weight": self.max_weight,
            "max-clients": len(sampled),
        }  # fmt: skip
        self.round = _MaskedRound(ids, P.ServerRound(cfg), qcfg, len(sampled), [n for n, _, _ in tensors])
        return {
            n: {
                wire.SM: quant,
                wire.SECAGG: wire.round_config_record(cfg, ids[n]),
                wire.PAYLOAD: wire.key_map(keys.for_client(cfg, ids[n]), keys.adverts_for(cfg, ids[n])),
            }
            for n in sampled
        }

    def _signed(self, ids: dict[int, int], threshold: int, inner: Inner) -> tuple[Any, ...]:
        """The malicious threat's part of a round (``RoundConfig``): the roster, each client's member, the
        signatures a node needs (``secagg.signers`` of the round's nodes, two thirds at least), every client's
        session keys and the one training configuration the nodes are sent."""
        roster, keys = self.nodes.roster, self.nodes.keys
        if self.secagg.threat != "malicious":
            return ()
        if roster is None:
            raise RuntimeError("secagg.threat = malicious needs the roster (SecureMark(roster=...))")
        train = {wire.train_digest(m.content, self.weight_key) for m in inner.values()}
        if len(train) != 1:
            raise RoundFailed("the inner strategy sent nodes different training configurations; a signed round "
                              "sends every node one")  # fmt: skip
        n, clients = len(ids), sorted(ids.values())
        members = tuple((i, keys.adverts[i][0]) for i in clients)
        signers = P.signers_needed(n, threshold, self.secagg.signers)
        public = tuple((i, *keys.keys[i]) for i in clients)
        return roster.digest, members, signers, public, next(iter(train))

    def need(self) -> Need:
        """Masked inputs enough to wait only the grace for the rest: the threshold, counted in whole groups (a
        group missing one input is not summed, so a straggler of a group is worth waiting for)."""
        if self.round is None:
            return 1
        cfg, ids = self.round.srv.cfg, self.round.ids
        if not cfg.groups:
            return cfg.threshold

        def enough(nodes: set[int]) -> bool:
            got = {ids[n] for n in nodes if n in ids}
            return sum(set(cfg.group_of(i)) <= got for i in got) >= cfg.threshold

        return enough

    def _signatures(self, r: int, survivors: tuple[int, ...], node_of: dict[int, int]) -> dict[int, bytes]:
        """The malicious threat's third exchange: every survivor's signature of the survivor list and the round's
        configuration; fewer than the round's ``signers`` fail the round before anything is revealed."""
        assert self.round is not None and self.nodes.roster is not None
        cfg, roster = self.round.srv.cfg, self.nodes.roster
        ask = {node_of[i]: RecordDict({wire.PAYLOAD: ConfigRecord({"survivors": list(survivors), "round": r})})
               for i in survivors}  # fmt: skip
        statement = P.survivors_statement(cfg, survivors)
        out = {}
        for n, rep in self.nodes.send(wire.SIGN, ask, r, self.secagg.timeout, need=cfg.signers).items():
            i = self.round.ids.get(n)
            if i in survivors and (sig := accept(self.console, n, _apply_signature, cfg, statement, roster, i,
                                                 rep.content)) is not None:  # fmt: skip
                out[i] = sig
        if len(out) < cfg.signers:
            raise P.TooFewSurvivors(f"{len(out)} of {len(survivors)} survivors signed them, {cfg.signers} needed")
        return out

    def resume(self, rounds: list[dict[str, Any]]) -> None:
        """The ranges a resumed run widened so far (each round's metrics name them)."""
        self.ranges.replay(rounds)

    def collect(self, r: int, replies: dict[int, Message], clock: StageClock) -> Aggregate:
        st = self.round
        if st is None:
            raise RuntimeError("MaskedSum.collect before a setup that succeeded")
        srv, ids, node_of = st.srv, st.ids, st.node_of
        for n, rep in replies.items():
            if n in ids:  # a reply to a message this round sent
                accept(self.console, n, _apply_masked, srv, ids[n], rep.content)
        survivors = P.server_close_inputs(srv)
        clock.lap("train")
        signatures = self._signatures(r, survivors, node_of) if srv.cfg.malicious else {}
        if signatures:
            clock.lap("sign")
        unmask = {
            node_of[i]: RecordDict(
                {
                    wire.PAYLOAD: ConfigRecord({"survivors": list(survivors), "round": r}),
                    wire.SHARES: wire.bytes_map(P.server_shares_for(srv, i)),
                    **({wire.SIGNATURES: wire.bytes_map(signatures)} if signatures else {}),
                }
            )
            for i in survivors
        }
        self.revealed = True
        for n, rep in self.nodes.send(wire.UNMASK, unmask, r, self.secagg.timeout, need=srv.cfg.threshold).items():
            if n in ids:
                accept(self.console, n, _apply_unmask, srv, ids[n], rep.content)
        for why in srv.rejected:
            self.console.print(f"  [yellow]rejected {why}[/]")
        clock.lap("unmask")
        try:
            total = P.server_sum(srv)
        except P.BadOwner as exc:
            self.nodes.ban(node_of[exc.client], f"its shares cannot be opened or rebuilt ({exc})")
            raise
        dec = decode(total, st.qcfg, len(survivors))
        clock.lap("sum")
        self.moved, self.scale = float(np.linalg.norm(dec.mean)), 1.0
        widened = self.ranges.grow(st.names, dec.clipped_parts)
        share = dec.clipped / (len(survivors) * st.qcfg.size)
        if share > CLIPPED_WARN:
            self.console.print(
                f"  [yellow]{dec.clipped:,} update values clipped ({share:.1e} of those sent) in {len(widened)} "
                f"tensor(s) ({', '.join(widened[:3])}{', ...' if len(widened) > 3 else ''}): this round's mean is "
                f"biased there. Their ranges grow {GROWTH:g}x from the next round (4096x at most); to keep a first "
                "round unclipped, "
                "raise secagg.clip (the smallest range) or lower the learning rate[/]"
            )
        info = {
            "survived": len(survivors),
            "dropped": st.sampled - len(survivors),
            "clipped": dec.clipped,
            "clipped_share": share,
            "bits": st.qcfg.bits,
            "widened": widened,
            "threshold": srv.cfg.threshold,
            "stage_seconds": clock.laps,
        }
        return Aggregate(dec.mean, dec.total_weight, [node_of[i] for i in survivors], info)


def _apply_signature(cfg: P.RoundConfig, statement: bytes, roster: Roster, i: int, content: RecordDict) -> bytes:
    with wire.malformed("signature reply"):
        signature = content[wire.PAYLOAD]["signature"]
    if not roster.verify(cfg.member(i), signature, statement):
        raise P.SignatureError(f"client {i}'s signature of the survivors does not verify")
    return signature  # type: ignore[no-any-return]


def _apply_masked(srv: P.ServerRound, i: int, content: RecordDict) -> None:
    """The masked vector of a train reply, checked against the checksum securemark_mod attached."""
    with wire.malformed("masked reply"):
        y, crc = wire.array_from(content[wire.UPDATE]), content[wire.SM]["crc32"]
        masked = wire.masked_from(y, content[wire.PAYLOAD])
        if y.dtype != srv.cfg.dtype or y.ndim != 1:  # before the checksum reads its bytes (a datetime64 array)
            raise TypeError(f"a masked vector of {y.dtype} {y.shape}, not {srv.cfg.dtype.__name__}")
    if isinstance(crc, bool) or not isinstance(crc, int) or wire.checksum(y) != crc:
        raise P.ProtocolViolation("masked update changed after securemark_mod (must be the first mod)")
    P.server_receive_masked(srv, i, masked)


def _apply_unmask(srv: P.ServerRound, i: int, content: RecordDict) -> None:
    with wire.malformed("unmask reply"):
        reveals, bad = wire.reveals_from(content[wire.PAYLOAD])
    P.server_receive_unmask(srv, i, reveals, bad)


def _plain_update(content: RecordDict, size: int, max_weight: int) -> tuple[int, np.ndarray]:
    with wire.malformed("plain reply"):
        weight, update = content[wire.SM]["weight"], wire.array_from(content[wire.UPDATE]).astype(np.float64)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= max_weight:
        raise P.ProtocolViolation(f"weight must be a whole number in [1, {max_weight}]")
    if update.shape != (size,) or not np.isfinite(update).all():
        raise P.ProtocolViolation(f"update must be {size} finite values")
    return weight, update
