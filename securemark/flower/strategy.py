"""``SecureMark``: securemark's server side as a Flower Strategy that wraps a Message-API strategy.

    strategy = SecureMark(FedAvg(fraction_evaluate=0.5), out="/srv/owner/run1")
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3, evaluate_fn=evaluate)

The inner strategy keeps what it owns: sampling, the configs it sends, how metrics are aggregated, and any
server optimizer (FedAvgM, FedAdam, ...). SecureMark changes what travels. One round:

1. the inner strategy's ``configure_train`` samples nodes and builds its messages;
2. each sampled node is identified as a customer (its claimed partition-id, or on a SuperLink with SuperNode
   authentication its registered key); a node claiming an identity already taken, or whose identity changes,
   is refused and gets nothing;
3. masked rounds (``secagg.protocol``): a node sets up long-term keys once per run, in the hello that identifies
   it; each round's train message carries the customer's copy ``w + s X^T b_customer``, the round's graph and
   the neighbours' public keys; the reply is the masked update relative to that copy (``securemark_mod``) with
   the encrypted shares of its round secrets; one unmask exchange follows: two exchanges per round. The server
   learns only the weighted mean of the updates. Each exchange waits for every reply, or for the threshold plus
   ``secagg.grace`` seconds, never longer than ``secagg.timeout``;
4. the inner strategy aggregates one synthetic reply holding ``w + mean update`` with the total weight, so its
   server optimizer and metric aggregation run unchanged, and the fingerprints never enter the global model;
5. client evaluation gets fingerprinted copies (never the plain global model); ``evaluate_fn`` scores the
   global model and a few customers' copies.

Every model copies are made from (each round's global model) is kept in the registry as a base, so a copy of any
round traces against the model it was made from. At the end ``out`` holds what ``securemark simulate`` writes:
``registry/`` (with the owner key), ``customers/<customer>.safetensors`` (every customer's final copy),
``metrics.json`` and ``global.safetensors``.
After every round ``out/checkpoint/`` holds the global model, the round, the fingerprint strength, the metrics so
far, the graph RNG and the inner strategy's optimizer state; ``start(resume=True)`` goes on from there with the
same registry, key and strength, so copies issued before a crash still trace. A kill at any instant leaves the
previous checkpoint or the new one (files by round, then ``state.json`` replaced atomically). The masking
session is not resumed: it is new after a restart, and every node is re-keyed in its first hello.

Inner strategies whose aggregate is not a weighted mean of updates need the individual updates that masking
hides; they are refused with the reason. Client metrics travel in clear and are averaged without weights:
the example counts are secret.

Over 400 lines and several jobs (identity, exchange with deadlines, the masked round, checkpoints, metrics):
its split into parts behind a thin wrapper is its own piece of work (the docs-and-structure issue), landed
before the other open issues edit it, never beside them.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, Strategy
from rich.console import Console

from securemark import models, training
from securemark.config import FingerprintConfig, SecAggSettings
from securemark.fingerprint.embed import Fingerprinter
from securemark.fingerprint.function import FunctionMark, FunctionMarkUnfit, features_and_logits
from securemark.flower import wire
from securemark.modelio import load_state_dict, save_state_dict
from securemark.owner import (
    FunctionSpec,
    add_earlier_base,
    customer_name,
    establish_function_mark,
    issue_copies,
    mark,
    spec_module,
)
from securemark.registry import Registry, RegistryParams
from securemark.secagg import protocol as P
from securemark.secagg.quantize import QuantConfig, decode

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
IDENTITIES = ("partition-id", "node")

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


class SecureMark(Strategy):
    """Per-customer fingerprinted copies and masked aggregation around ``strategy`` (see the module doc)."""

    def __init__(
        self,
        strategy: Strategy,
        out: str | Path,
        *,
        fingerprint: FingerprintConfig | None = None,
        secagg: SecAggSettings | None = None,
        identity: str = "partition-id",
        max_weight: int = 1 << 16,
        console: Console | None = None,
        function: FunctionSpec | None = None,
    ) -> None:
        check_inner(strategy)
        if identity not in IDENTITIES:
            raise ValueError(f"identity must be one of {IDENTITIES}, got {identity!r}")
        if not 1 <= max_weight <= 1 << 32:
            raise ValueError(
                f"max_weight (largest example count a client may declare) must be in [1, 2^32], got {max_weight}"
            )
        self.inner: FedAvg = strategy  # type: ignore[assignment]
        self.out = Path(out)
        self.fingerprint = fingerprint if fingerprint is not None else FingerprintConfig()
        self.secagg = secagg if secagg is not None else SecAggSettings()
        self.identity, self.max_weight = identity, max_weight
        self.function = function  # copies also carry the black-box mark (fingerprint.function) when given
        self.console = console or Console(stderr=True)
        self.rng = np.random.default_rng()  # neighbour graphs and simulated losses: nothing secret
        self.customers: dict[int, str] = {}  # node id -> customer
        self.ids: dict[int, int] = {}  # node id -> its id in the masking session (a Shamir x-coordinate)
        self.keys = P.SessionKeys(os.urandom(16).hex())  # this run's session: long-term public keys of the nodes
        self.bits: dict[int, np.ndarray] = {}  # node id -> its code row (read from the registry once)
        self.refused: set[int] = set()
        self.banned: set[str] = set()  # customers refused for misbehaving (kept across a resume)
        self.registry: Registry | None = None
        self.fp: Fingerprinter | None = None
        self.strength = 0.0
        self.rounds: list[dict[str, Any]] = []
        self._grid: Grid | None = None
        self._timeout = 3600.0  # start's: how long its first round waits for the nodes the inner strategy asks for
        self._first_round = 1
        self._round: dict[str, Any] = {}
        self._loaded: ArrayRecord | None = None
        self._based: tuple[ArrayRecord | None, np.ndarray] | None = None  # (weights, projection) kept as a base
        self._fm: tuple[ArrayRecord | None, tuple[FunctionMark, str] | None] | None = None  # (weights, their mark)
        self._fm_refused = ""  # why the last model could not carry a function mark (said once per reason)
        self.dtypes: dict[str, torch.dtype] = {}

    # --- the global model as a torch state_dict ----------------------------------------------------------------
    def _load(self, arrays: ArrayRecord) -> None:
        """``self.weights`` from ``arrays`` (decoded once per record: start and both configure steps pass it)."""
        if arrays is self._loaded:
            return
        sd = arrays.to_torch_state_dict()
        if not self.dtypes:
            self.dtypes = {k: v.dtype for k, v in sd.items()}
            self.names = training.float_names(sd)
            self.size = sum(sd[n].numel() for n in self.names)
        self.weights = {k: v.to(self.dtypes[k]) for k, v in sd.items()}  # an inner aggregate turns ints into floats
        self._loaded = arrays

    def _record_base(self, after: int) -> np.ndarray | None:
        """Keep the weights copies are about to be made from in the registry (once per model), so a copy of
        any round traces against its own base; their projection h = X w, or None without fingerprints."""
        if self.fp is None or self.registry is None:
            return None
        if self._based is None or self._based[0] is not self._loaded:
            label = f"global model after round {after}"
            base = add_earlier_base(self.registry, self.fp, self.weights, self.strength, label)
            self._based = (self._loaded, base.reference)
        return self._based[1]

    def _function_mark(self) -> tuple[FunctionMark, str] | None:
        """The function mark of the current weights (fitted and recorded once per model), or None. A model the
        mark cannot be fitted to (FunctionMarkUnfit: no linear head, features NaN on the held-out data, too few
        held-out inputs to read it) gets copies with the white-box mark alone and one logged line, never a
        failed round. A spec that names another model is the caller's mistake: :meth:`start` stops on it."""
        if self.function is None or self.registry is None:
            return None
        if self._fm is None or self._fm[0] is not self._loaded:
            try:
                self._fm = (self._loaded, establish_function_mark(self.registry, self.weights, self.function))
            except FunctionMarkUnfit as exc:  # a mistake of the caller's (another model, a bad budget) stays loud
                self._fm = (self._loaded, None)
                if str(exc) != self._fm_refused:
                    self._fm_refused = str(exc)
                    self.console.print(f"  [yellow]copies of this model carry no function mark: {exc}. Black-box "
                                       "tracing cannot read them; white-box tracing can (fingerprint.function_budget"
                                       " = 0 turns the function mark off)[/]")  # fmt: skip
        return self._fm[1]

    def copy_for(self, node: int) -> dict[str, torch.Tensor]:
        if self.fp is None:
            return self.weights
        if node not in self.bits:
            self.bits[node] = self.registry.customer(self.customers[node]).bits  # type: ignore[union-attr]
        return mark(self.fp, self.strength, self._function_mark(), self.weights, self.bits[node])

    # --- messaging ------------------------------------------------------------------------------------------
    @property
    def grid(self) -> Grid:
        if self._grid is None:
            raise RuntimeError("SecureMark talks to nodes only inside start(grid=...)")
        return self._grid

    def send(
        self, stage: str, contents: dict[int, RecordDict], round_no: int, timeout: float, need: int | None = None
    ) -> dict[int, Message]:
        """One message per node, the stage named in its SM record; see :meth:`receive`."""
        msgs = []
        for node, content in contents.items():
            content[wire.SM] = ConfigRecord({**content.get(wire.SM, {}), "stage": stage})
            msgs.append(Message(content, dst_node_id=node, message_type=wire.MESSAGE_TYPE, group_id=str(round_no)))
        return self.receive(stage, msgs, timeout, need)

    def receive(
        self, stage: str, msgs: Iterable[Message], timeout: float, need: int | None = None
    ) -> dict[int, Message]:
        """Replies without error whose sender's identity still holds; ``secagg.dropout`` simulates losses. A node
        that fails a masked stage is re-keyed before it takes part again (it may have lost its keys)."""
        replies: dict[int, Message] = {}
        got = self.exchange(msgs, timeout, need)
        registered = self._registered() if self.identity == "node" and stage != wire.HELLO else {}
        for reply in got:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.console.print(f"  [yellow]node {node} failed at {stage}: {reply.error.reason}[/]")
                if stage != wire.HELLO:
                    self.keys.forget(self.ids.get(node, 0))
            elif stage != wire.HELLO and not self._claim_holds(node, reply, registered):
                continue
            elif self.rng.random() >= self.secagg.dropout:
                replies[node] = reply
        return replies

    def exchange(self, msgs: Iterable[Message], timeout: float, need: int | None = None) -> list[Message]:
        """Grid.send_and_receive with deadlines: every reply, or once ``need`` good replies are in at most
        ``secagg.grace`` seconds more (a dead node costs the grace, not the timeout), and never past ``timeout``.
        Polls from 2 ms, 1.25x longer each time, at most every 50 ms, instead of a fixed 0.1 s (simulation) or
        3 s (deployment): a reply is seen at most 25% of the wait or 50 ms after it came (a 0.25 s cap let a
        1 s round see its replies up to 0.25 s late), at 20 pulls a second while waiting long."""
        pending: set[str] = set()
        for msg in msgs:  # one at a time: a message made while the first ones are on their way goes out when made
            pending.update(self.grid.push_messages([msg]))
        replies: list[Message] = []
        end, wait, good = time.monotonic() + timeout, 0.002, 0
        while pending and time.monotonic() < end:
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            good += sum(not m.has_error() for m in got)
            if need is not None and good >= need:
                end = min(end, time.monotonic() + self.secagg.grace)
            if pending:
                time.sleep(wait)
                wait = min(wait * 1.25, 0.05)
        return replies

    # --- customers ------------------------------------------------------------------------------------------
    def identify(self, nodes: Iterable[int]) -> list[int]:
        """The nodes that may take part: new ones are identified (a hello, or their registered key); under
        masking, a hello also sets up the node's long-term keys (new nodes, and nodes that lost theirs)."""
        nodes = list(nodes)
        masked = self.secagg.enabled
        new = [n for n in nodes if n not in self.customers and n not in self.refused]
        ask = new + [n for n in nodes if masked and n in self.customers and self.ids.get(n) not in self.keys.keys]
        replies = self._hello(ask) if ask and (masked or self.identity == "partition-id") else {}
        registered = self._registered() if self.identity == "node" and (new or replies) else {}  # one request
        if new:
            if self.identity == "node":
                claims = {n: registered.get(n) for n in new}
            else:
                claims = {n: _claimed(replies[n]) for n in new if n in replies}
            self._admit(claims)
        for node, reply in replies.items():
            if not masked or node not in self.customers:
                continue
            if node not in new and not self._claim_holds(node, reply, registered):
                continue
            if _accept(self.console, node, _apply_keys, self.keys, self.ids[node], reply.content) is None:
                self._refuse(node, "its keys were refused")
        return [n for n in nodes if n in self.customers and (not masked or self.ids.get(n) in self.keys.keys)]

    def _admit(self, claims: dict[int, str | None]) -> None:
        taken = set(self.customers.values())
        for node, name in claims.items():
            twins = [m for m, other in claims.items() if other == name and m != node]
            if name in self.banned:
                self._refuse(node, f"customer {name!r} was refused earlier in this run")
            elif name is None or name in taken or twins:
                self._refuse(node, "no identity" if name is None else f"identity {name!r} is already taken")
            else:
                self.customers[node] = name

    def _refuse(self, node: int, why: str) -> None:
        self.console.print(f"  [red]refused node {node}: {why}; it gets no copy[/]")
        self.customers.pop(node, None)
        self.keys.forget(self.ids.get(node, 0))
        self.refused.add(node)

    def _hello(self, nodes: list[int]) -> dict[int, Message]:
        """Identity claims; under masking, each node's long-term keys for this session (under its session id)."""
        contents = {}
        for n in nodes:
            contents[n] = RecordDict()
            if self.secagg.enabled:
                self.ids.setdefault(n, len(self.ids) + 1)
                contents[n][wire.SESSION] = ConfigRecord({"session": self.keys.session, "client_id": self.ids[n]})
        return self.send(wire.HELLO, contents, 0, self.secagg.timeout)

    def _registered(self) -> dict[int, str | None]:
        """Node id -> registered identity, as the SuperLink reports it now (one request)."""
        return {info.node_id: _registered_name(info) for info in self.grid.get_nodes()}

    def _claim_holds(self, node: int, reply: Message, registered: dict[int, str | None]) -> bool:
        """A reply from a node whose identity changed since it was identified is dropped; the node is refused."""
        if self.identity == "node":
            now = registered.get(node)
        else:
            now = _claimed(reply)
        if now == self.customers.get(node):
            return True
        self._refuse(node, f"identity changed from {self.customers.get(node)!r} to {now!r}")
        return False

    # --- Strategy: train ------------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterator[Message]:
        """The inner strategy's train messages, each carrying its customer's copy; under masking with the round's
        configuration and the node's neighbours' public keys (new nodes are identified and keyed first).

        Nodes are identified and the masking set up here; each copy is made as its message is taken from the
        returned iterator, so :meth:`exchange` sends the first copies while the rest are made (10 copies of a
        1M-parameter model took 0.15-0.25 s that the nodes spent waiting), and the weights they were made from
        are recorded as a base once the last is out, while the nodes train (the file and its SQLite record took
        15-70 ms). A server that dies in between resumes from the previous checkpoint: the same weights, the
        same base, recorded then."""
        self._grid = grid
        self._load(arrays)
        clock = _StageClock()
        wait = self._timeout if server_round == self._first_round else self.secagg.grace
        with self._enough_nodes(grid, wait, "min_train_nodes") as nodes:
            inner_msgs = {
                m.metadata.dst_node_id: m for m in self.inner.configure_train(server_round, arrays, config, nodes)
            }
        sampled = sorted(self.identify(inner_msgs))
        clock.lap("hello")
        self._round = {"sampled": sampled, "copies": {}, "clock": clock}
        self._round["function"] = (self._function_mark(), self.weights)  # what the copies' black-box mark is read by
        head = {"stage": wire.TRAIN, "weight-key": self.inner.weighted_by_key}
        masking = self._masking_setup(server_round, sampled) if self.secagg.enabled and sampled else {}
        clock.lap("setup")
        return self._train_messages(server_round, inner_msgs, head, masking)

    def _train_messages(
        self, r: int, inner_msgs: dict[int, Message], head: dict[str, Any], masking: dict[int, dict[str, Any]]
    ) -> Iterator[Message]:
        for n in self._round["sampled"]:
            copy = self._round["copies"][n] = self.copy_for(n)
            content = _with_arrays(inner_msgs[n].content, ArrayRecord(copy))
            extra = masking.get(n, {})
            content[wire.SM] = ConfigRecord({**head, **extra.pop(wire.SM, {})})
            for key, record in extra.items():
                content[key] = record
            yield Message(content, dst_node_id=n, message_type=wire.MESSAGE_TYPE, group_id=str(r))
        self._round["reference"] = self._record_base(r - 1)

    def _masking_setup(self, r: int, sampled: list[int]) -> dict[int, dict[str, Any]]:
        """The round's masking state, and for each node the records its train message adds: the quantization
        (in its SM record), the round's configuration and its neighbours' public keys."""
        sc = self.secagg
        ids = {n: self.ids[n] for n in sampled}
        graph, threshold = P.neighbour_graph(tuple(sorted(ids.values())), sc.graph, self.rng)
        qcfg = QuantConfig(sc.clip, sc.bits, self.max_weight, len(sampled), self.size)
        cfg = P.RoundConfig(self.keys.session, r, graph, threshold, self.size + 2, qcfg.modulus_bits)
        quant = {"clip": sc.clip, "bits": sc.bits, "max-weight": self.max_weight, "max-clients": len(sampled)}
        self._round.update(
            ids=ids, node_of={i: n for n, i in ids.items()}, srv=P.ServerRound(cfg), qcfg=qcfg, threshold=threshold
        )
        return {
            n: {
                wire.SM: quant,
                wire.SECAGG: wire.round_config_record(cfg, ids[n]),
                wire.PAYLOAD: wire.key_map(self.keys.for_client(cfg, ids[n])),
            }
            for n in sampled
        }

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask (masked rounds) or average (plain) the updates; the inner strategy aggregates the result."""
        got = {m.metadata.src_node_id: m for m in replies}
        if self.secagg.enabled:
            mean, weight, counted, info = self._unmask(server_round, got)
        else:
            mean, weight, counted, info = self._plain_mean(got)
        self._round["info"] = info
        client = _mean_metrics([_metrics_of(got[n]) for n in counted])  # only nodes whose update counted
        new = training.add_flat(self.weights, self.names, mean)
        if not all(bool(torch.isfinite(v).all()) for v in new.values() if v.is_floating_point()):
            raise ArithmeticError("the aggregate update overflows the model's dtype; the model is left unchanged")
        synthetic = Message(
            RecordDict(
                {
                    self.inner.arrayrecord_key: ArrayRecord(new),
                    "metrics": MetricRecord({**client, self.inner.weighted_by_key: weight}),
                }
            ),
            dst_node_id=0,
            message_type=wire.MESSAGE_TYPE,
        )
        return self.inner.aggregate_train(server_round, [synthetic])

    def _plain_mean(self, replies: dict[int, Message]) -> tuple[np.ndarray, int, list[int], dict[str, Any]]:
        clock = self._round["clock"]
        clock.lap("train")
        parsed: dict[int, tuple[int, np.ndarray]] = {}
        for n, rep in replies.items():
            got = _accept(self.console, n, _plain_update, rep.content, self.size, self.max_weight)
            if got is not None:
                parsed[n] = got
        if not parsed:
            raise RuntimeError("no client returned a valid update")
        total = sum(w for w, _ in parsed.values())
        mean = np.zeros(self.size)
        for w, u in parsed.values():  # in place (each u is this call's own copy): no temporary per client
            u *= w / total
            mean += u
        clock.lap("sum")
        sampled = len(self._round["sampled"])
        info = {"survived": len(parsed), "dropped": sampled - len(parsed), "stage_seconds": clock.laps}
        return mean, total, list(parsed), info

    def _unmask(self, r: int, replies: dict[int, Message]) -> tuple[np.ndarray, int, list[int], dict[str, Any]]:
        st = self._round
        if "srv" not in st:
            raise P.TooFewSurvivors("no client took part in this round's masking")
        srv, ids, node_of, clock = st["srv"], st["ids"], st["node_of"], st["clock"]
        for n, rep in replies.items():
            if n in ids:  # a reply to a message this round sent
                _accept(self.console, n, _apply_masked, srv, ids[n], rep.content)
        survivors = P.server_close_inputs(srv)
        clock.lap("train")
        unmask = {
            node_of[i]: RecordDict(
                {
                    wire.PAYLOAD: ConfigRecord({"survivors": list(survivors), "round": r}),
                    wire.SHARES: wire.bytes_map(P.server_shares_for(srv, i)),
                }
            )
            for i in survivors
        }
        for n, rep in self.send(wire.UNMASK, unmask, r, self.secagg.timeout, need=srv.cfg.threshold).items():
            if n in ids:
                _accept(self.console, n, _apply_unmask, srv, ids[n], rep.content)
        for why in srv.rejected:
            self.console.print(f"  [yellow]rejected {why}[/]")
        clock.lap("unmask")
        try:
            total = P.server_sum(srv)
        except P.BadOwner as exc:
            node = node_of[exc.client]
            if node in self.customers:
                self.banned.add(self.customers[node])
            self._refuse(node, f"its shares cannot be opened or rebuilt ({exc})")
            raise
        dec = decode(total, st["qcfg"], len(survivors))
        clock.lap("sum")
        sampled = len(st["sampled"])
        info = {
            "survived": len(survivors),
            "dropped": sampled - len(survivors),
            "clipped": dec.clipped,
            "threshold": st["threshold"],
            "stage_seconds": clock.laps,
        }
        return dec.mean, dec.total_weight, [node_of[i] for i in survivors], info

    # --- Strategy: evaluate ---------------------------------------------------------------------------------
    @contextmanager
    def _enough_nodes(self, grid: Grid, wait: float, minimum: str) -> Iterator[Grid]:
        """The grid as the inner strategy may see it while it samples: the nodes connected now, frozen.

        Flower's FedAvg family waits forever until ``min_available_nodes`` (and its per-stage minimum) are
        connected: one SuperNode that dies mid-run would hang every later round, and so would a node leaving
        between a count and the sampling. So wait for them at most ``wait`` seconds (the first round of a run
        or a resumed run: the ``start`` timeout, nodes may still be starting; later: ``secagg.grace``), then
        hand the inner strategy a view of the grid whose node list does not change while it samples, with its
        minimums lowered for this call only when fewer are connected; fail when fewer than 2 are."""
        names = [n for n in ("min_available_nodes", minimum) if isinstance(getattr(self.inner, n, None), numbers.Real)]
        want = max([math.ceil(getattr(self.inner, n)) for n in names], default=0)  # finite: check_inner
        end = time.monotonic() + wait
        while len(nodes := list(grid.get_node_ids())) < want and time.monotonic() < end:
            time.sleep(0.5)
        view = _NodesNow(grid, nodes)
        if len(nodes) >= want:
            yield view
            return
        if len(nodes) < 2:
            raise RuntimeError(f"{len(nodes)} node(s) connected, the strategy asks for {want}")
        self.console.print(
            f"  [yellow]{len(nodes)} of the {want} nodes the strategy asks for are connected: sampling those[/]"
        )
        saved = {n: getattr(self.inner, n) for n in names}
        try:
            for n in names:
                setattr(self.inner, n, min(saved[n], len(nodes)))
            yield view
        finally:
            for n, v in saved.items():
                setattr(self.inner, n, v)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """The inner strategy's evaluate messages, each with its customer's copy instead of the global model."""
        self._grid = grid
        self._load(arrays)
        with self._enough_nodes(grid, self.secagg.grace, "min_evaluate_nodes") as nodes:
            inner_msgs = {
                m.metadata.dst_node_id: m for m in self.inner.configure_evaluate(server_round, arrays, config, nodes)
            }
        if inner_msgs:
            self._record_base(server_round)
        return [
            Message(_with_arrays(inner_msgs[n].content, ArrayRecord(self.copy_for(n))), dst_node_id=n,
                    message_type=inner_msgs[n].metadata.message_type, group_id=str(server_round))
            for n in self.identify(inner_msgs)
        ]  # fmt: skip

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()

    # --- the run --------------------------------------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
        resume: bool = False,
    ) -> Result:
        """Run ``num_rounds`` rounds (see the module doc); write ``out``; return Flower's Result. With ``resume``,
        go on from the last checkpoint in ``out`` (``initial_arrays`` then gives only names and dtypes)."""
        self._grid, self._timeout = grid, timeout
        self._load(initial_arrays)
        done = self._restore(num_rounds) if resume else 0
        self._first_round = done + 1
        if self.function is not None:
            spec_module(self.function, self.weights)  # a spec that names another model stops the run here
        if not resume:
            if (self.out / "metrics.json").exists() or (self.out / "registry").exists():
                raise FileExistsError(f"{self.out} already holds a run; choose another output directory")
            self.out.mkdir(parents=True, exist_ok=True)
            self._setup_fingerprint()
        train_config = train_config if train_config is not None else ConfigRecord()
        evaluate_config = evaluate_config if evaluate_config is not None else ConfigRecord()
        arrays = ArrayRecord(self.weights) if resume else initial_arrays
        result = Result(arrays=arrays)
        if not resume and evaluate_fn is not None and (res := evaluate_fn(0, initial_arrays)) is not None:
            result.evaluate_metrics_serverapp[0] = res
        for r in range(done + 1, num_rounds + 1):
            m: dict[str, Any] = {"round": r, "sampled": 0}
            self._round = {}  # a round that fails early leaves no copies of the previous one to score
            start = time.perf_counter()
            try:
                msgs = self.configure_train(r, arrays, ConfigRecord(dict(train_config)), grid)
                m["sampled"] = len(self._round["sampled"])
                need = self._round.get("threshold", len(self._round["sampled"]) // 2 + 1)
                agg, metrics = self.aggregate_train(r, self.receive(wire.TRAIN, msgs, timeout, need).values())
                if agg is None:
                    raise RuntimeError("the inner strategy aggregated nothing")
                arrays = result.arrays = agg
                if metrics is not None:
                    result.train_metrics_clientapp[r] = metrics
                    m["client_train"] = dict(metrics)
                m.update(self._round["info"], status="completed")
            except (P.SecAggError, RuntimeError, ValueError, ArithmeticError) as exc:  # the round fails, not the run
                m.update(status="failed", reason=str(exc))
                self.console.print(f"  [red]round {r} failed, model unchanged: {exc}[/]")
            m["seconds"] = round(time.perf_counter() - start, 3)
            self._load(arrays)
            m.update(self._evaluate(r, arrays, evaluate_fn, result))
            try:
                evaluate_msgs = self.configure_evaluate(r, arrays, ConfigRecord(dict(evaluate_config)), grid)
            except RuntimeError as exc:  # too few nodes connected: no client evaluation this round
                self.console.print(f"  [yellow]client evaluation of round {r} skipped: {exc}[/]")
                evaluate_msgs = []
            if evaluate_msgs:
                agg_eval = self._client_evaluation(r, evaluate_msgs, timeout)
                if agg_eval:
                    result.evaluate_metrics_clientapp[r] = agg_eval
                    m["client_evaluate"] = dict(agg_eval)
            self.rounds.append(m)
            self.console.print(_round_line(m), soft_wrap=True)
            _atomic_write(self.out / "metrics.json", json.dumps({"rounds": self.rounds}, indent=2, default=float))
            self._checkpoint(r)
        self.finish()
        return result

    # --- checkpoints ------------------------------------------------------------------------------------------
    def _checkpoint(self, r: int) -> None:
        ck = self.out / CHECKPOINT
        ck.mkdir(exist_ok=True)
        weights, inner = ck / f"round-{r}.safetensors", ck / f"round-{r}.inner.npz"
        save_state_dict(self.weights, weights)
        np.savez(inner, **_inner_state(self.inner))
        key = self.out / "registry" / "owner.key"
        state = {
            "round": r,
            "strength": self.strength,
            "rounds": self.rounds,
            "rng": self.rng.bit_generator.state,
            "banned": sorted(self.banned),
            "inner": type(self.inner).__name__,
            "registry": _sha256(key) if key.is_file() else None,  # binds the checkpoint to this owner key
            "files": {f.name: _sha256(f) for f in (weights, inner)},
        }
        _atomic_write(ck / "state.json", json.dumps(state, default=float))
        for old in ck.glob("round-*"):
            if old.name not in state["files"]:
                old.unlink()

    def _restore(self, num_rounds: int) -> int:
        """The run in ``out`` from its checkpoint: the last completed round."""
        path = self.out / CHECKPOINT / "state.json"
        if not path.is_file():
            raise FileNotFoundError(f"{self.out} holds no checkpoint to resume (expected {path})")
        state = _checked_state(path)
        for name, digest in state["files"].items():
            if _sha256(path.parent / name) != digest:
                raise ValueError(f"checkpoint file {name} in {path.parent} is damaged (its SHA-256 differs)")
        key = self.out / "registry" / "owner.key"
        if state["registry"] != (_sha256(key) if key.is_file() else None):
            raise ValueError(
                f"the checkpoint in {path.parent} belongs to another registry than {self.out / 'registry'}"
            )
        if state["inner"] != type(self.inner).__name__:
            raise ValueError(
                f"the checkpoint was made with {state['inner']}, this run wraps {type(self.inner).__name__}"
            )
        if int(state["round"]) >= num_rounds or (self.out / "global.safetensors").exists():
            raise FileExistsError(f"{self.out} holds a finished run of {state['round']} rounds; nothing to resume")
        weights = load_state_dict(path.parent / f"round-{state['round']}.safetensors")
        if {k: tuple(v.shape) for k, v in weights.items()} != {k: tuple(v.shape) for k, v in self.weights.items()}:
            raise ValueError(f"the checkpoint in {self.out} holds another model than this run's")
        self.weights = {k: v.to(self.dtypes[k]) for k, v in weights.items()}
        _restore_inner(self.inner, np.load(path.parent / f"round-{state['round']}.inner.npz"))
        self.rng.bit_generator.state = state["rng"]
        self.rounds, self.strength = list(state["rounds"]), float(state["strength"])
        self.banned = set(state["banned"])
        if self.fingerprint.enabled:
            self.registry = Registry.open(self.out / "registry")
            fc, params = self.fingerprint, self.registry.params
            if (params.code, params.length, params.max_colluders, params.eps) != (
                fc.code, fc.length, fc.max_colluders, fc.eps
            ):  # fmt: skip
                raise ValueError(f"the registry in {self.out} was made with other fingerprint settings than this run's")
            self.fp = Fingerprinter.create(self.registry.secret, params.carrier, self.weights, params.length)
        self.console.print(f"[bold]resuming[/] {self.out} after round {state['round']} of {num_rounds}")
        return int(state["round"])

    def _client_evaluation(self, r: int, msgs: list[Message], timeout: float) -> MetricRecord | None:
        try:
            return self.aggregate_evaluate(r, self.exchange(msgs, timeout))
        except Exception as exc:  # the inner strategy refuses inconsistent replies by raising
            self.console.print(f"  [yellow]client evaluation of round {r} not aggregated: {exc}[/]")
            return None

    def _setup_fingerprint(self) -> None:
        fc = self.fingerprint
        if not fc.enabled:
            return
        exclude = () if self.function is None else self.function.carrier_exclude()
        params = RegistryParams(
            code=fc.code, length=fc.length, max_colluders=fc.max_colluders, eps=fc.eps, budget=fc.budget,
            exclude=exclude,
        )  # fmt: skip
        self.registry = Registry.init(self.out / "registry", params)
        self.fp = Fingerprinter.create(self.registry.secret, params.carrier, self.weights, params.length)
        self.strength = self.fp.strength_for_budget(self.weights, fc.budget)  # fixed for the whole run

    def _evaluate(self, r: int, arrays: ArrayRecord, evaluate_fn: EvaluateFn | None, result: Result) -> dict[str, Any]:
        """``evaluate_fn`` on the global model and on copies of it for a few customers (what they get next):
        ``global_<k>``, ``copies_mean_<k>``, ``copies_min_<k>``, ``copies_<k>_drop``; the bit error of the
        copies issued this round, read against the weights they were made from."""
        out: dict[str, Any] = {}
        if evaluate_fn is not None and (res := evaluate_fn(r, arrays)) is not None:
            result.evaluate_metrics_serverapp[r] = res
            out.update({f"global_{k}": v for k, v in res.items()})
            if self.fp is not None:
                sample = sorted(self.customers)[: self.fingerprint.eval_copies]
                scores = [evaluate_fn(r, ArrayRecord(self.copy_for(n))) or {} for n in sample]
                for k, v in res.items():
                    vals = [float(s[k]) for s in scores if k in s]  # type: ignore[arg-type]
                    if vals and isinstance(v, int | float):
                        out.update({f"copies_mean_{k}": float(np.mean(vals)), f"copies_min_{k}": float(np.min(vals))})
                        out[f"copies_{k}_drop"] = float(v) - float(np.mean(vals))
        reference, issued = self._round.get("reference"), self._round.get("copies", {})
        if self.fp is not None and reference is not None and issued:
            out["max_bit_error"] = max(
                float(np.mean((self.fp.extract(copy, reference, self.strength) > 0) != self.bits[n]))
                for n, copy in issued.items()
            )
        fm, made_from = self._round.get("function", (None, None))
        if fm is not None and self.function is not None and issued:
            spec, x = self.function.model, self.function.heldout
            view = features_and_logits(models.from_spec(spec, made_from), x)  # the base's side, once for every copy
            out["min_function_cosine"] = min(
                fm[0].health(view, models.from_spec(spec, copy), self.bits[n], x) for n, copy in issued.items()
            )
        return out

    def finish(self) -> None:
        save_state_dict(self.weights, self.out / "global.safetensors")
        if self.registry is not None:
            names = sorted(self.customers.values())
            note = f"final copy, {len(self.rounds)} rounds"
            function = self.function if self._function_mark() is not None else None  # said once when refused
            copies = issue_copies(self.registry, self.weights, names, note, self.strength, function)
            for name, copy in copies.items():
                save_state_dict(copy, self.out / "customers" / f"{name}.safetensors")
            self.registry.close()


class _NodesNow:
    """A grid whose node list is frozen at what was connected when it was made (everything else is the grid's):
    what the inner strategy samples from."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


CHECKPOINT = "checkpoint"
_INNER_STATE = ("current_arrays", "momentum_vector", "m_t", "v_t")  # Flower's FedAvgM and FedOpt family


def _inner_state(inner: Strategy) -> dict[str, np.ndarray]:
    """The inner strategy's server-optimizer state as named arrays (``attr::kind::key``)."""
    out = {}
    for name in _INNER_STATE:
        value = getattr(inner, name, None)
        if isinstance(value, ArrayRecord):
            out.update({f"{name}::record::{k}": v.numpy() for k, v in value.items()})
        elif isinstance(value, dict):
            out.update({f"{name}::dict::{k}": np.asarray(v) for k, v in value.items()})
        elif isinstance(value, list):
            out.update({f"{name}::list::{i:06d}": np.asarray(v) for i, v in enumerate(value)})
    return out


def _restore_inner(inner: Strategy, arrays: Any) -> None:
    found: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key in arrays.files:
        name, kind, sub = key.split("::", 2)
        found.setdefault((name, kind), {})[sub] = arrays[key]
    for (name, kind), values in found.items():
        if kind == "record":
            setattr(inner, name, ArrayRecord({k: Array(v) for k, v in values.items()}))
        elif kind == "dict":
            setattr(inner, name, values)
        else:
            setattr(inner, name, [values[k] for k in sorted(values)])


def _checked_state(path: Path) -> dict[str, Any]:
    """state.json, every field checked: a damaged or edited checkpoint is refused, never half-used."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {path} cannot be read: {exc}") from None
    r = state.get("round") if isinstance(state, dict) else None
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"checkpoint {path}: 'round' must be a whole number >= 1")
    strength = state.get("strength")
    if not isinstance(strength, int | float) or not math.isfinite(strength) or strength < 0:
        raise ValueError(f"checkpoint {path}: 'strength' must be a finite number >= 0")
    files = state.get("files")
    expected = {f"round-{r}.safetensors", f"round-{r}.inner.npz"}
    if not isinstance(files, dict) or set(files) != expected:
        raise ValueError(f"checkpoint {path}: 'files' must name exactly {sorted(expected)} with their SHA-256")
    if not isinstance(state.get("rounds"), list) or len(state["rounds"]) != r:
        raise ValueError(f"checkpoint {path}: 'rounds' must hold the metrics of all {r} rounds")
    if not isinstance(state.get("banned"), list) or not isinstance(state.get("rng"), dict):
        raise ValueError(f"checkpoint {path}: 'banned' and 'rng' are missing or malformed")
    if "registry" not in state or not isinstance(state.get("inner"), str):
        raise ValueError(f"checkpoint {path}: 'registry' and 'inner' are missing")
    return state


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` so that a reader (or a crash) sees the old file or the new one, never a half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _claimed(reply: Message) -> str | None:
    """The customer a reply's partition-id claim names, or None for a missing or malformed claim."""
    head = reply.content.config_records.get(wire.SM)
    pid = head.get("partition-id") if head is not None else None
    return customer_name(pid) if isinstance(pid, int) and not isinstance(pid, bool) and pid >= 0 else None


def _registered_name(info: Any) -> str | None:
    """A registered node's customer: its registered name, else a digest of its public key. None for a node
    without a key (simulation, or a SuperLink without SuperNode authentication)."""
    if info is None or not getattr(info, "public_key", b""):
        return None
    name = getattr(info, "name", "")
    return name or "node-" + hashlib.sha256(info.public_key).hexdigest()[:16]


def _with_arrays(content: RecordDict, arrays: ArrayRecord) -> RecordDict:
    """A fresh copy of the inner strategy's content (FedAvg shares one object across messages) with its
    ArrayRecord replaced."""
    out = RecordDict()
    for key, rec in content.items():
        if isinstance(rec, ArrayRecord):
            out[key] = arrays
        else:
            out[key] = type(rec)(dict(rec))
    return out


def _metrics_of(reply: Message) -> dict[str, Any]:
    recs = list(reply.content.metric_records.values())
    return dict(recs[0]) if recs else {}


def _mean_metrics(records: list[dict[str, Any]]) -> dict[str, float]:
    keys = set().union(*records) if records else set()
    out = {}
    for k in sorted(keys):
        vals = [v for r in records if (v := _finite_float(r.get(k))) is not None]
        if vals:
            out[k] = float(np.mean(vals))
    return out


def _finite_float(value: Any) -> float | None:
    """A metric as a finite float, or None (not a number, a bool, too large for a float, NaN, infinite)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        out = float(value)
    except OverflowError:
        return None
    return out if math.isfinite(out) else None


def _accept(console: Console, node: int, parse_and_apply: Callable[..., Any], *args: Any) -> Any:
    """Parse and apply one node's reply; anything malformed (a protocol violation, a missing record, a wrong
    type) rejects that reply (None), the node counts as dropped, and the run goes on."""
    try:
        return parse_and_apply(*args)
    except Exception as exc:  # a hostile or buggy node must never end the run
        console.print(f"  [yellow]rejected node {node}: {type(exc).__name__}: {exc}[/]")
        return None


def _apply_keys(keys: P.SessionKeys, i: int, content: RecordDict) -> bool:
    keys.register(i, content[wire.PAYLOAD]["c_pk"], content[wire.PAYLOAD]["s_pk"])
    return True


def _apply_masked(srv: P.ServerRound, i: int, content: RecordDict) -> None:
    """The masked vector of a train reply, checked against the checksum securemark_mod attached."""
    y, crc = wire.array_from(content[wire.UPDATE]), content[wire.SM]["crc32"]
    if isinstance(crc, bool) or not isinstance(crc, int) or wire.checksum(y) != crc:
        raise P.ProtocolViolation("masked update changed after securemark_mod (must be the first mod)")
    P.server_receive_masked(srv, i, wire.masked_from(y, content[wire.PAYLOAD]))


def _apply_unmask(srv: P.ServerRound, i: int, content: RecordDict) -> None:
    P.server_receive_unmask(srv, i, *wire.reveals_from(content[wire.PAYLOAD]))


def _plain_update(content: RecordDict, size: int, max_weight: int) -> tuple[int, np.ndarray]:
    weight, update = content[wire.SM]["weight"], wire.array_from(content[wire.UPDATE]).astype(np.float64)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= max_weight:
        raise ValueError(f"weight must be a whole number in [1, {max_weight}]")
    if update.shape != (size,) or not np.isfinite(update).all():
        raise ValueError(f"update must be {size} finite values")
    return weight, update


class _StageClock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(now - self._last, 4)
        self._last = now


def _round_line(m: dict[str, Any]) -> str:
    parts = [f"round {m['round']}: {m['status']}"]
    if "global_accuracy" in m:
        parts.append(f"acc {m['global_accuracy']:.3f}")
    if "copies_mean_accuracy" in m:
        parts.append(f"copies {m['copies_mean_accuracy']:.3f} (min {m['copies_min_accuracy']:.3f})")
    if "max_bit_error" in m:
        parts.append(f"bit error {m['max_bit_error']:.3f}")
    if "min_function_cosine" in m:
        parts.append(f"function mark cosine {m['min_function_cosine']:.3f}")
    if "survived" in m:
        parts.append(f"survived {m['survived']}/{m['sampled']}")
    parts.append(f"{m['seconds']:.1f} s")
    return "  " + ", ".join(parts)
