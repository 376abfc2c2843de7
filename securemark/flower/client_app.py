"""The ClientApp: trains on its own partition from its own fingerprinted copy and sends only masked updates.

Handlers: query.hello (which customer am I); under masking query.advertise (fresh keys), query.share_keys
(encrypted shares for peers), train (train from its own copy, reply with the masked update only) and
query.unmask; without masking, train replies with the plain update. Masking state lives in the node's
``context.state`` between messages; the update itself is never stored there.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from securemark import data, models, training
from securemark.config import DataConfig, SimConfig
from securemark.flower import wire
from securemark.secagg import protocol as P
from securemark.secagg.quantize import QuantConfig, encode

app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise ValueError("node config needs partition-id and num-partitions (flower-supernode --node-config)")
    return int(cfg["partition-id"]), int(cfg["num-partitions"])


def _data_config(cfg: ConfigRecord) -> DataConfig:
    """The run's data section, from the ``data.*`` keys the server sends."""
    return SimConfig.from_flat({k: cfg[k] for k in cfg if k.startswith("data.")}).data


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    pid, parts = _partition(context)
    return Message(
        RecordDict({wire.CONFIG: ConfigRecord({"partition-id": pid, "num-partitions": parts})}), reply_to=msg
    )


def encoded_update(msg: Message, context: Context) -> tuple[np.ndarray, float, int]:
    """Train from the copy in ``msg``: (the update relative to that copy, fixed-point encoded when the round
    is masked; the mean loss; the example count). Deterministic given the message."""
    cfg = msg.content[wire.CONFIG]
    pid, parts = _partition(context)
    local = data.client_data(_data_config(cfg), pid, parts, int(cfg["seed"]))
    start = msg.content[wire.MODEL].to_torch_state_dict()
    model = models.build(str(cfg["model.name"]), tuple(local.x.shape[1:]), local.classes, width=int(cfg["model.width"]))
    model.load_state_dict(start)
    gen = training.client_generator(int(cfg["seed"]), int(cfg["round"]), pid)
    loss = training.train(
        model,
        local,
        epochs=int(cfg["local_epochs"]),
        lr=float(cfg["lr"]),
        batch_size=int(cfg["batch_size"]),
        generator=gen,
    )
    names = training.float_names(start)
    after = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    delta = training.flatten(after, names) - training.flatten(start, names)  # relative to our own copy
    if wire.SECAGG not in msg.content:
        return delta, loss, len(local)
    qcfg = QuantConfig(
        float(cfg["secagg.clip"]), int(cfg["secagg.bits"]), int(cfg["max_weight"]), int(cfg["max_clients"])
    )
    return encode(delta, len(local), qcfg, np.random.default_rng(gen.initial_seed())), loss, len(local)


@app.query("advertise")
def advertise(msg: Message, context: Context) -> Message:
    round_cfg, client_id = wire.round_config_from(msg.content[wire.SECAGG])
    st = P.ClientState(round_cfg, client_id)
    c_pk, s_pk = P.client_advertise(st)
    context.state[wire.STATE] = wire.client_state_record(st)
    return Message(RecordDict({wire.PAYLOAD: ConfigRecord({"c_pk": c_pk, "s_pk": s_pk})}), reply_to=msg)


@app.query("share_keys")
def share_keys(msg: Message, context: Context) -> Message:
    st = wire.client_state_from(context.state[wire.STATE])
    c_pks = wire.bytes_map_from(msg.content["c_pk"])
    s_pks = wire.bytes_map_from(msg.content["s_pk"])
    cts = P.client_share_keys(st, {j: (c_pks[j], s_pks[j]) for j in c_pks})
    context.state[wire.STATE] = wire.client_state_record(st)
    return Message(RecordDict({wire.PAYLOAD: wire.bytes_map(cts)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train; reply with the plain update (FedAvg baseline) or, under masking, only the masked one."""
    if wire.SECAGG not in msg.content:  # plain FedAvg baseline
        update, loss, examples = encoded_update(msg, context)
        config = ConfigRecord({"num-examples": examples})
        reply = {
            wire.UPDATE: wire.array_record(update.astype(np.float32)),
            wire.METRICS: MetricRecord({"train_loss": loss}),
            wire.CONFIG: config,
        }
        return Message(RecordDict(reply), reply_to=msg)
    st = wire.client_state_from(context.state[wire.STATE])  # checked before spending time on training
    round_cfg, client_id = wire.round_config_from(msg.content[wire.SECAGG])
    if (round_cfg.run_id, round_cfg.round, client_id) != (st.cfg.run_id, st.cfg.round, st.id):
        raise P.ProtocolViolation("train message of another round than this client's key exchange")
    update, loss, _ = encoded_update(msg, context)
    metrics = MetricRecord({"train_loss": loss})
    y = P.client_masked_input(st, wire.bytes_map_from(msg.content[wire.PAYLOAD]), update)
    context.state[wire.STATE] = wire.client_state_record(st)
    return Message(RecordDict({wire.UPDATE: wire.array_record(y), wire.METRICS: metrics}), reply_to=msg)


@app.query("unmask")
def unmask(msg: Message, context: Context) -> Message:
    st = wire.client_state_from(context.state[wire.STATE])
    survivors = [int(i) for i in msg.content[wire.PAYLOAD]["survivors"]]
    b, s = P.client_unmask(st, survivors)
    del context.state[wire.STATE]
    return Message(RecordDict({"b": wire.bytes_map(b), "s": wire.bytes_map(s)}), reply_to=msg)
