"""The shipped ClientApp: an ordinary Flower train function (securemark's models and data) under securemark_mod.

The train function is what any Flower app has: it reads ``arrays`` and ``config``, trains on this node's
partition, and replies with ``arrays`` and ``metrics`` (``num-examples``). ``securemark_mod`` does the rest:
key exchange, the update relative to the node's own fingerprinted copy, masking, unmasking.

Data, models and training (torch) are imported inside ``train``: a deployed SuperNode starts a fresh process
for every message, and those answering the mod's hello and unmask stages never need them.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from securemark.config import ConfigError, DataConfig, SimConfig
from securemark.flower.mod import SimulatedSigners, securemark_mod
from securemark.secagg.roster import Roster

app = ClientApp(mods=[securemark_mod])


def partition(context: Context) -> tuple[int, int]:
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise ConfigError("node config needs partition-id and num-partitions (flower-supernode --node-config)")
    return int(cfg["partition-id"]), int(cfg["num-partitions"])


def _data_config(cfg: ConfigRecord) -> DataConfig:
    """The run's data section, from the ``data.*`` keys the server sends."""
    return SimConfig.from_flat({k: cfg[k] for k in cfg if k.startswith("data.")}).data


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this node's partition from the arrays received; reply with the trained arrays."""
    from securemark import data, models, training

    cfg = msg.content["config"]
    pid, parts = partition(context)
    local = data.client_data(_data_config(cfg), pid, parts, int(cfg["seed"]))
    model = models.build(str(cfg["model.name"]), tuple(local.x.shape[1:]), local.classes, width=int(cfg["model.width"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss = training.train(
        model,
        local,
        epochs=int(cfg["local_epochs"]),
        lr=float(cfg["lr"]),
        batch_size=int(cfg["batch_size"]),
        generator=training.fresh_generator(),  # the node's own randomness: a replayed round does not train alike
    )
    trained = ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(local)})
    return Message(RecordDict({"arrays": trained, "metrics": metrics}), reply_to=msg)


def simulated_signers_app(roster: Roster, keys: dict[int, str]) -> ClientApp:
    """The same ClientApp for a simulation of the malicious threat: each node signs with its partition's key."""
    signed = ClientApp(mods=[SimulatedSigners(roster, keys)])
    signed.train()(train)
    return signed
