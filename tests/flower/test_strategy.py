"""SecureMark and securemark_mod through real ClientApps in process: masked sums, dropouts, what the server
sees, the train contract, hostile nodes, refused inner strategies."""

import contextlib
import copy
import io
import json
import signal
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import Bulyan, FedAdam, FedAvg, FedAvgM, FedMedian, FedTrimmedAvg, Krum, QFedAvg
from rich.console import Console

from securemark import training
from securemark.config import SimConfig
from securemark.flower import wire
from securemark.flower.aggregate import check_inner
from securemark.flower.client_app import train as shipped_train
from securemark.flower.mod import securemark_mod
from securemark.flower.server_app import run as run_app
from securemark.flower.server_app import strategy_for, train_config
from securemark.flower.strategy import SecureMark
from securemark.models import build
from securemark.registry import Registry

from .inprocess import Deployed, InProcessGrid, quantization_steps


def config(fingerprint=True, secagg=True, clients=5, rounds=1):
    return SimConfig.from_dict(
        {
            "data": {"name": "digits"},
            "model": {"name": "mlp"},
            "train": {"rounds": rounds, "clients": clients, "per_round": clients, "local_epochs": 1, "seed": 1},
            "fingerprint": {"enabled": fingerprint, "length": 128, "eval_copies": 2},
            "secagg": {"enabled": secagg},
        }
    )


def initial(cfg):
    model = build("mlp", (1, 8, 8), 10, seed=1)
    return ArrayRecord({k: v.detach().clone() for k, v in model.state_dict().items()})


def quiet_strategy(cfg, tmp_path, **kw):
    s = strategy_for(cfg, tmp_path, max_weight=2000, console=Console(quiet=True))
    for k, v in kw.items():
        setattr(s.nodes if k == "identity" else s, k, v)  # who is who: the strategy's nodes part
    return s


def recording_console():
    return Console(record=True, width=300, file=io.StringIO())


def lose(monkeypatch, strategy, lost):
    """Clients vanish: their replies at the given stages never reach the server."""
    real = strategy.nodes.receive

    def lossy(stage, msgs, timeout, need=None):
        return {n: r for n, r in real(stage, msgs, timeout, need).items() if n not in lost.get(stage, ())}

    monkeypatch.setattr(strategy.nodes, "receive", lossy)


def user_update(grid, node):
    """What the user's train function returns for ``node``'s train message, minus the copy it received:
    the plain update the mod masked (the test pins the node's own randomness: ``repeatable_training``)."""
    msg = next(
        m for m in grid.sent if m.metadata.dst_node_id == node and str(m.content[wire.SM]["stage"]) == wire.TRAIN
    )
    content = RecordDict({k: v for k, v in msg.content.items() if not k.startswith(wire.SM)})
    reply = shipped_train(Message(content=content, metadata=copy.copy(msg.metadata)), grid.contexts[node])
    sent = msg.content["arrays"].to_torch_state_dict()
    after = reply.content["arrays"].to_torch_state_dict()
    names = training.float_names(sent)
    return training.flatten(after, names) - training.flatten(sent, names), int(reply.content["metrics"]["num-examples"])


def repeatable_training(monkeypatch):
    """The shipped train function draws its batch order from the OS (a replayed round trains anew); a test that
    trains a node's message again pins it."""
    monkeypatch.setattr(training, "fresh_generator", lambda: torch.Generator().manual_seed(7))


def test_masked_round_with_dropouts_gives_the_survivors_weighted_mean(tmp_path, monkeypatch):
    repeatable_training(monkeypatch)
    cfg = config()
    grid, s = InProcessGrid(5), quiet_strategy(config(), tmp_path)
    # 1001 vanishes before its masked input arrives; 1003 after sending it (its input still counts)
    lose(monkeypatch, s, {wire.TRAIN: {1001}, wire.UNMASK: {1003}})
    start = initial(cfg)
    s.start(grid, start, num_rounds=1, train_config=train_config(cfg))
    m = s.rounds[0]
    assert m["status"] == "completed" and m["survived"] == 4 and m["dropped"] == 1 and m["max_bit_error"] == 0.0
    updates = {n: user_update(grid, n) for n in grid.contexts if n != 1001}
    total = sum(w for _, w in updates.values())
    expected = sum(w * u for u, w in updates.values()) / total  # nothing clipped: every tensor has its range
    before = start.to_torch_state_dict()
    names = training.float_names(before)
    got = training.flatten(s.weights, names) - training.flatten(before, names)
    train_msg = next(m for m in grid.sent if str(m.content[wire.SM]["stage"]) == wire.TRAIN)
    step = quantization_steps(train_msg, [before[n].numel() for n in names])
    assert m["clipped"] == 0 and np.all(np.abs(got - expected) < step)
    assert np.abs(expected).max() > 100 * step.max()  # the comparison is not vacuous


def test_too_few_survivors_fail_the_round_loudly_and_leave_the_model(tmp_path, monkeypatch):
    cfg = config()
    s = quiet_strategy(cfg, tmp_path)
    lose(monkeypatch, s, {wire.TRAIN: {1000, 1002, 1004}})  # 2 of 5 left, threshold 3
    start = initial(cfg)
    s.start(InProcessGrid(5), start, num_rounds=1, train_config=train_config(cfg))
    assert s.rounds[0]["status"] == "failed" and "threshold" in s.rounds[0]["reason"]
    before = start.to_torch_state_dict()
    assert all(bool((s.weights[k] == before[k]).all()) for k in before)


def test_the_server_sees_only_masked_updates_and_every_client_its_own_copy(tmp_path):
    cfg = config()
    grid = InProcessGrid(5)
    s = quiet_strategy(cfg, tmp_path)
    s.start(grid, initial(cfg), num_rounds=1, train_config=train_config(cfg))
    assert {m.metadata.message_type for m in grid.sent} == {"train"}
    semi_honest = set(wire.STAGES) - {wire.SIGN}  # SIGN: the malicious threat's third exchange
    assert {str(m.content[wire.SM]["stage"]) for m in grid.sent} == semi_honest
    train_msgs = [m for m in grid.sent if str(m.content[wire.SM]["stage"]) == wire.TRAIN]
    # every client got its own copy (whole tensors compared: two copies' float32 sums coincided once)
    firsts = {m.metadata.dst_node_id: m.content["arrays"]["net.1.weight"].numpy().tobytes() for m in train_msgs}
    assert len(set(firsts.values())) == 5
    # long-term keys stay on the node; nothing of the round does
    assert all(
        wire.KEYS in ctx.state and wire.ROUND not in ctx.state and wire.PEERS not in ctx.state
        for ctx in grid.contexts.values()
    )
    # run again (a new run: fresh nodes) while recording what comes back: only uint vectors and other metrics
    seen = []
    grid = InProcessGrid(5)
    real_pull = grid.pull_messages

    def record(ids):
        got = real_pull(ids)
        seen.extend(got)
        return got

    grid.pull_messages = record
    s2 = quiet_strategy(cfg, tmp_path / "two")
    s2.start(grid, initial(cfg), num_rounds=1, train_config=train_config(cfg))
    train_replies = [r for r in seen if str(r.content[wire.SM]["stage"]) == wire.TRAIN]
    assert len(train_replies) == 5
    for r in train_replies:
        assert list(r.content.array_records) == [wire.UPDATE]
        assert wire.array_from(r.content[wire.UPDATE]).dtype.kind == "u"
        assert dict(r.content["metrics"]).keys() == {"train_loss"}  # never num-examples in clear


def test_no_copy_leaves_before_its_base_is_in_the_registry(tmp_path):
    """A base that cannot be recorded (a full disk, a locked registry) fails the round before any copy is
    made or sent: a copy out in the world always traces against the model it was made from."""
    from securemark.registry import RegistryError

    cfg = config(clients=3, rounds=2)
    s, grid = quiet_strategy(cfg, tmp_path), InProcessGrid(3)
    recorded = s.copies.record_base
    calls = []

    def full_disk_in_round_1(token, weights, after):
        calls.append(after)
        if after == 0:
            raise RegistryError("database or disk is full")
        return recorded(token, weights, after)

    s.copies.record_base = full_disk_in_round_1
    s.start(grid, initial(cfg), num_rounds=2, train_config=train_config(cfg))
    assert [m["status"] for m in s.rounds] == ["failed", "completed"] and calls[:2] == [0, 1]
    staged = [str(m.content[wire.SM]["stage"]) for m in grid.sent if wire.SM in m.content]
    assert staged.count(wire.TRAIN) == 3  # round 2's copies only


@pytest.mark.parametrize("secagg", [True, False])
def test_a_bug_in_what_is_done_with_a_reply_ends_the_run_not_a_dropped_node(tmp_path, monkeypatch, secagg):
    """A node's records are read under wire.malformed (its fault: the node is dropped); past that reading, an
    exception of ours is a bug: it ends the run with its traceback instead of failing every round quietly."""
    from securemark.flower import aggregate
    from securemark.secagg import protocol

    def bug(*_):
        raise TypeError("a bug of ours")

    if secagg:
        monkeypatch.setattr(protocol, "server_receive_masked", bug)
    else:
        monkeypatch.setattr(aggregate, "_plain_update", bug)
    cfg = config(clients=3, fingerprint=False, secagg=secagg)
    s = quiet_strategy(cfg, tmp_path)
    with pytest.raises(TypeError, match="a bug of ours"):
        s.start(InProcessGrid(3), initial(cfg), num_rounds=1, train_config=train_config(cfg))


def test_plain_rounds_and_outputs_of_a_full_run(tmp_path):
    cfg = config(fingerprint=False, secagg=False, clients=3)
    rounds = run_app(InProcessGrid(3), cfg, tmp_path, Console(quiet=True))
    assert rounds[0]["status"] == "completed" and "max_bit_error" not in rounds[0]
    assert (tmp_path / "global.safetensors").exists() and (tmp_path / "report.md").exists()
    assert not (tmp_path / "registry").exists() and not (tmp_path / "customers").exists()


def test_a_full_masked_run_issues_every_customer_a_traceable_copy(tmp_path, capsys):
    from securemark.cli import main

    cfg = config(clients=3, rounds=2)
    rounds = run_app(InProcessGrid(3), cfg, tmp_path, Console(quiet=True))
    assert [m["status"] for m in rounds] == ["completed", "completed"]
    assert rounds[-1]["global_accuracy"] > 0.5 and "copies_accuracy_drop" in rounds[-1]
    assert sorted(p.stem for p in (tmp_path / "customers").iterdir()) == ["client-000", "client-001", "client-002"]
    capsys.readouterr()
    assert (
        main(["trace", str(tmp_path / "registry"), str(tmp_path / "customers" / "client-002.safetensors"), "--json"])
        == 0
    )
    import json

    assert json.loads(capsys.readouterr().out)["accused"] == ["client-002"]


# --- the train contract ---------------------------------------------------------------------------------------
def app_with(reply_fn, mods=None):
    """A ClientApp whose train function replies ``reply_fn(arrays_received)`` (a RecordDict)."""
    app = ClientApp(mods=mods if mods is not None else [securemark_mod])

    @app.train()
    def train(msg, context):
        return Message(reply_fn(msg.content["arrays"]), reply_to=msg)

    return app


def good_reply(arrays, **metrics):
    moved = ArrayRecord({k: Array(v.numpy() * 0.9) for k, v in arrays.items()})
    return RecordDict({"arrays": moved, "metrics": MetricRecord({"num-examples": 10, **metrics})})


def one_round(tmp_path, app, clients=3, **kw):
    cfg = config(clients=clients)
    s = quiet_strategy(cfg, tmp_path, console=recording_console())
    grid = InProcessGrid(clients, app=app, **kw)
    s.start(grid, initial(cfg), num_rounds=1, train_config=train_config(cfg))
    return s, grid, s.console.export_text()


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (lambda a: RecordDict({"metrics": MetricRecord({"num-examples": 10})}), "exactly one ArrayRecord"),
        (
            lambda a: RecordDict(
                {"arrays": ArrayRecord({"other": Array(np.zeros(3))}), "metrics": MetricRecord({"num-examples": 1})}
            ),
            "differ",
        ),
        (lambda a: RecordDict({"arrays": a, "metrics": MetricRecord({"loss": 1.0})}), "'num-examples'"),
        (lambda a: RecordDict({"arrays": a, "metrics": MetricRecord({"num-examples": 0})}), "whole number >= 1"),
        (lambda a: RecordDict({"arrays": a, "metrics": MetricRecord({"num-examples": 2.5})}), "whole number >= 1"),
        (lambda a: RecordDict({"arrays": a, "metrics": MetricRecord({"num-examples": float("inf")})}), "whole number"),
        (lambda a: RecordDict({"arrays": a, "metrics": MetricRecord({"num-examples": float("nan")})}), "whole number"),
        (
            lambda a: RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v.numpy() * np.nan) for k, v in a.items()}),
                    "metrics": MetricRecord({"num-examples": 3}),
                }
            ),
            "NaN",
        ),
    ],
)
def test_contract_breaches_get_a_clear_error_reply_and_the_round_goes_on(tmp_path, reply, why):
    bad = app_with(reply)
    good = app_with(good_reply)

    def app(msg, context):  # node 1000 breaks the contract, the others keep it
        return (bad if context.node_id == 1000 else good)(msg, context)

    s, _, log = one_round(tmp_path, app, clients=4)
    assert "node 1000 failed at train" in log and why in log
    assert s.rounds[0]["status"] == "completed" and s.rounds[0]["survived"] == 3


def test_a_mod_listed_before_securemark_mod_is_detected(tmp_path):
    def noisy_mod(msg, context, call_next):  # e.g. a local-DP mod: it changes the reply's arrays
        reply = call_next(msg, context)
        if reply.has_content():
            for rec in reply.content.array_records.values():
                for k in list(rec):
                    rec[k] = type(rec[k]).from_numpy_ndarray(rec[k].numpy() + 1)
        return reply

    s, _, log = one_round(tmp_path, app_with(good_reply, mods=[noisy_mod, securemark_mod]), clients=3)
    assert "changed after securemark_mod (must be the first mod)" in log
    assert s.rounds[0]["status"] == "failed"


def test_messages_without_securemark_records_pass_through_untouched():
    app = app_with(good_reply)
    grid = InProcessGrid(1, app=app)
    msg = Message(
        RecordDict({"arrays": initial(config()), "config": ConfigRecord()}), dst_node_id=1000, message_type="train"
    )
    [mid] = grid.push_messages([msg])
    [reply] = grid.pull_messages([mid])
    assert reply.content["metrics"]["num-examples"] == 10 and "arrays" in reply.content


# --- identities -------------------------------------------------------------------------------------------------
def test_a_duplicated_partition_id_is_refused_and_gets_no_copy(tmp_path):
    s, grid, log = one_round(tmp_path, app_with(good_reply), clients=4, partitions=[0, 1, 1, 2])
    assert "refused node 1001" in log and "refused node 1002" in log
    assert "identity 'client-001' is suspended: nodes 1001, 1002 claimed it at once in round 1" in log
    got_copy = {m.metadata.dst_node_id for m in grid.sent if str(m.content[wire.SM]["stage"]) == wire.TRAIN}
    assert got_copy == {1000, 1003}
    assert sorted(s.nodes.customers.values()) == ["client-000", "client-002"]
    with Registry.open(tmp_path / "registry") as reg:
        assert list(reg.contested()) == ["client-001"]


def _grid_that(switch, clients=3, deployed=False):
    """A grid whose pushes call ``switch(grid, groups)`` first (``groups``: the round numbers of the messages
    pushed); a SuperLink's grid with ``deployed``, else a simulation's."""
    grid = InProcessGrid(clients, app=app_with(good_reply))
    real = grid.push_messages

    def push(messages):
        messages = list(messages)
        switch(grid, {m.metadata.group_id for m in messages})
        return real(messages)

    grid.push_messages = push
    return Deployed(grid) if deployed else grid


def _joins(node, partition, after):
    """A switch: ``node`` connects claiming ``partition`` when round ``after``'s messages go out."""

    def switch(grid, groups):
        if after in groups and node not in grid.contexts:
            grid.contexts[node] = Context(
                4242, node, {"partition-id": partition, "num-partitions": 3}, RecordDict(), {}
            )

    return switch


def test_a_node_that_took_a_victims_identity_first_is_cut_off_and_its_leak_accuses_no_one(tmp_path, capsys):
    """Node 1001 claims partition 1 before its owner connects and gets round 1's copy of client-001. When the
    victim (1003) claims it in round 2, the identity is suspended: neither node gets another copy, there is no
    final copy of client-001, and the attacker's leaked copy, which reads as client-001's, is reported contested
    with the reason: nobody is accused."""
    from securemark.cli import main
    from securemark.modelio import save_state_dict

    cfg = config(clients=3, rounds=3)
    s = quiet_strategy(cfg, tmp_path, console=recording_console())
    grid = _grid_that(_joins(1003, partition=1, after="1"))  # the victim connects after round 1
    s.start(grid, initial(cfg), num_rounds=3, train_config=train_config(cfg))
    log = s.console.export_text()
    why = "node 1003 claimed it in round 2 while node 1001 held it since round 1; its copies before round 2 went to "
    assert f"identity 'client-001' is suspended: {why}node 1001 alone" in log
    assert [m["status"] for m in s.rounds] == ["completed"] * 3 and s.rounds[-1]["survived"] == 2
    trains = [m for m in grid.sent if str(m.content[wire.SM]["stage"]) == wire.TRAIN]
    to_attacker = [m for m in trains if m.metadata.dst_node_id == 1001]
    assert [m.metadata.group_id for m in to_attacker] == ["1"]  # round 1's copy only
    assert not any(m.metadata.dst_node_id == 1003 for m in trains)  # the victim gets nothing either
    assert sorted(p.stem for p in (tmp_path / "customers").iterdir()) == ["client-000", "client-002"]
    leaked = tmp_path / "leak.safetensors"
    save_state_dict(to_attacker[0].content["arrays"].to_torch_state_dict(), leaked)
    capsys.readouterr()
    assert main(["trace", str(tmp_path / "registry"), str(leaked), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accused"] == [] and list(report["contested"]) == ["client-001"]
    assert f"{why}node 1001 alone" in report["contested"]["client-001"]
    assert report["scores_top"][0]["customer"] == "client-001"  # the copy does read as client-001's
    assert main(["trace", str(tmp_path / "registry"), str(leaked)]) == 0
    out = capsys.readouterr().out
    assert "accused: nobody" in out and "contested, not accused: client-001" in out


def test_a_node_whose_identity_changes_between_rounds_is_refused(tmp_path):
    cfg = config(clients=3, rounds=2)
    s = quiet_strategy(cfg, tmp_path)
    s.console = recording_console()
    grid = InProcessGrid(3, app=app_with(good_reply))
    real = grid.push_messages

    def switch_after_round_one(messages):
        messages = list(messages)
        if any(m.group_id == "2" for m in (mm.metadata for mm in messages)):
            grid.contexts[1002].node_config["partition-id"] = 0  # now claims client-000
        return real(messages)

    grid.push_messages = switch_after_round_one
    s.start(grid, initial(cfg), num_rounds=2, train_config=train_config(cfg))
    log = s.console.export_text()
    assert "refused node 1002: identity changed from 'client-002' to 'client-000'" in log
    assert 1002 in s.nodes.refused and s.rounds[1]["status"] == "completed"


def test_identity_by_registered_node_key(tmp_path):
    """A customer is its node's key (after its registered name): Flower keeps keys unique, not names, so two keys
    registered as "bob" are two customers, never a contest; a name no registry can hold is dropped for the
    key's digest; a node without a key gets nothing."""
    import hashlib

    keys = {1000: (b"key-a", "bob"), 1001: (b"key-b", ""), 1003: (b"key-d", "bob"), 1004: (b"key-e", "carol ")}
    cfg = config(clients=5)
    s = quiet_strategy(cfg, tmp_path, identity="node")
    s.console = recording_console()
    grid = InProcessGrid(5, app=app_with(good_reply), keys=keys)  # 1002 is not registered: no key
    s.start(grid, initial(cfg), num_rounds=1, train_config=train_config(cfg))
    digest = {n: hashlib.sha256(k).hexdigest() for n, (k, _) in keys.items()}
    assert s.nodes.customers == {
        1000: f"bob-{digest[1000][:16]}", 1001: f"node-{digest[1001][:16]}", 1003: f"bob-{digest[1003][:16]}",
        1004: f"node-{digest[1004][:16]}",
    }  # fmt: skip
    assert 1002 in s.nodes.refused and "refused node 1002: no identity" in s.console.export_text()
    assert s.nodes.contested == {} and s.rounds[0]["survived"] == 4


def test_who_the_customers_are_is_settled_before_any_copy_and_an_unkeyed_deployment_must_say_so(tmp_path):
    """identity "auto": partition ids in a simulation; a deployment stops before anything is written until
    "node" or "partition-id" is said, and "partition-id" is then warned about."""
    from securemark.flower.nodes import IdentityUnsafe

    cfg = config(clients=3)
    s = quiet_strategy(cfg, tmp_path / "sim", console=recording_console())
    s.start(InProcessGrid(3, app=app_with(good_reply)), initial(cfg), num_rounds=1, train_config=train_config(cfg))
    assert s.nodes.identity == "partition-id" and "any node can claim" not in s.console.export_text()

    # outside a simulation "auto" stops, with keys or without: an --insecure SuperLink's SuperNodes register
    # throwaway keys of their own, so keys alone do not say the SuperLink authenticates them
    keys = {1000: (b"key-a", "alice"), 1001: (b"key-b", "bob"), 1002: (b"key-c", "carol")}
    for name, grid_keys in (("open", None), ("keyed", keys)):
        s = quiet_strategy(cfg, tmp_path / name)
        with pytest.raises(IdentityUnsafe, match=r'fingerprint\.identity = "node".*--enable-supernode-auth'):
            s.start(Deployed(InProcessGrid(3, app=app_with(good_reply), keys=grid_keys)), initial(cfg), num_rounds=1)
        assert not (tmp_path / name).exists()

    s = quiet_strategy(cfg, tmp_path / "said", identity="partition-id", console=recording_console())
    s.start(Deployed(InProcessGrid(3, app=app_with(good_reply))), initial(cfg), num_rounds=1,
            train_config=train_config(cfg))  # fmt: skip
    assert s.rounds[0]["status"] == "completed"
    assert s.console.export_text().count("any node can claim any; a second claim suspends the identity") == 1


def test_a_pirate_that_contests_its_own_identity_is_still_named_by_node(tmp_path, capsys):
    """Node 1002 holds client-002 alone for rounds 1-2 and leaks round 2's copy, then a second node of its own
    claims partition 2 in round 3: client-002 is suspended, so the leak is reported contested, not accused,
    but the reason names node 1002 as the only node that received client-002's copies before round 3."""
    from securemark.cli import main
    from securemark.modelio import save_state_dict

    cfg = config(clients=3, rounds=3)
    s = quiet_strategy(cfg, tmp_path, console=recording_console())
    grid = _grid_that(_joins(1003, partition=2, after="2"))  # the sockpuppet connects after round 2
    s.start(grid, initial(cfg), num_rounds=3, train_config=train_config(cfg))
    leak = next(m for m in grid.sent if m.metadata.dst_node_id == 1002 and m.metadata.group_id == "2"
                and str(m.content[wire.SM]["stage"]) == wire.TRAIN)  # fmt: skip
    save_state_dict(leak.content["arrays"].to_torch_state_dict(), tmp_path / "leak.safetensors")
    capsys.readouterr()
    assert main(["trace", str(tmp_path / "registry"), str(tmp_path / "leak.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accused"] == [] and report["scores_top"][0]["customer"] == "client-002"
    assert "its copies before round 3 went to node 1002 alone" in report["contested"]["client-002"]


def test_an_identity_a_node_held_cannot_be_handed_on_by_leaving_it(tmp_path, capsys):
    """On a deployment, node 1001 claims partition 1 first and gets round 1's copy of client-001, then claims
    another partition (and is refused); when the victim (1003) claims partition 1, the identity is contested, not
    handed over: the leak of the pirate's copy accuses nobody and its reason names node 1001."""
    from securemark.cli import main
    from securemark.modelio import save_state_dict

    def switch(grid, groups):
        if "1" in groups and 1003 not in grid.contexts:
            grid.contexts[1001].node_config["partition-id"] = 9  # hello replies of later rounds claim client-009
        _joins(1003, partition=1, after="1")(grid, groups)

    cfg = config(clients=3, rounds=3)
    s = quiet_strategy(cfg, tmp_path, identity="partition-id", console=recording_console())
    grid = _grid_that(switch, deployed=True)
    s.start(grid, initial(cfg), num_rounds=3, train_config=train_config(cfg))
    assert "client-001" in s.nodes.contested and "client-001" not in s.nodes.customers.values()
    assert "while node 1001 held it since round 1 until it was refused" in s.nodes.contested["client-001"]
    leak = next(m for m in grid.inner.sent if m.metadata.dst_node_id == 1001 and m.metadata.group_id == "1"
                and str(m.content[wire.SM]["stage"]) == wire.TRAIN)  # fmt: skip
    save_state_dict(leak.content["arrays"].to_torch_state_dict(), tmp_path / "leak.safetensors")
    capsys.readouterr()
    assert main(["trace", str(tmp_path / "registry"), str(tmp_path / "leak.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accused"] == [] and "went to node 1001 alone" in report["contested"]["client-001"]


def killed_after_round_one(s, grid, cfg):
    """Start ``s`` on ``grid`` for 2 rounds and kill it right after round 1's checkpoint, as a crash would."""
    real = s._checkpoint

    def killed_after(r):
        real(r)
        raise SystemExit("killed after round 1's checkpoint")

    s._checkpoint = killed_after
    with pytest.raises(SystemExit), deadline(120):
        s.start(grid, initial(cfg), num_rounds=2, train_config=train_config(cfg))


def test_a_resumed_deployment_takes_claims_afresh_when_every_node_id_changed(tmp_path):
    """A restarted SuperLink gives every node a new id: the resumed run identifies the nodes afresh (no false
    contest), since who held what before the restart is not told apart from a reconnect by a claim alone; the
    contests the registry holds still stand."""
    cfg = config(clients=3, rounds=2)
    killed_after_round_one(quiet_strategy(cfg, tmp_path, identity="partition-id"),
                           Deployed(InProcessGrid(3, app=app_with(good_reply))), cfg)  # fmt: skip
    grid = InProcessGrid(3, app=app_with(good_reply))
    grid.contexts = {n + 10: Context(4242, n + 10, c.node_config, RecordDict(), {}) for n, c in grid.contexts.items()}
    resumed = quiet_strategy(cfg, tmp_path, identity="partition-id")
    resumed.start(Deployed(grid), initial(cfg), num_rounds=2, train_config=train_config(cfg), resume=True)
    assert resumed.nodes.customers == {1010: "client-000", 1011: "client-001", 1012: "client-002"}
    assert resumed.nodes.contested == {} and resumed.rounds[-1]["status"] == "completed"


def test_registered_names_that_are_no_plain_file_name_are_left_out_and_markup_is_data(tmp_path):
    """A registered name becomes part of a file name and of console lines: "../x", an absolute path, a long
    name, markup and invisible characters give the key's digest alone; a node's error reason in markup is
    printed as text, never parsed (it ended runs)."""
    import hashlib

    bad = ["../../escaped/x", "/tmp/abs/evil", "a" * 300, "[/]", "bob\u2028accused: nobody", "x..y"]
    keys = {1000 + i: (f"key-{i}".encode(), name) for i, name in enumerate(bad)}
    cfg = config(clients=len(bad))
    s = quiet_strategy(cfg, tmp_path, identity="node", console=recording_console())
    s.start(InProcessGrid(len(bad), app=app_with(good_reply), keys=keys), initial(cfg), num_rounds=1,
            train_config=train_config(cfg))  # fmt: skip
    expected = {n: "node-" + hashlib.sha256(k).hexdigest()[:16] for n, (k, _) in keys.items()}
    assert s.nodes.customers == expected and s.rounds[0]["status"] == "completed"
    assert sorted(p.name for p in (tmp_path / "customers").iterdir()) == sorted(
        f"{v}.safetensors" for v in expected.values()
    )

    reasons = {1000: "[/]boom [bold]", 1001: "", 1002: "\x1bM\x1bcback"}  # markup, none (None on the wire), ESC

    def failing_hello(msg, context):
        reason = reasons[msg.metadata.dst_node_id]
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason or None), reply_to=msg)

    s = quiet_strategy(config(clients=3), tmp_path / "markup", console=recording_console())
    s.start(InProcessGrid(3, app=failing_hello), initial(cfg), num_rounds=1, train_config=train_config(cfg))
    log = s.console.export_text()
    assert "node 1000 failed at hello: [/]boom [bold]" in log and "node 1001 failed at hello: (no reason)" in log
    assert "node 1002 failed at hello: \\x1bM\\x1bcback" in log and "\x1b" not in log


def test_a_contest_recorded_after_the_last_checkpoint_holds_in_the_resumed_run(tmp_path):
    """The server dies after a contest in round 2 and before round 2's checkpoint: the registry has it, the
    checkpoint does not. The resumed run still refuses both claimants of the suspended identity."""
    cfg = config(clients=3, rounds=2)
    killed_after_round_one(quiet_strategy(cfg, tmp_path), InProcessGrid(3), cfg)
    with Registry.open(tmp_path / "registry") as reg:
        reg.contest("client-001", "nodes 1001, 1003 claimed it at once in round 2")
    resumed = quiet_strategy(cfg, tmp_path, console=recording_console())
    resumed.start(InProcessGrid(3), initial(cfg), num_rounds=2, train_config=train_config(cfg), resume=True)
    assert 1001 in resumed.nodes.refused and "client-001" not in resumed.nodes.customers.values()
    assert "identity 'client-001' is suspended: nodes 1001, 1003" in resumed.console.export_text()
    assert not (tmp_path / "customers" / "client-001.safetensors").exists()


# --- inner strategies -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("inner", [FedMedian(), FedTrimmedAvg(), Krum(), Bulyan(), QFedAvg(client_learning_rate=0.1)])
def test_strategies_that_need_individual_updates_are_refused_with_the_reason(inner):
    with pytest.raises(ValueError, match=r"cannot wrap .*weighted sum"):
        check_inner(inner)


def test_non_fedavg_strategies_are_refused():
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    with pytest.raises(ValueError, match="weighted mean"):
        check_inner(DifferentialPrivacyServerSideFixedClipping(FedAvg(), 1.0, 1.0, 2))


@pytest.mark.parametrize("inner", [FedAvgM(server_momentum=0.5), FedAdam()])
def test_server_optimizers_run_on_the_unmasked_mean(tmp_path, inner):
    cfg = config(clients=3)
    s = SecureMark(inner, tmp_path, fingerprint=cfg.fingerprint, secagg=cfg.secagg, console=Console(quiet=True))
    start = initial(cfg)
    s.start(InProcessGrid(3), start, num_rounds=1, train_config=train_config(cfg))
    moved = training.flatten(s.weights, s.names) - training.flatten(start.to_torch_state_dict(), s.names)
    assert s.rounds[0]["status"] == "completed" and np.abs(moved).max() > 0


def test_an_exception_in_the_users_train_function_is_reported_as_the_apps_own(tmp_path):
    def boom(arrays):
        raise RuntimeError("the user's own bug")

    bad, good = app_with(boom), app_with(good_reply)

    def app(msg, context):
        return (bad if context.node_id == 1000 else good)(msg, context)

    s, _, log = one_round(tmp_path, app, clients=4)
    assert "RuntimeError: the user's own bug" in log and "securemark_mod refused" not in log
    assert s.rounds[0]["status"] == "completed" and s.rounds[0]["survived"] == 3


def _mangle(stage, how):
    """A mod outside securemark_mod on node 1000 that breaks its reply at ``stage``."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if context.node_id != 1000 or not reply.has_content() or str(msg.content[wire.SM]["stage"]) != stage:
            return reply
        c = reply.content
        if how == "drop":
            for key in [k for k in c if k.startswith("securemark.")]:
                del c[key]
        elif how == "types":
            for key in [k for k in c if k.startswith("securemark.")]:
                c[key] = ConfigRecord({"ids": ["x"], "values": ["not bytes"], "count": "x", "c_pk": 5, "s_pk": "k"})
        return reply

    return mod


@pytest.mark.parametrize("how", ["drop", "types"])
@pytest.mark.parametrize("stage", [s for s in wire.STAGES if s != wire.SIGN])  # SIGN: tests/flower/test_malicious.py
def test_a_malformed_reply_at_any_stage_drops_that_node_and_never_ends_the_run(tmp_path, stage, how):
    s, _, log = one_round(tmp_path, app_with(good_reply, mods=[_mangle(stage, how), securemark_mod]), clients=4)
    assert "rejected node 1000" in log
    assert s.rounds[0]["status"] == "completed" and s.rounds[0]["survived"] >= 3


def _hostile(stage, change):
    """A mod outside securemark_mod on node 1000 that rewrites its reply's securemark records at ``stage``."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if context.node_id == 1000 and reply.has_content() and str(msg.content[wire.SM]["stage"]) == stage:
            change(reply.content)
        return reply

    return mod


def _set(key, field, value):
    def change(content):
        content[key][field] = value

    return change


def _empty_update(content):
    content[wire.UPDATE] = ArrayRecord()


def _update_of(array):
    def change(content):
        content[wire.UPDATE] = ArrayRecord({"0": array})

    return change


LOW_ORDER_KEY = (1).to_bytes(32, "little")


@pytest.mark.parametrize(
    ("stage", "change", "why"),
    [
        (wire.HELLO, lambda c: c[wire.PAYLOAD].pop("c_pk"), "KeyError"),  # keys without c_pk
        (wire.HELLO, _set(wire.PAYLOAD, "c_pk", "a string"), "32 bytes"),
        (wire.HELLO, _set(wire.PAYLOAD, "s_pk", LOW_ORDER_KEY), "low-order"),
        (wire.HELLO, _set(wire.PAYLOAD, "s_pk", bytes(32)), "low-order"),
        (wire.TRAIN, _set(wire.PAYLOAD, "values", "a string"), "disagree with its count"),  # shares as a string
        (wire.TRAIN, _empty_update, "IndexError"),  # an empty ArrayRecord update
        (wire.TRAIN, _update_of(Array(dtype="uint64", shape=(3,), stype="numpy.ndarray", data=b"")), "EOFError"),
        (wire.TRAIN, _update_of(Array(np.zeros(5, "datetime64[s]"))), "datetime64"),  # its checksum read before
        (wire.TRAIN, _set(wire.PAYLOAD, "commitments", b"short"), "commitments"),
        (wire.UNMASK, _set(wire.PAYLOAD, "shares", ["x"]), "count"),
        (wire.UNMASK, _set(wire.PAYLOAD, "owners", [1, 1, 1, 1, 1]), "count"),
    ],
)
def test_every_malformed_reply_drops_that_client_with_a_reason_and_the_run_goes_on(tmp_path, stage, change, why):
    cfg = config(clients=4, rounds=2)
    s = quiet_strategy(cfg, tmp_path, console=recording_console())
    grid = InProcessGrid(4, app=app_with(good_reply, mods=[_hostile(stage, change), securemark_mod]))
    s.start(grid, initial(cfg), num_rounds=2, train_config=train_config(cfg))
    log = s.console.export_text()
    assert "rejected node 1000" in log and why in log
    assert [m["status"] for m in s.rounds] == ["completed", "completed"]
    assert all(m["survived"] >= 3 for m in s.rounds)


def test_garbage_shares_fail_one_round_name_the_sender_and_it_is_not_admitted_again(tmp_path):
    def garbage(content):
        rec = content[wire.PAYLOAD]
        rec["values"] = [bytes(len(v)) for v in rec["values"]]

    cfg = config(clients=4, rounds=2)
    s = quiet_strategy(cfg, tmp_path, console=recording_console())
    grid = InProcessGrid(4, app=app_with(good_reply, mods=[_hostile(wire.TRAIN, garbage), securemark_mod]))
    s.start(grid, initial(cfg), num_rounds=2, train_config=train_config(cfg))
    log = s.console.export_text()
    assert [m["status"] for m in s.rounds] == ["failed", "completed"]
    assert "refused node 1000" in log and "could not open" in log
    assert 1000 in s.nodes.refused and s.rounds[1]["survived"] == 3


def test_steady_state_is_two_exchanges_a_round_and_a_node_that_lost_its_keys_is_rekeyed(tmp_path):
    cfg = config(clients=4, rounds=4)
    s = quiet_strategy(cfg, tmp_path, console=recording_console())
    grid = InProcessGrid(4, app=app_with(good_reply))
    real_push = grid.push_messages

    def push(messages):
        if any(str(m.content[wire.SM]["stage"]) == wire.TRAIN for m in messages) and s.rounds and len(s.rounds) == 2:
            grid.contexts[1002].state.pop(wire.KEYS, None)  # node 1002 restarted before round 3: keys lost
        return real_push(messages)

    grid.push_messages = push
    s.start(grid, initial(cfg), num_rounds=4, train_config=train_config(cfg))
    stages = [(m.metadata.group_id, str(m.content[wire.SM]["stage"]), m.metadata.dst_node_id) for m in grid.sent]
    hellos = [n for _, stage, n in stages if stage == wire.HELLO]
    assert sorted(hellos) == [1000, 1001, 1002, 1002, 1003]  # once per node; again for the node that lost its keys
    for r in ("2", "3", "4"):
        assert {stage for g, stage, _ in stages if g == r} == {wire.TRAIN, wire.UNMASK}
    assert [m["survived"] for m in s.rounds] == [4, 4, 3, 4]  # round 3 without 1002; round 4 with it, re-keyed
    assert all(m["status"] == "completed" for m in s.rounds)
    assert "no keys of this session" in s.console.export_text()


def test_an_example_count_above_max_weight_is_capped_never_refused(tmp_path):
    """A refusal that depended on the secret count would let a server binary-search it with max-weight."""
    big = app_with(lambda a: good_reply(a, **{"num-examples": 10**9}))
    good = app_with(good_reply)

    def app(msg, context):
        return (big if context.node_id == 1000 else good)(msg, context)

    s, _, log = one_round(tmp_path, app, clients=4)
    assert s.rounds[0]["status"] == "completed" and s.rounds[0]["survived"] == 4 and "refused" not in log


def test_a_node_that_masks_refuses_a_plain_train_request(tmp_path):
    cfg = config(clients=4, rounds=1)
    s = quiet_strategy(cfg, tmp_path)
    grid = InProcessGrid(4, app=app_with(good_reply))
    s.start(grid, initial(cfg), num_rounds=1, train_config=train_config(cfg))
    train = next(m for m in grid.sent if str(m.content[wire.SM]["stage"]) == wire.TRAIN)
    content = RecordDict({k: v for k, v in train.content.items() if k not in (wire.SECAGG, wire.PAYLOAD)})
    node = train.metadata.dst_node_id
    downgrade = Message(content, dst_node_id=node, message_type="train", group_id="9")
    reply = grid.app(downgrade, grid.contexts[node])
    assert reply.has_error() and "plain train request" in reply.error.reason
    for kind in ("train", "train.default"):  # a plain Flower message, no securemark record at all
        bare = Message(RecordDict({"arrays": train.content["arrays"], "config": ConfigRecord()}), dst_node_id=node,
                       message_type=kind, group_id="9")  # fmt: skip
        reply = grid.app(bare, grid.contexts[node])
        assert reply.has_error() and "plain train request to a node that masks" in reply.error.reason, kind


def _floor_grid(value, calls, clients=3):
    """Nodes whose config sets the masking floor to ``value``; ``calls`` counts the train function's runs."""

    def counted(arrays):
        calls.append(1)
        return good_reply(arrays)

    grid = InProcessGrid(clients, app=app_with(counted))
    for context in grid.contexts.values():
        context.node_config["securemark-require-masking"] = value
    return grid


@pytest.mark.parametrize("value", [True, "true", 1])
def test_a_node_that_requires_masking_never_trains_for_an_update_that_would_leave_unmasked(tmp_path, value):
    """The floor refuses, before any training: a plain Flower train message, and a securemark run without
    masking (every node refuses, the round fails with the model unchanged). A masked run goes on as usual, and
    an evaluate message passes."""
    calls = []
    grid = _floor_grid(value, calls)
    for kind in ("train", "train.default"):  # Flower runs @app.train() for "train.default" too
        plain = Message(RecordDict({"arrays": initial(config()), "config": ConfigRecord()}), dst_node_id=1000,
                        message_type=kind)  # fmt: skip
        [mid] = grid.push_messages([plain])
        [reply] = grid.pull_messages([mid])
        assert reply.has_error() and "requires masked aggregation" in reply.error.reason and not calls, kind

    cfg = config(clients=3, secagg=False)
    console = recording_console()
    s = strategy_for(cfg, tmp_path / "plain", max_weight=2000, console=console)
    s.start(grid, initial(cfg), num_rounds=1, train_config=train_config(cfg))
    assert s.rounds[0]["status"] == "failed" and not calls
    assert console.export_text().count("requires masked aggregation") == 3

    cfg = config(clients=3)
    s = quiet_strategy(cfg, tmp_path / "masked")
    s.start(grid, initial(cfg), num_rounds=1, train_config=train_config(cfg))
    assert s.rounds[0]["status"] == "completed" and s.rounds[0]["survived"] == 3 and len(calls) == 3

    evaluate = Message(RecordDict({"arrays": initial(config()), "config": ConfigRecord()}), dst_node_id=1001,
                       message_type="evaluate")  # fmt: skip
    [mid] = grid.push_messages([evaluate])
    [reply] = grid.pull_messages([mid])
    assert not reply.has_error() or "requires masked aggregation" not in reply.error.reason


@pytest.mark.parametrize(("value", "refused"), [(False, False), ("false", False), (0, False), ("yes", True), (2, True)])
def test_the_masking_floor_is_off_only_when_said_off_and_a_bad_value_fails_closed(value, refused):
    calls = []
    grid = _floor_grid(value, calls, clients=1)
    misspelt = ("securemark_require_masking", "securemark-requires-masking", "SecureMark-require-masking",
                "SECUREMARK_REQUIRE_MASKING", "require-masking", "masking-required", "requires_masking",
                "require-secagg")  # fmt: skip
    for key in misspelt:  # a misspelt floor fails closed
        context = grid.contexts[1000]
        context.node_config[key] = True
        plain = Message(RecordDict({"arrays": initial(config()), "config": ConfigRecord()}), dst_node_id=1000,
                        message_type="train")  # fmt: skip
        [mid] = grid.push_messages([plain])
        [reply] = grid.pull_messages([mid])
        assert reply.has_error() and f"unknown node config key {key!r}" in reply.error.reason and not calls
        del context.node_config[key]
    plain = Message(RecordDict({"arrays": initial(config()), "config": ConfigRecord()}), dst_node_id=1000,
                    message_type="train")  # fmt: skip
    [mid] = grid.push_messages([plain])
    [reply] = grid.pull_messages([mid])
    assert reply.has_error() is refused and len(calls) == (0 if refused else 1)
    if refused:
        assert f"must be true or false, got {value!r}" in reply.error.reason


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda r: [r[0] * 2, *r[1:]], "bound to another quantization"),  # what a lying server tells its victim
        (lambda r: r[:-1], "one range for each of 4 tensors"),
        (lambda r: [-1.0, *r[1:]], "quantization is malformed"),
    ],
)
def test_a_node_refuses_ranges_the_rounds_keys_are_not_bound_to(tmp_path, edit, why):
    """Node 1000 is sent other quantization ranges than the round's keys are bound to (or malformed ones): it
    masks nothing and says why; the round goes on with the other three."""
    from securemark.flower.client_app import app as shipped_app

    errors = {}

    def app(msg, context):
        if context.node_id == 1000 and wire.SM in msg.content and str(msg.content[wire.SM]["stage"]) == wire.TRAIN:
            msg.content[wire.SM]["ranges"] = edit(list(msg.content[wire.SM]["ranges"]))
        reply = shipped_app(msg, context)
        if reply.has_error():
            errors[context.node_id] = reply.error.reason
        return reply

    cfg = config(clients=4, rounds=1)
    s = quiet_strategy(cfg, tmp_path)
    s.start(InProcessGrid(4, app=app), initial(cfg), num_rounds=1, train_config=train_config(cfg))
    assert list(errors) == [1000] and why in errors[1000]
    assert s.rounds[0]["status"] == "completed" and s.rounds[0]["survived"] == 3 and s.rounds[0]["clipped"] == 0


def test_a_server_that_names_another_metric_as_the_weight_never_reads_the_example_count(tmp_path):
    """A lying server names another whole-number metric the app reports (epochs) as the weight key: the node
    masks that as the weight, and still never sends the count in clear among the other metrics, whether the
    app calls it num-examples or samples, as an int or a whole float; a loss passes."""
    replies = []
    counts = {"num-examples": 137, "epochs": 1, "samples": 1234, "seen": 1234.0, "per-class": [3, 4], "loss": 0.25}
    inner = app_with(lambda a: good_reply(a, **counts))

    def app(msg, context):
        if wire.SM in msg.content and str(msg.content[wire.SM]["stage"]) == wire.TRAIN:
            msg.content[wire.SM]["weight-key"] = "epochs"
        reply = inner(msg, context)
        replies.append(reply)
        return reply

    s, _, _ = one_round(tmp_path, app, clients=3)
    trained = [r for r in replies if not r.has_error() and wire.UPDATE in r.content]
    assert len(trained) == 3 and s.rounds[0]["status"] == "completed"
    for r in trained:
        clear = {k: v for rec in r.content.metric_records.values() for k, v in rec.items()}
        assert clear == {"loss": 0.25}


def test_clipping_is_said_on_the_round_line_warned_and_widens_the_range(tmp_path):
    """Updates of 5,000 in every value pass the first round's range of 2,048: the round line gives the clipped
    count and share, a warning names the tensors and the cure. Every weight then moved by 2,048 (the clipped
    mean) from an initial value within +-1, so round 2's range is pow2ceil(4 x 16 x (2,048 + a bit)) = 262,144:
    the same updates pass."""
    big = app_with(lambda a: RecordDict({"arrays": ArrayRecord({k: Array(v.numpy() + 5000.0) for k, v in a.items()}),
                                         "metrics": MetricRecord({"num-examples": 10})}))  # fmt: skip
    cfg = config(clients=3, rounds=2, fingerprint=False)
    console = recording_console()
    s = quiet_strategy(cfg, tmp_path, console=console)
    grid = InProcessGrid(3, app=big)
    s.start(grid, initial(cfg), num_rounds=2, train_config=train_config(cfg))
    first, second = s.rounds[0], s.rounds[1]
    assert first["clipped"] == 3 * s.size and first["clipped_share"] == 1.0 and len(first["widened"]) == 4
    text = console.export_text()
    assert f"clipped {3 * s.size:,} (1.0e+00)" in text and "raise secagg.clip" in text
    ranges = [list(m.content[wire.SM]["ranges"]) for m in grid.sent if str(m.content[wire.SM]["stage"]) == wire.TRAIN]
    assert ranges[0] == [2048.0] * 4 and ranges[-1] == [262144.0] * 4 and second["clipped"] == 0


def test_a_run_says_what_it_makes(tmp_path):
    """At the start the registry and the code (with the customers it serves, and a warning when the run has
    more), a clipped count on every masked round line, at the end where the final copies went."""
    cfg = config(clients=4, rounds=1)
    console = recording_console()
    s = quiet_strategy(cfg, tmp_path, console=console)
    s.start(InProcessGrid(4), initial(cfg), num_rounds=1, train_config=train_config(cfg))
    text = console.export_text()
    assert f"registry {tmp_path / 'registry'}: tardos code L=128, c_max=3, eps=0.001" in text
    assert "sized for 0 customers" in text and "4 customers and L=128: a coalition of 3 may escape" in text
    assert "round 1: completed" in text and "clipped 0" in text
    assert f"final copies: 4 in {tmp_path / 'customers'}" in text and "bit error at most 0.000" in text
    default = SecureMark(FedAvg(), tmp_path / "other", console=recording_console())
    assert (default.fingerprint.length, default.fingerprint.max_colluders) == (2048, 5)  # registry init's code


def test_an_aggregate_that_overflows_the_model_fails_the_round_and_a_huge_metric_is_ignored(tmp_path):
    cfg = config(clients=4, secagg=False, rounds=2)
    s = quiet_strategy(cfg, tmp_path, console=recording_console())

    def huge(a):
        return good_reply(ArrayRecord({k: Array(np.full(v.shape, 1e300)) for k, v in a.items()}), loss=10**400)

    bad, good = app_with(huge), app_with(lambda a: good_reply(a, loss=10**400))

    def app(msg, context):
        return (bad if context.node_id == 1000 else good)(msg, context)

    start = initial(cfg)
    s.start(InProcessGrid(4, app=app), start, num_rounds=2, train_config=train_config(cfg))
    assert [m["status"] for m in s.rounds] == ["failed", "failed"] and "overflows" in s.rounds[0]["reason"]
    assert (tmp_path / "global.safetensors").is_file()  # the run finished with the model unchanged


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda st: st.update(files={}), "'files' must name"),
        (lambda st: st.update(strength=float("nan")), "'strength'"),
        (lambda st: st.update(round="1"), "'round'"),
        (lambda st: st.update(rounds=[]), "'rounds'"),
        (lambda st: st.update(registry="0" * 64), "another registry"),
        (lambda st: st.update(inner="FedAdam"), "made with FedAdam"),
    ],
)
def test_a_damaged_or_foreign_checkpoint_is_refused(tmp_path, edit, why):
    import json

    cfg = config(clients=3, rounds=2)
    s = quiet_strategy(cfg, tmp_path)
    s.start(InProcessGrid(3), initial(cfg), num_rounds=1, train_config=train_config(cfg))
    path = tmp_path / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    resumed = quiet_strategy(cfg, tmp_path)
    with pytest.raises(ValueError, match=why):
        resumed.start(InProcessGrid(3), initial(cfg), num_rounds=2, train_config=train_config(cfg), resume=True)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        resumed.start(InProcessGrid(3), initial(cfg), num_rounds=2, train_config=train_config(cfg), resume=True)


def test_the_shipped_client_app_imports_no_torch_until_it_trains():
    """A deployed SuperNode starts a process per message; those answering hello and unmask skip torch."""
    import subprocess
    import sys

    code = (
        "import sys, securemark.flower.client_app, securemark.flower as f\n"
        "assert 'torch' not in sys.modules, 'torch imported by the ClientApp module'\n"
        "f.SecureMark\n"
        "assert 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@contextlib.contextmanager
def deadline(seconds):
    """A run that hangs waiting for nodes fails the test instead of hanging the suite."""

    def hung(*_):
        raise TimeoutError("the run hangs waiting for nodes")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("gone", [1, 3])
def test_nodes_gone_mid_run_cost_a_round_the_grace_and_never_hang_it(tmp_path, gone):
    """FedAvg waits forever for min_available_nodes (all 4 here); after a node vanishes, each later round
    waits secagg.grace for it, then samples the nodes left (or fails the round when fewer than 2 are left)."""
    cfg = SimConfig.from_flat({**config(clients=4).to_flat(), "secagg.grace": 0.3})
    s = quiet_strategy(cfg, tmp_path, console=recording_console())
    grid = InProcessGrid(4)
    real = s._checkpoint

    def checkpoint_then_lose_nodes(r):
        real(r)
        if r == 1:
            for node in list(grid.contexts)[-gone:]:
                del grid.contexts[node]

    s._checkpoint = checkpoint_then_lose_nodes

    with deadline(120):
        s.start(grid, initial(cfg), num_rounds=3, train_config=train_config(cfg))
    log = s.console.export_text()
    if gone == 1:
        assert [m["status"] for m in s.rounds] == ["completed"] * 3
        assert [m["survived"] for m in s.rounds] == [4, 3, 3] and "3 of the 4 nodes" in log
    else:
        assert [m["status"] for m in s.rounds] == ["completed", "failed", "failed"]
        assert "1 node(s) connected, the strategy asks for 4" in s.rounds[1]["reason"]
    assert s.inner.min_available_nodes == 4 and s.inner.min_train_nodes == 4  # restored after each call


class FlakyGrid(InProcessGrid):
    """Node 1003 is listed only on the calls whose number ``listed`` accepts (a node leaving or coming back)."""

    def __init__(self, clients, listed, **kw):
        super().__init__(clients, **kw)
        self.calls, self.listed = 0, listed

    def get_node_ids(self):
        self.calls += 1
        return [n for n in super().get_node_ids() if n != 1003 or self.listed(self.calls)]


def test_the_inner_strategy_samples_a_frozen_node_list_and_a_resumed_run_waits_for_its_nodes(tmp_path):
    """A node leaving between SecureMark's count and the inner strategy's sampling cannot hang FedAvg; the first
    round after a resume waits the start timeout for nodes that are still reconnecting, not the grace."""
    cfg = SimConfig.from_flat({**config(clients=4).to_flat(), "secagg.grace": 0.1})
    s = quiet_strategy(cfg, tmp_path)
    grid = FlakyGrid(4, listed=lambda call: call == 1)  # counted once, gone when FedAvg looks
    killed_after_round_one(s, grid, cfg)
    assert s.rounds[0]["status"] == "completed" and s.rounds[0]["sampled"] == 4  # the list FedAvg sampled was frozen

    s = quiet_strategy(cfg, tmp_path)
    begun = time.monotonic()
    grid = FlakyGrid(4, listed=lambda call: time.monotonic() > begun + 1.0)  # back after 1 s, 10x the grace
    s.start(grid, initial(cfg), num_rounds=2, timeout=60, train_config=train_config(cfg), resume=True)
    assert s.rounds[1]["status"] == "completed" and s.rounds[1]["sampled"] == 4
    with pytest.raises(FileExistsError, match="finished run"):  # a finished run is not extended by a resume
        quiet_strategy(cfg, tmp_path).start(grid, initial(cfg), num_rounds=3, resume=True)


def test_inner_strategies_whose_sampling_would_wait_forever_are_refused():
    for bad in ({"fraction_train": 1.5}, {"min_train_nodes": float("nan")}, {"min_available_nodes": -1}):
        with pytest.raises(ValueError, match="must be a number"):
            check_inner(FedAvg(**bad))
    check_inner(FedAvg(min_available_nodes=np.int64(4), min_train_nodes=2.0))  # numbers Flower handles


@pytest.mark.parametrize("held", [20, 360])
def test_a_model_the_function_mark_cannot_fit_gets_copies_without_it_never_a_failed_round(tmp_path, held):
    """20 held-out inputs are too few to fit any component after skipping 10: the rounds complete, the copies
    carry the white-box mark alone, and one line says why (once, not every round). With 360 the copies of
    every model a round trained carry it (round 1's, of the initial model, do not: the next test)."""
    from securemark import data
    from securemark.models import spec_of
    from securemark.owner import FunctionSpec

    cfg = config(rounds=2, clients=3)
    test = data.server_split(cfg.data, cfg.train.seed)[1]
    spec = FunctionSpec(spec_of("mlp", (1, 8, 8), 10), test.x[:held], data.heldout_record(cfg.data, 1))
    console = recording_console()
    s = strategy_for(cfg, tmp_path, 2000, console, spec)
    s.start(InProcessGrid(3), initial(cfg), num_rounds=2, train_config=train_config(cfg))
    log = console.export_text()
    assert [m["status"] for m in s.rounds] == ["completed", "completed"]
    assert all(m["max_bit_error"] == 0.0 for m in s.rounds)
    if held == 20:
        assert log.count("carry no function mark: 20 distinct held-out inputs are too few") == 1
        assert not any("min_function_cosine" in m for m in s.rounds)
    else:
        assert "no function mark" not in log and s.rounds[1]["min_function_cosine"] > 0.7


@pytest.mark.parametrize("marked_initial", [False, True])
def test_copies_of_the_initial_model_carry_the_function_mark_only_when_asked(tmp_path, marked_initial):
    """A fresh run's initial model has features the first round rewrites, and a head edited for them set a
    ResNet-8's round 1 back (0.36 against 0.80): its copies carry the white-box mark alone, said once, and its
    base records no function mark; fingerprint.function_initial marks them too (a pretrained initial model).
    Copies of every later model carry it either way."""
    import dataclasses

    from securemark import data
    from securemark.models import spec_of
    from securemark.owner import FunctionSpec
    from securemark.registry import Registry
    from securemark.registry.marks import function_mark_of

    cfg = config(rounds=2, clients=3)
    every = dataclasses.replace(cfg.fingerprint, function_initial=marked_initial, anchor_every=1)  # every model kept
    cfg = dataclasses.replace(cfg, fingerprint=every)
    test = data.server_split(cfg.data, cfg.train.seed)[1]
    spec = FunctionSpec(spec_of("mlp", (1, 8, 8), 10), test.x[:360], data.heldout_record(cfg.data, 1))
    console = recording_console()
    s = strategy_for(cfg, tmp_path, 2000, console, spec)
    s.start(InProcessGrid(3), initial(cfg), num_rounds=2, train_config=train_config(cfg))
    log = console.export_text()
    assert [m["status"] for m in s.rounds] == ["completed", "completed"]
    assert ("min_function_cosine" in s.rounds[0]) is marked_initial and s.rounds[1]["min_function_cosine"] > 0.7
    assert log.count("copies of the initial model carry the white-box mark alone") == (0 if marked_initial else 1)
    with Registry.open(tmp_path / "registry") as reg:
        marked = [function_mark_of(reg, b.digest) is not None for b in reg.bases()]
    assert marked == [marked_initial, True, True]  # the initial model, round 1's, round 2's (the final copies)


def test_the_initial_model_stays_unmarked_by_the_function_mark_until_a_round_has_trained_it(tmp_path):
    """Round 1 fails (every node errs), so round 2 copies the initial model again: its copies still carry no
    function mark, in one run and in a run killed in round 2 and resumed (the rule is "no round completed",
    not "round 1")."""
    from securemark import data
    from securemark.models import spec_of
    from securemark.owner import FunctionSpec
    from securemark.registry.marks import function_mark_of

    inner = app_with(good_reply)

    def busy_in_round_one(msg, context):
        if wire.SM in msg.content and str(msg.content[wire.SM]["stage"]) == wire.TRAIN and msg.metadata.group_id == "1":
            raise RuntimeError("node busy in round 1")
        return inner(msg, context)

    cfg = config(rounds=2, clients=3)
    test = data.server_split(cfg.data, cfg.train.seed)[1]
    spec = FunctionSpec(spec_of("mlp", (1, 8, 8), 10), test.x[:360], data.heldout_record(cfg.data, 1))
    for resumed in (False, True):
        out = tmp_path / str(resumed)
        s = strategy_for(cfg, out, 2000, recording_console(), spec)
        if resumed:
            killed_after_round_one(s, InProcessGrid(3, app=busy_in_round_one), cfg)
            s = strategy_for(cfg, out, 2000, recording_console(), spec)
        s.start(InProcessGrid(3, app=busy_in_round_one), initial(cfg), num_rounds=2, train_config=train_config(cfg),
                resume=resumed)  # fmt: skip
        assert [m["status"] for m in s.rounds] == ["failed", "completed"], resumed
        assert "min_function_cosine" not in s.rounds[1], resumed
        with Registry.open(out / "registry") as reg:
            assert [function_mark_of(reg, b.digest) is not None for b in reg.bases()] == [False, True], resumed


def test_a_function_spec_that_names_another_model_stops_the_run_before_its_first_round(tmp_path):
    """A caller's mistake (a spec for a 64-unit MLP beside a 128-unit one) is no model that cannot carry the
    mark: the run stops before it makes anything, and says why; no copy goes out unmarked."""
    from securemark import data
    from securemark.fingerprint.function import FunctionMarkError
    from securemark.models import spec_of
    from securemark.owner import FunctionSpec

    cfg = config(rounds=1, clients=3)
    test = data.server_split(cfg.data, cfg.train.seed)[1]
    spec = FunctionSpec(spec_of("mlp", (1, 8, 8), 10, width=64), test.x, data.heldout_record(cfg.data, 1))
    s = strategy_for(cfg, tmp_path / "run", 2000, Console(quiet=True), spec)
    grid = InProcessGrid(3)
    with pytest.raises(FunctionMarkError, match=r"not the mlp model the config names: .* size mismatch"):
        s.start(grid, initial(cfg), num_rounds=1, train_config=train_config(cfg))
    assert grid.sent == [] and not (tmp_path / "run").exists()


def test_a_run_registers_the_architecture_it_is_given(tmp_path):
    """SecureMark(model=, example_input=) keeps the model's unit groups in the run's registry; a model without
    its input shape, or one its graph cannot cover, is refused before any round."""
    from torch import nn

    from securemark.corpus.resnet import resnet8
    from securemark.fingerprint.groups import AlignmentError
    from securemark.registry import Registry

    cfg = config(clients=3)
    model = resnet8(width=8)
    s = SecureMark(FedAvg(), tmp_path / "out", fingerprint=cfg.fingerprint, secagg=cfg.secagg,
                   console=Console(quiet=True), model=model, example_input=(1, 3, 32, 32))  # fmt: skip
    s.copies.create(tmp_path / "out", {k: v.detach().clone() for k, v in model.state_dict().items()})
    s.copies.registry.close()
    with Registry.open(tmp_path / "out" / "registry") as reg:
        record = reg.arch()
    assert record["target"] == "securemark.corpus.resnet:ResNet" and record["example"] == [1, 3, 32, 32]
    assert len(record["groups"]) == 6  # three stage streams, three blocks' hidden channels
    with pytest.raises(ValueError, match="needs example_input"):
        SecureMark(FedAvg(), tmp_path / "b", model=model)
    gated = nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(AlignmentError, match="grouped convolution"):
        SecureMark(FedAvg(), tmp_path / "c", model=gated, example_input=(1, 3, 8, 8))
