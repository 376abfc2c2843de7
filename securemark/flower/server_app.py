"""The ServerApp: per-customer fingerprinted copies each round, masked aggregation as Flower messages.

One round (see README): sample clients; advertise keys; share keys; send each its own copy w_r + s X^T b_i
with its encrypted shares and receive only its masked update after local training; unmask; the server
applies the weighted mean of the unmasked sum of updates (each relative to the client's own copy, so
fingerprints never enter the global model); evaluate.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from securemark import data, models, training
from securemark.config import SimConfig
from securemark.fingerprint.embed import Fingerprinter
from securemark.flower import wire
from securemark.modelio import save_state_dict
from securemark.owner import customer_name, issue_copies
from securemark.registry import Registry, RegistryParams
from securemark.report import write_report
from securemark.secagg import protocol as P
from securemark.secagg.protocol import Stage
from securemark.secagg.quantize import QuantConfig, decode


class Federation:
    """State of one federated run on the server side; ``run`` drives all rounds."""

    def __init__(self, grid: Grid, cfg: SimConfig, out: Path, console: Console | None = None) -> None:
        self.grid, self.cfg, self.out = grid, cfg, out
        self.console = console or Console()
        self.rng = np.random.default_rng(cfg.train.seed)
        train_set, self.test = data.server_split(cfg.data, cfg.train.seed)
        self.max_weight = len(train_set)  # no client can hold more examples than the training share
        shape = tuple(self.test.x.shape[1:])
        self.model = models.build(cfg.model.name, shape, self.test.classes, seed=cfg.train.seed, width=cfg.model.width)
        self.weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.names = training.float_names(self.weights)
        self.registry: Registry | None = None
        self.fp: Fingerprinter | None = None
        self.strength = 0.0
        self.customers: dict[int, str] = {}  # node id -> customer name (from partition-id)
        self.bits: dict[int, np.ndarray] = {}  # node id -> its code row (read once from the registry)
        self.rounds: list[dict[str, Any]] = []

    # --- messaging ---------------------------------------------------------------------------------
    def send(self, stage: str, contents: dict[int, RecordDict], round_no: int) -> dict[int, Message]:
        """Send one message per node; keep replies without error; drop some if dropouts are simulated."""
        msgs = [Message(c, dst_node_id=n, message_type=stage, group_id=str(round_no)) for n, c in contents.items()]
        replies: dict[int, Message] = {}
        for reply in self.exchange(msgs, self.cfg.secagg.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.console.print(f"  [yellow]node {node} failed at {stage}: {reply.error.reason}[/]")
            elif self.rng.random() >= self.cfg.secagg.dropout:  # simulated loss of this client's message
                replies[node] = reply
        return replies

    def exchange(self, msgs: list[Message], timeout: float) -> list[Message]:
        """Grid.send_and_receive, polling from 2 ms up to 0.25 s instead of a fixed 0.1 s (simulation) or
        3 s (deployment): a masked round has four exchanges, and a fixed interval rounds each one up."""
        pending = set(self.grid.push_messages(msgs))
        replies: list[Message] = []
        end, wait = time.monotonic() + timeout, 0.002
        while pending and time.monotonic() < end:
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if pending:
                time.sleep(wait)
                wait = min(wait * 1.5, 0.25)
        return replies

    def discover(self) -> None:
        want, deadline = self.cfg.train.clients, time.monotonic() + 120
        nodes: list[int] = []
        while len(nodes) < want:
            nodes = sorted(self.grid.get_node_ids())
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(nodes)} of {want} nodes connected within 120 s")
            if len(nodes) < want:
                time.sleep(1)
        replies = self.send(wire.HELLO, {n: RecordDict() for n in nodes}, 0)
        for node, reply in replies.items():
            pid = int(reply.content[wire.CONFIG]["partition-id"])
            self.customers[node] = customer_name(pid)
        if len(set(self.customers.values())) != len(self.customers):
            raise RuntimeError("two nodes report the same partition-id: customers must be distinct")

    # --- fingerprinting ----------------------------------------------------------------------------
    def setup_fingerprint(self) -> None:
        fc = self.cfg.fingerprint
        if not fc.enabled:
            return
        params = RegistryParams(
            code=fc.code, length=fc.length, max_colluders=fc.max_colluders, eps=fc.eps, budget=fc.budget
        )
        self.registry = Registry.init(self.out / "registry", params)
        self.fp = Fingerprinter.create(self.registry.secret, params.carrier, self.weights, params.length)
        self.strength = self.fp.strength_for_budget(self.weights, fc.budget)  # fixed for the whole run
        for node in sorted(self.customers, key=self.customers.__getitem__):
            self.bits[node] = self.registry.customer(self.customers[node]).bits

    def copy_for(self, node: int) -> dict[str, torch.Tensor]:
        if self.fp is None:
            return self.weights
        return self.fp.embed(self.weights, self.bits[node], self.strength)

    # --- one round ---------------------------------------------------------------------------------
    def train_config(self, round_no: int, sampled: int) -> ConfigRecord:
        c = self.cfg
        flat = {k: v for k, v in c.to_flat().items() if k.startswith(("data.", "model.", "secagg."))}
        return ConfigRecord(
            {
                **flat,
                "round": round_no,
                "seed": c.train.seed,
                "local_epochs": c.train.local_epochs,
                "lr": c.train.lr,
                "batch_size": c.train.batch_size,
                "max_weight": self.max_weight,
                "max_clients": sampled,
            }
        )

    def run_round(self, r: int) -> dict[str, Any]:
        nodes = sorted(self.customers)
        picks = self.rng.choice(len(nodes), size=self.cfg.train.per_round, replace=False)  # node ids exceed float64
        sampled = sorted(nodes[int(i)] for i in picks)
        start = time.perf_counter()
        # X w_r: the copies issued now are read back against the weights they were made from
        reference = self.fp.project(self.weights) if self.fp is not None else None
        copies = {n: self.copy_for(n) for n in sampled}
        base_config = self.train_config(r, len(sampled))
        contents = {n: RecordDict({wire.MODEL: ArrayRecord(copies[n]), wire.CONFIG: base_config}) for n in sampled}
        m: dict[str, Any] = {"round": r, "sampled": len(sampled)}
        try:
            if self.cfg.secagg.enabled:
                delta, info = self.masked_round(r, sampled, contents)
            else:
                delta, info = self.plain_round(r, contents)
            self.weights = training.add_flat(self.weights, self.names, delta)
            m.update(info, status="completed")
        except (P.SecAggError, RuntimeError) as exc:
            m.update(status="failed", reason=str(exc))
            self.console.print(f"  [red]round {r} failed, model unchanged: {exc}[/]")
        m["seconds"] = round(time.perf_counter() - start, 3)
        m.update(self.evaluate(copies, reference))
        return m

    def plain_round(self, r: int, contents: dict[int, RecordDict]) -> tuple[np.ndarray, dict[str, Any]]:
        replies = self.send(wire.TRAIN, contents, r)
        if not replies:
            raise RuntimeError("no client returned an update")
        weights = {n: int(rep.content[wire.CONFIG]["num-examples"]) for n, rep in replies.items()}
        total = sum(weights.values())
        delta = (
            sum(weights[n] * wire.array_from(rep.content[wire.UPDATE]).astype(np.float64) for n, rep in replies.items())
            / total
        )
        return delta, {"survived": len(replies), "dropped": len(contents) - len(replies), "train_loss": _loss(replies)}

    def masked_round(
        self, r: int, sampled: list[int], contents: dict[int, RecordDict]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        sc = self.cfg.secagg
        ids = {n: k + 1 for k, n in enumerate(sampled)}
        node_of = {k: n for n, k in ids.items()}
        graph, threshold = P.neighbour_graph(tuple(ids.values()), sc.graph, self.rng)
        qcfg = QuantConfig(sc.clip, sc.bits, self.max_weight, len(sampled))
        size = sum(self.weights[n].numel() for n in self.names) + 2
        rcfg = P.RoundConfig(str(self.grid.run.run_id), r, graph, threshold, size, qcfg.modulus_bits)
        srv = P.ServerState(rcfg)
        for n in sampled:
            contents[n][wire.SECAGG] = wire.round_config_record(rcfg, ids[n])

        # Key exchange first (small messages), then one message carries the copy and the client's shares
        # and brings back only the masked update: no update waits in client state between messages.
        clock = _StageClock()
        advertise = {n: RecordDict({wire.SECAGG: contents[n][wire.SECAGG]}) for n in sampled}
        for n, rep in self.send(wire.ADVERTISE, advertise, r).items():
            keys = rep.content[wire.PAYLOAD]
            self._accept(P.server_receive_keys, srv, ids[n], keys["c_pk"], keys["s_pk"])
        srv.close(Stage.ADVERTISE, len(srv.keys))
        clock.lap("advertise")

        share_msgs = {}
        for i in srv.keys:
            peers = P.server_keys_for(srv, i)
            share_msgs[node_of[i]] = RecordDict(
                {
                    "c_pk": wire.bytes_map({j: k[0] for j, k in peers.items()}),
                    "s_pk": wire.bytes_map({j: k[1] for j, k in peers.items()}),
                }
            )
        for n, rep in self.send(wire.SHARE_KEYS, share_msgs, r).items():
            self._accept(P.server_receive_shares, srv, ids[n], wire.bytes_map_from(rep.content[wire.PAYLOAD]))
        srv.close(Stage.SHARE, len(srv.shared))
        clock.lap("share_keys")

        for i in srv.shared:
            contents[node_of[i]][wire.PAYLOAD] = wire.bytes_map(P.server_shares_for(srv, i))
        replies = self.send(wire.TRAIN, {node_of[i]: contents[node_of[i]] for i in srv.shared}, r)
        loss = _loss(replies)
        for n, rep in replies.items():
            self._accept(P.server_receive_masked, srv, ids[n], wire.array_from(rep.content[wire.UPDATE]))
        srv.close(Stage.MASKED, len(srv.inputs))
        clock.lap("train_masked_input")

        survivors = P.server_survivors(srv)
        unmask_msgs = {
            node_of[i]: RecordDict({wire.PAYLOAD: ConfigRecord({"survivors": list(survivors)})}) for i in survivors
        }
        for n, rep in self.send(wire.UNMASK, unmask_msgs, r).items():
            self._accept(
                P.server_receive_unmask,
                srv,
                ids[n],
                wire.bytes_map_from(rep.content["b"]),
                wire.bytes_map_from(rep.content["s"]),
            )
        clock.lap("unmask")
        dec = decode(P.server_sum(srv), qcfg)
        clock.lap("sum")
        info = {
            "survived": len(survivors),
            "dropped": len(sampled) - len(survivors),
            "clipped": dec.clipped,
            "threshold": threshold,
            "train_loss": loss,
            "stage_seconds": clock.laps,
        }
        return dec.mean, info

    def _accept(self, fn: Any, srv: P.ServerState, client: int, *args: Any) -> None:
        """Apply one client's message; a malformed one is rejected and that client counts as dropped."""
        try:
            fn(srv, client, *args)
        except P.ProtocolViolation as exc:
            self.console.print(f"  [yellow]rejected: {exc}[/]")

    # --- evaluation and outputs --------------------------------------------------------------------
    def evaluate(self, issued: dict[int, dict[str, torch.Tensor]], reference: np.ndarray | None) -> dict[str, Any]:
        """Global accuracy of w_{r+1}; copies of w_{r+1} for a sample of customers (what they get next),
        so the fidelity drop compares like with like; bit error of the copies actually issued this round."""
        acc = training.accuracy_of(self.model, self.weights, self.test)
        out: dict[str, Any] = {"global_accuracy": acc}
        if self.fp is None or reference is None:
            return out
        sample = sorted(self.customers)[: self.cfg.fingerprint.eval_copies]
        accs = [training.accuracy_of(self.model, self.copy_for(n), self.test) for n in sample]
        out.update(
            copies_mean_accuracy=float(np.mean(accs)),
            copies_min_accuracy=float(np.min(accs)),
            copies_accuracy_drop=acc - float(np.mean(accs)),
            max_bit_error=self._bit_errors(issued, reference),
        )
        return out

    def _bit_errors(self, copies: dict[int, dict[str, torch.Tensor]], reference: np.ndarray) -> float:
        assert self.fp is not None
        worst = 0.0
        for n, copy in copies.items():
            y = self.fp.extract(copy, reference, self.strength)
            worst = max(worst, float(np.mean((y > 0) != self.bits[n])))
        return worst

    def run(self) -> list[dict[str, Any]]:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.toml").write_text(self.cfg.to_toml(self.out))
        self.discover()
        self.setup_fingerprint()
        c = self.cfg
        self.console.print(
            f"[bold]securemark[/]: {len(self.customers)} clients, {c.train.rounds} rounds, "
            f"fingerprint={'on' if c.fingerprint.enabled else 'off'}, secagg={'on' if c.secagg.enabled else 'off'}"
        )
        for r in range(1, c.train.rounds + 1):
            m = self.run_round(r)
            self.rounds.append(m)
            self.console.print(_round_line(m), soft_wrap=True)
            (self.out / "metrics.json").write_text(json.dumps({"rounds": self.rounds}, indent=2))
        self.finish()
        return self.rounds

    def finish(self) -> None:
        save_state_dict(self.weights, self.out / "global.safetensors")
        if self.registry is not None:
            names = sorted(self.customers.values())
            note = f"final copy, {self.cfg.train.rounds} rounds"
            for name, copy in issue_copies(self.registry, self.weights, names, note, self.strength).items():
                save_state_dict(copy, self.out / "customers" / f"{name}.safetensors")
            self.registry.close()
        write_report(self.out, self.cfg, self.rounds)


class _StageClock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(now - self._last, 4)
        self._last = now


def _loss(replies: dict[int, Message]) -> float:
    losses = [float(rep.content[wire.METRICS]["train_loss"]) for rep in replies.values()]
    return float(np.mean(losses)) if losses else float("nan")


def _round_line(m: dict[str, Any]) -> str:
    parts = [f"round {m['round']}: {m['status']}", f"acc {m['global_accuracy']:.3f}"]
    if "copies_mean_accuracy" in m:
        parts.append(
            f"copies {m['copies_mean_accuracy']:.3f} (min {m['copies_min_accuracy']:.3f}), "
            f"bit error {m['max_bit_error']:.3f}"
        )
    if "survived" in m:
        parts.append(f"survived {m['survived']}/{m['sampled']}")
    parts.append(f"{m['seconds']:.1f} s")
    return "  " + ", ".join(parts)


def make_server_app(cfg: SimConfig | None = None, out: Path | None = None) -> ServerApp:
    """A ServerApp bound to ``cfg`` (simulation), or reading Flower's run config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or SimConfig.from_flat(dict(context.run_config))
        Federation(grid, run_cfg, out or Path(run_cfg.output)).run()

    return app


app = make_server_app()
