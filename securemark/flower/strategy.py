"""``SecureMark``: securemark's server side as a Flower Strategy that wraps a Message-API strategy.

    strategy = SecureMark(FedAvg(fraction_evaluate=0.5), out="/srv/owner/run1")
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3, evaluate_fn=evaluate)

The inner strategy keeps what it owns: sampling, the configs it sends, how metrics are aggregated, and any
server optimizer (FedAvgM, FedAdam, ...). SecureMark changes what travels. One round:

1. the inner strategy's ``configure_train`` samples nodes and builds its messages;
2. each sampled node is identified as a customer (``nodes``: a claimed partition-id or a registered key; two
   claims of one identity suspend it, a node whose identity changes is refused); with ``secagg.group`` > 1
   the round takes whole fixed groups of the sampled nodes (``secagg.groups``);
3. masked rounds (``secagg.protocol``): a node sets up long-term keys once per run, in the hello that identifies
   it; each round's train message carries the customer's copy ``w + s X^T b_customer``, the round's graph and
   the neighbours' public keys; the reply is the masked update relative to that copy (``securemark_mod``) with
   the encrypted shares of its round secrets; one unmask exchange follows (``secagg.threat = "malicious"``:
   keys signed, and a signed survivor list first; ``roster=``). The server learns only the weighted mean of the
   updates. An exchange waits for every reply, or the threshold plus ``secagg.grace`` s, at most ``timeout``;
4. the inner strategy aggregates one synthetic reply holding ``w + mean update`` with the total weight, so its
   server optimizer and metric aggregation run unchanged, and the fingerprints never enter the global model;
5. client evaluation gets fingerprinted copies (never the global model); ``evaluate_fn`` scores both.

Each round's global model is a base in the registry; ``model=Net(), example_input=(1, 3, 32, 32)`` registers
the architecture (rewritten copies trace too); ``out`` ends as ``securemark simulate`` leaves it.
After every round ``out/checkpoint/`` holds what ``start(resume=True)`` goes on from (the global model, round,
strength, metrics, graph RNG, the inner strategy's optimizer state), with the same registry and key, so copies
issued before a crash still trace; a kill at any instant leaves the previous checkpoint or the new one; a
restart keys every node afresh. Inner strategies whose aggregate is not a weighted mean need the individual
updates masking hides: refused. Client metrics travel in clear, unweighted: the example counts are secret.

Parts: ``nodes`` (customers, keys, groups, replies), ``exchange``, ``aggregate`` (plain or masked sums), ``copies``
(registry, copies, bases), ``checkpoint``, ``metrics``; here the Strategy and run loop.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, Strategy
from rich.console import Console

from securemark import training
from securemark.config import FingerprintConfig, SecAggSettings
from securemark.errors import InputError, RoundFailed, SecureMarkError
from securemark.flower import checkpoint, wire
from securemark.flower.aggregate import MaskedSum, PlainSum, Sum, check_inner, tensor_scales
from securemark.flower.checkpoint import CHECKPOINT
from securemark.flower.copies import Copies, Weights, arch_record
from securemark.flower.exchange import StageClock, enough_nodes, exchange, shown
from securemark.flower.metrics import mean_metrics, metrics_of, round_line
from securemark.flower.nodes import IDENTITIES, Nodes, threat_roster
from securemark.modelio import save_state_dict
from securemark.owner import FunctionSpec, spec_module
from securemark.secagg.roster import Roster

__all__ = ["CHECKPOINT", "IDENTITIES", "EvaluateFn", "SecureMark"]

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass
class _Round:
    """What one round keeps between configuring and aggregating, and for its evaluation."""

    sampled: list[int] = field(default_factory=list)
    clock: StageClock = field(default_factory=StageClock)
    issued: dict[str, Weights] = field(default_factory=dict)  # customer -> the copy this round sent it
    reference: np.ndarray | None = None  # the projection of the weights the copies were made from
    function: tuple[Any, Weights | None] = (None, None)  # (their function mark, those weights)
    info: dict[str, Any] = field(default_factory=dict)


class SecureMark(Strategy):
    """Per-customer fingerprinted copies and masked aggregation around ``strategy`` (see the module doc)."""

    def __init__(
        self,
        strategy: Strategy,
        out: str | Path,
        *,
        fingerprint: FingerprintConfig | None = None,
        secagg: SecAggSettings | None = None,
        identity: str = "auto",
        max_weight: int = 1 << 16,
        console: Console | None = None,
        function: FunctionSpec | None = None,
        model: torch.nn.Module | None = None,
        example_input: Sequence[int] | None = None,
        roster: Roster | None = None,
    ) -> None:
        check_inner(strategy)
        if not 1 <= max_weight <= 1 << 32:  # the largest example count a client may declare
            raise ValueError(f"max_weight must be in [1, 2^32], got {max_weight}")
        self.inner: FedAvg = strategy  # type: ignore[assignment]
        self.out = Path(out)
        self.fingerprint = fingerprint or FingerprintConfig(length=2048, max_colluders=5)  # registry init's code
        self.secagg = secagg if secagg is not None else SecAggSettings()
        self.function = function  # copies also carry the black-box mark (fingerprint.function) when given
        self.console = console or Console(stderr=True)
        self.rng = np.random.default_rng()  # neighbour graphs and simulated losses: nothing secret
        self.nodes = Nodes(self.secagg, identity, self.console, self.rng, threat_roster(self.secagg, roster))
        self.copies = Copies(self.fingerprint, function, self.console, arch_record(model, example_input))
        self.nodes.on_contest = self.copies.contest
        self.sum: Sum = (
            MaskedSum(self.nodes, self.secagg, max_weight, self.console, self.rng, self.inner.weighted_by_key)
            if self.secagg.enabled
            else PlainSum(max_weight, self.console)
        )
        self.rounds: list[dict[str, Any]] = []
        self._timeout, self._first_round = 3600.0, 1  # how long start's first round waits for the inner's nodes
        self._round, self._loaded = _Round(), None
        self.dtypes: dict[str, torch.dtype] = {}

    @property
    def console(self) -> Console:
        """Where the run's lines go (every part prints to the same one)."""
        return self._console

    @console.setter
    def console(self, console: Console) -> None:
        self._console = console
        for part in (getattr(self, "nodes", None), getattr(self, "copies", None), getattr(self, "sum", None)):
            if part is not None:
                part.console = console

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

    def copy_for(self, node: int) -> Weights:
        return self.copies.copy_for(self.nodes.customers[node], self._loaded, self.weights)

    # --- Strategy: train ------------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterator[Message]:
        """The inner strategy's train messages, each carrying its customer's copy; under masking with the round's
        configuration and the node's neighbours' public keys (new nodes are identified and keyed first).
        Nodes are identified, the base recorded and the sum set up before any copy leaves (a copy out in the world
        always has its base in the registry). Copies are made as the exchange takes each message."""
        self.nodes.grid = grid
        self._load(arrays)
        clock = StageClock()
        wait = self._timeout if server_round == self._first_round else self.secagg.grace
        with enough_nodes(self.inner, grid, wait, "min_train_nodes", self.console) as nodes:
            inner_msgs = {
                m.metadata.dst_node_id: m for m in self.inner.configure_train(server_round, arrays, config, nodes)
            }
        sampled = self.nodes.for_round(list(inner_msgs), server_round)
        self.copies.check_customers(len(self.nodes.customers))
        clock.lap("hello")
        reference = self.copies.record_base(self._loaded, self.weights, server_round - 1)  # before the function mark
        function = (self.copies.function_mark(self._loaded, self.weights), self.weights)  # what reads the copies
        self._round = _Round(sampled, clock, function=function)
        self._round.reference = reference
        records = self.sum.setup(server_round, sampled, tensor_scales(self.weights, self.names), inner_msgs)
        clock.lap("setup")
        return self._train_messages(server_round, inner_msgs, records)

    def _train_messages(
        self, r: int, inner_msgs: dict[int, Message], records: dict[int, dict[str, Any]]
    ) -> Iterator[Message]:
        head = {"stage": wire.TRAIN, "weight-key": self.inner.weighted_by_key}
        template = next(iter(inner_msgs.values()))  # what a group member the inner strategy did not sample gets
        for n in self._round.sampled:
            copy = self._round.issued[self.nodes.customers[n]] = self.copy_for(n)
            content = wire.with_arrays(inner_msgs.get(n, template).content, ArrayRecord(copy))
            extra = dict(records.get(n, {}))
            content[wire.SM] = ConfigRecord({**head, **extra.pop(wire.SM, {})})
            for key, record in extra.items():
                content[key] = record
            yield Message(content, dst_node_id=n, message_type=wire.MESSAGE_TYPE, group_id=str(r))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask (masked rounds) or average (plain) the updates; the inner strategy aggregates the result."""
        got = {m.metadata.src_node_id: m for m in replies}
        agg = self.sum.collect(server_round, got, self._round.clock)
        self._round.info = agg.info
        client = mean_metrics([metrics_of(got[n]) for n in agg.counted])  # only nodes whose update counted
        new = training.add_flat(self.weights, self.names, agg.mean)
        if not all(bool(torch.isfinite(v).all()) for v in new.values() if v.is_floating_point()):
            raise RoundFailed("the aggregate update overflows the model's dtype; the model is left unchanged")
        synthetic = Message(
            RecordDict(
                {
                    self.inner.arrayrecord_key: ArrayRecord(new),
                    "metrics": MetricRecord({**client, self.inner.weighted_by_key: agg.weight}),
                }
            ),
            dst_node_id=0,
            message_type=wire.MESSAGE_TYPE,
        )
        return self.inner.aggregate_train(server_round, [synthetic])

    # --- Strategy: evaluate ---------------------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """The inner strategy's evaluate messages, each with its customer's copy instead of the global model."""
        self.nodes.grid = grid
        self._load(arrays)
        with enough_nodes(self.inner, grid, self.secagg.grace, "min_evaluate_nodes", self.console) as nodes:
            inner_msgs = {
                m.metadata.dst_node_id: m for m in self.inner.configure_evaluate(server_round, arrays, config, nodes)
            }
        if inner_msgs:
            self.copies.record_base(self._loaded, self.weights, server_round)
        return [
            Message(wire.with_arrays(inner_msgs[n].content, ArrayRecord(self.copy_for(n))), dst_node_id=n,
                    message_type=inner_msgs[n].metadata.message_type, group_id=str(server_round))
            for n in self.nodes.identify(inner_msgs, server_round)
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
        self.nodes.grid, self._timeout = grid, timeout
        self.nodes.resolve_identity()  # before any copy: who the customers are, or the run stops here
        self._load(initial_arrays)
        done = self._restore(num_rounds) if resume else 0
        self._first_round = done + 1
        if self.function is not None:
            spec_module(self.function, self.weights)  # a spec that names another model stops the run here
        if not resume:
            if (self.out / "metrics.json").exists() or (self.out / "registry").exists():
                raise FileExistsError(f"{self.out} already holds a run; choose another output directory")
            self.out.mkdir(parents=True, exist_ok=True)
            self.copies.create(self.out, self.weights)
        train_config = train_config if train_config is not None else ConfigRecord()
        evaluate_config = evaluate_config if evaluate_config is not None else ConfigRecord()
        arrays = ArrayRecord(self.weights) if resume else initial_arrays
        trained = any(m.get("status") == "completed" for m in self.rounds)  # see fingerprint.function_initial
        self.copies.initial = None if trained else arrays
        result = Result(arrays=arrays)
        if not resume and evaluate_fn is not None and (res := evaluate_fn(0, initial_arrays)) is not None:
            result.evaluate_metrics_serverapp[0] = res
        for r in range(done + 1, num_rounds + 1):
            arrays, m = self._train_round(grid, r, arrays, train_config, timeout, result)
            self._load(arrays)
            m.update(self._evaluate(r, arrays, evaluate_fn, result))
            self._client_evaluation(grid, r, arrays, evaluate_config, timeout, result, m)
            self.rounds.append(m)
            self.console.print(round_line(m), soft_wrap=True)
            metrics = json.dumps({"rounds": self.rounds}, indent=2, default=float)
            checkpoint.atomic_write(self.out / "metrics.json", metrics)
            self._checkpoint(r)
        self.finish()
        return result

    def _train_round(
        self, grid: Grid, r: int, arrays: ArrayRecord, train_config: ConfigRecord, timeout: float, result: Result
    ) -> tuple[ArrayRecord, dict[str, Any]]:
        """One training round: the new global model (when it fails, the old one or a step from it) and metrics."""
        m: dict[str, Any] = {"round": r, "sampled": 0}
        self._round = _Round()  # a round that fails early leaves no copies of the previous one to score
        start = time.perf_counter()
        try:
            msgs = self.configure_train(r, arrays, ConfigRecord(dict(train_config)), grid)
            m["sampled"] = len(self._round.sampled)
            replies = self.nodes.receive(wire.TRAIN, msgs, timeout, self.sum.need())
            agg, metrics = self.aggregate_train(r, replies.values())
            if agg is None:
                raise RoundFailed("the inner strategy aggregated nothing")
            arrays = result.arrays = agg
            if metrics is not None:
                result.train_metrics_clientapp[r] = metrics
                m["client_train"] = dict(metrics)
            m.update(self._round.info, status="completed")
        except SecureMarkError as exc:  # the round fails, not the run; a bug raises anything else and ends the run
            m.update(status="failed", reason=str(exc))
            step = self.sum.after_failure(training.flatten(self.weights, self.names))
            if step is not None:  # its nodes revealed shares: they refuse the unchanged model (Sum.after_failure)
                arrays = result.arrays = ArrayRecord(training.add_flat(self.weights, self.names, step))
            self.console.print(
                f"  [red]round {r} failed, model {'unchanged' if step is None else 'stepped'}: {shown(exc)}[/]"
            )
        m["seconds"] = round(time.perf_counter() - start, 3)
        return arrays, m

    def _evaluate(self, r: int, arrays: ArrayRecord, evaluate_fn: EvaluateFn | None, result: Result) -> dict[str, Any]:
        """``evaluate_fn`` on the global model and on copies of it for a few customers (what they get next):
        ``global_<k>``, ``copies_mean_<k>``, ``copies_min_<k>``, ``copies_<k>_drop``; the bit error and the
        function-mark cosine of the copies issued this round, read against the weights they were made from."""
        out: dict[str, Any] = {}
        if evaluate_fn is not None and (res := evaluate_fn(r, arrays)) is not None:
            result.evaluate_metrics_serverapp[r] = res
            out.update({f"global_{k}": v for k, v in res.items()})
            if self.copies.enabled:
                sample = sorted(self.nodes.customers)[: self.fingerprint.eval_copies]
                scores = [evaluate_fn(r, ArrayRecord(self.copy_for(n))) or {} for n in sample]
                for k, v in res.items():
                    vals = [float(s[k]) for s in scores if k in s]  # type: ignore[arg-type]
                    if vals and isinstance(v, int | float):
                        out.update({f"copies_mean_{k}": float(np.mean(vals)), f"copies_min_{k}": float(np.min(vals))})
                        out[f"copies_{k}_drop"] = float(v) - float(np.mean(vals))
        out.update(self.copies.score(self._round.issued, self._round.reference, self._round.function))
        return out

    def _client_evaluation(
        self,
        grid: Grid,
        r: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        timeout: float,
        result: Result,
        m: dict[str, Any],
    ) -> None:
        """The inner strategy's client evaluation of round ``r``, on customers' copies; its metrics into ``m``."""
        try:
            msgs = self.configure_evaluate(r, arrays, ConfigRecord(dict(config)), grid)
        except SecureMarkError as exc:  # too few nodes connected, a bad base: no client evaluation this round
            self.console.print(f"  [yellow]client evaluation of round {r} skipped: {shown(exc)}[/]")
            return
        if not msgs:
            return
        try:
            agg = self.aggregate_evaluate(r, exchange(grid, msgs, timeout, self.secagg.grace))
        except Exception as exc:  # the inner strategy refuses inconsistent replies by raising
            self.console.print(f"  [yellow]client evaluation of round {r} not aggregated: {shown(exc)}[/]")
            return
        if agg:
            result.evaluate_metrics_clientapp[r] = agg
            m["client_evaluate"] = dict(agg)

    def finish(self) -> None:
        save_state_dict(self.weights, self.out / "global.safetensors")
        customers = list(self.nodes.customers.values())
        self.copies.final(self.out, self._loaded, self.weights, customers, len(self.rounds))

    # --- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides the model and the inner strategy's state (JSON)."""
        return {
            "round": len(self.rounds),
            "strength": self.copies.strength,
            "rounds": self.rounds,
            "rng": self.rng.bit_generator.state,
            "banned": sorted(self.nodes.banned),
            "inner": type(self.inner).__name__,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.rounds = list(state["rounds"])
        self.nodes.banned = set(state["banned"])
        self.sum.resume(self.rounds)
        self.copies.reopen(self.out, self.weights, float(state["strength"]))
        self.nodes.recall(self.copies.contested())  # a contest after the last checkpoint is in the registry

    def _checkpoint(self, r: int) -> None:
        """Checkpoint round ``r``, the last of ``self.rounds`` (state_dict's round is their count)."""
        checkpoint.save(self.out, self.weights, self.inner, self.state_dict())

    def _restore(self, num_rounds: int) -> int:
        """The run in ``out`` from its checkpoint: the last completed round."""
        state, weights = checkpoint.load(self.out, num_rounds, self.inner)
        if {k: tuple(v.shape) for k, v in weights.items()} != {k: tuple(v.shape) for k, v in self.weights.items()}:
            raise InputError(f"the checkpoint in {self.out} holds another model than this run's")
        self.weights = {k: v.to(self.dtypes[k]) for k, v in weights.items()}
        self.load_state_dict(state)
        self.console.print(f"[bold]resuming[/] {self.out} after round {state['round']} of {num_rounds}")
        return int(state["round"])
