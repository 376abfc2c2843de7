"""secagg.threat = "malicious" through the real mod and ClientApp: nodes that hold the owner's roster sign their
keys and each round's survivors, and refuse, with a reason the server logs, a server that swaps a key, shows
nodes different survivor lists or configurations, or replays a round."""

import copy
import dataclasses
import io
import os

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from rich.console import Console

from securemark.config import SimConfig
from securemark.flower import wire
from securemark.flower.server_app import strategy_for, train_config
from securemark.flower.signers import ROSTER, SIGNING_KEY, STATE_DIR
from securemark.models import build
from securemark.secagg import protocol as P
from securemark.secagg import roster as R

from .inprocess import InProcessGrid

N = 5


def config(rounds=1, threat="malicious", roster=""):
    return SimConfig.from_dict(
        {
            "data": {"name": "digits"},
            "model": {"name": "mlp"},
            "train": {"rounds": rounds, "clients": N, "per_round": N, "local_epochs": 1, "seed": 1},
            "fingerprint": {"enabled": False},
            "secagg": {"enabled": True, "threat": threat, "roster": roster},
        }
    )


def initial():
    return ArrayRecord({k: v.detach().clone() for k, v in build("mlp", (1, 8, 8), 10, seed=1).state_dict().items()})


@pytest.fixture
def deployment(tmp_path):
    """A roster the owner made (``securemark roster init``) and nodes whose config names their files."""
    folder = tmp_path / "roster"
    R.make([f"node-{k}" for k in range(N)], folder)
    grid = InProcessGrid(N)
    for k, node in enumerate(sorted(grid.contexts)):
        grid.contexts[node].node_config.update(
            {ROSTER: str(folder / "roster.json"), SIGNING_KEY: str(folder / f"node-{k}.key"), STATE_DIR: str(tmp_path)}
        )
    return grid, folder / "roster.json"


def strategy(cfg, tmp_path):
    console = Console(record=True, width=400, file=io.StringIO())
    return strategy_for(cfg, tmp_path / "run", max_weight=2000, console=console)


def stages(grid, stage):
    return [m for m in grid.sent if str(m.content[wire.SM]["stage"]) == stage]


def test_signed_rounds_train_and_every_node_signs_each_rounds_survivors(tmp_path, deployment):
    grid, roster = deployment
    s = strategy(config(rounds=2, roster=str(roster)), tmp_path)
    s.start(grid, initial(), num_rounds=2, train_config=train_config(config()))
    assert [r["status"] for r in s.rounds] == ["completed", "completed"]
    assert [r["survived"] for r in s.rounds] == [N, N]
    assert len(stages(grid, wire.SIGN)) == 2 * N
    unmasks = stages(grid, wire.UNMASK)
    assert all(wire.bytes_map_from(m.content[wire.SIGNATURES]).keys() == set(range(1, N + 1)) for m in unmasks)
    assert "sign" in s.rounds[1]["stage_seconds"]


def _refusals(s, stage):
    return [why for why in s.nodes.failures.get(stage, [])]


@pytest.mark.parametrize("in_round", [False, True])
def test_a_swapped_key_is_refused_by_the_node_it_was_sent_to(tmp_path, deployment, in_round):
    """The server hands client 1 a key of its own for client 2: in the key map alone, or in the round's list of
    session keys too (then the advert's signature is what fails)."""
    grid, roster = deployment
    s = strategy(config(roster=str(roster)), tmp_path)
    real_setup = s.sum.setup
    fake, swapped = P.public_bytes(P.NodeKeys("x", 9).s_key), {}

    def setup(r, sampled, tensors, train):
        records = real_setup(r, sampled, tensors, train)
        rec = records[1000]
        keys = wire.key_map_from(rec[wire.PAYLOAD])
        j = swapped["of"] = min(keys)  # a neighbour of node 1000
        keys[j] = (keys[j][0], fake)
        rec[wire.PAYLOAD] = wire.key_map(keys, wire.adverts_from(rec[wire.PAYLOAD]))
        if in_round:
            cfg, cid = wire.round_config_from(ConfigRecord(rec[wire.SECAGG]))
            named = tuple((i, c, fake if i == j else k) for i, c, k in cfg.keys)
            rec[wire.SECAGG] = wire.round_config_record(dataclasses.replace(cfg, keys=named), cid)
        return records

    s.sum.setup = setup
    s.start(grid, initial(), num_rounds=1, train_config=train_config(config()))
    why = _refusals(s, wire.TRAIN)
    assert len(why) == 1 and "SignatureError" in why[0]
    assert (f"keys of client {swapped['of']}" in why[0]) == in_round and ("other session keys" in why[0]) != in_round
    assert s.rounds[0]["survived"] == N - 1  # refused before masking: the others go on without it


def lax_server(monkeypatch):
    """A lying server keeps and relays every signature a node sends, valid or not (it skips its own checks)."""
    import securemark.flower.aggregate as agg

    got = {}

    def keep(cfg, statement, roster, i, content):
        got[i] = content[wire.PAYLOAD]["signature"]
        return got[i]

    monkeypatch.setattr(agg, "_apply_signature", keep)
    return got


def test_different_survivor_lists_are_refused_by_every_node(tmp_path, deployment, monkeypatch):
    """The server shows the nodes two lists (node 5 dropped in one: the pair seeds of 5 from some, its b_5 from
    the others) and, skipping its own checks, sends every node whatever signatures it got."""
    grid, roster = deployment
    s = strategy(config(roster=str(roster)), tmp_path)
    real_send = s.nodes.send

    def send(stage, contents, r, timeout, need=None):
        if stage == wire.SIGN:
            for n in sorted(contents)[:3]:
                p = contents[n][wire.PAYLOAD]
                contents[n][wire.PAYLOAD] = ConfigRecord({**p, "survivors": [i for i in p["survivors"] if i != 5]})
        if stage == wire.UNMASK:
            for n in contents:
                contents[n][wire.SIGNATURES] = wire.bytes_map(got)
        return real_send(stage, contents, r, timeout, need)

    got = lax_server(monkeypatch)
    s.nodes.send = send
    s.start(grid, initial(), num_rounds=1, train_config=train_config(config()))
    assert s.rounds[0]["status"] == "failed"
    why = _refusals(s, wire.UNMASK)
    assert len(why) == N and all("SignatureError" in w for w in why)  # every node, each with its reason
    assert sum("it signed" in w for w in why) == 3 and sum("valid signatures" in w for w in why) == 2


def test_other_parameters_for_one_node_are_refused_by_it_and_its_update_stays_hidden(tmp_path, deployment):
    """Node 1000 is told another weight cap (and a round configuration bound to it, so it masks): it signs
    another configuration, finds no quorum for it and reveals nothing; its self-mask is never rebuilt."""
    grid, roster = deployment
    s = strategy(config(roster=str(roster)), tmp_path)
    real_setup = s.sum.setup

    def setup(r, sampled, tensors, train):
        records = real_setup(r, sampled, tensors, train)
        rec = records[1000]
        rec[wire.SM] = {**rec[wire.SM], "max-weight": 1999}
        cfg, cid = wire.round_config_from(ConfigRecord(rec[wire.SECAGG]))
        from securemark.flower.contract import quantization as _quantization

        sizes = [n for _, n, _ in tensors]
        q = _quantization(ConfigRecord(rec[wire.SM]), sizes)
        rec[wire.SECAGG] = wire.round_config_record(dataclasses.replace(cfg, encoding=q.digest()), cid)
        return records

    s.sum.setup = setup
    s.start(grid, initial(), num_rounds=1, train_config=train_config(config()))
    assert s.rounds[0]["status"] == "failed"
    unmask_why = _refusals(s, wire.UNMASK)
    assert len(unmask_why) == 1 and "0 valid signatures" in unmask_why[0]
    assert "its shares cannot be opened or rebuilt" in s.console.export_text()


@pytest.mark.parametrize("how", ["drop", "types", "forged"])
def test_a_malformed_or_forged_signature_drops_that_node_and_the_round_goes_on(tmp_path, deployment, how):
    grid, roster = deployment
    real_app = grid.app

    def app(msg, context):
        reply = real_app(msg, context)
        if context.node_id == 1000 and str(msg.content[wire.SM]["stage"]) == wire.SIGN:
            if how == "drop":
                del reply.content[wire.PAYLOAD]
            elif how == "types":
                reply.content[wire.PAYLOAD] = ConfigRecord({"signature": "not bytes"})
            else:
                reply.content[wire.PAYLOAD] = ConfigRecord({"signature": bytes(64)})
        return reply

    grid.app = app
    s = strategy(config(roster=str(roster)), tmp_path)
    s.start(grid, initial(), num_rounds=1, train_config=train_config(config()))
    assert "rejected node 1000" in s.console.export_text()
    assert s.rounds[0]["status"] == "completed" and s.rounds[0]["survived"] == N  # its input still counts


def to_all_but_1000(s, change):
    """A lying server: ``change(message)`` on every train message but node 1000's, as it goes out."""
    real_messages = s._train_messages

    def messages(r, inner, records):
        for m in real_messages(r, inner, records):
            if m.metadata.dst_node_id != 1000:
                change(m)
            yield m

    s._train_messages = messages


@pytest.mark.parametrize("consistent", [False, True])
def test_another_training_configuration_for_the_others_leaves_the_victims_update_hidden(
    tmp_path, deployment, monkeypatch, consistent
):
    """A learning rate of 0 for every node but 1000 would make the round's sum 1000's update (an attack review
    read it, correlation 1.0). The training configuration is part of the signed round: told it plainly, the
    others refuse before training; told a round that names it, their masks never cancel 1000's, 1000 finds no
    quorum for its own, and its self-mask is never rebuilt."""
    grid, roster = deployment
    s = strategy(config(roster=str(roster)), tmp_path)

    def lr_zero(m):
        m.content["config"]["lr"] = 0.0
        if consistent:
            cfg, cid = wire.round_config_from(m.content[wire.SECAGG])
            digest = wire.train_digest(m.content, str(m.content[wire.SM]["weight-key"]))
            m.content[wire.SECAGG] = wire.round_config_record(dataclasses.replace(cfg, train=digest), cid)

    to_all_but_1000(s, lr_zero)
    lax_server(monkeypatch)
    s.start(grid, initial(), num_rounds=1, train_config=train_config(config()))
    assert s.rounds[0]["status"] == "failed"
    if not consistent:
        why = _refusals(s, wire.TRAIN)
        assert len(why) == N - 1 and all("another training configuration" in w for w in why)
    else:
        victim = s.nodes.ids[1000]
        assert [w for w in _refusals(s, wire.UNMASK)] == [w for w in _refusals(s, wire.UNMASK) if "1 valid" in w]
        opened = [wire.reveals_from(r.content[wire.PAYLOAD]) for r in grid.replied(wire.UNMASK) if not r.has_error()]
        assert len(opened) == N - 1  # the others revealed for their own statement...
        assert all(victim in bad and (victim, 0) not in shares for shares, bad in opened)  # ...nothing of 1000's


def test_two_sign_requests_at_once_get_one_signature_from_each_node(tmp_path, deployment):
    """Flower gives each message a copy of the node's state and keeps the copy of the one that ends last: a
    server that sends a second list at once finds the first list's record missing from that copy. The record on
    the node's disk is not: each node signs one of the two lists (an attack review had every node sign both)."""
    grid, roster = deployment
    s = strategy(config(roster=str(roster)), tmp_path)
    real_send, raced = s.nodes.send, {}

    def send(stage, contents, r, timeout, need=None):
        if stage == wire.SIGN:
            for n, content in contents.items():
                p = content[wire.PAYLOAD]
                other = [i for i in p["survivors"] if i != max(p["survivors"])]
                saved = grid.contexts[n]
                grid.contexts[n] = copy.deepcopy(saved)  # the state as a second process reads it, then dropped
                msg = Message(
                    RecordDict(
                        {
                            wire.SM: ConfigRecord({"stage": wire.SIGN}),
                            wire.PAYLOAD: ConfigRecord({"survivors": other, "round": p["round"]}),
                        }
                    ),
                    dst_node_id=n,
                    message_type=wire.MESSAGE_TYPE,
                )
                raced[n] = grid.pull_messages(grid.push_messages([msg]))[0]  # fmt: skip
                grid.contexts[n] = saved
        return real_send(stage, contents, r, timeout, need)

    s.nodes.send = send
    s.start(grid, initial(), num_rounds=1, train_config=train_config(config()))
    signed_first = {n for n, rep in raced.items() if not rep.has_error()}
    assert len(signed_first) == N - 1  # the node left off the second list refuses it
    why = _refusals(s, wire.SIGN)
    assert len(why) == N - 1 and all("already" in w for w in why)  # each of them signs no second list
    assert s.rounds[0]["status"] == "failed"


def test_a_hello_with_keys_of_the_wrong_type_drops_that_node_and_the_run_goes_on(tmp_path, deployment):
    grid, roster = deployment
    real_app = grid.app

    def app(msg, context):
        reply = real_app(msg, context)
        if context.node_id == 1000 and str(msg.content[wire.SM]["stage"]) == wire.HELLO and wire.SESSION in msg.content:
            reply.content[wire.PAYLOAD]["c_pk"] = "not bytes"
        return reply

    grid.app = app
    s = strategy(config(roster=str(roster)), tmp_path)
    s.start(grid, initial(), num_rounds=1, train_config=train_config(config()))
    assert "rejected node 1000" in s.console.export_text()
    assert s.rounds[0]["status"] == "completed" and s.rounds[0]["survived"] == N - 1


def test_the_weight_metric_is_part_of_the_signed_round(tmp_path, deployment):
    """A server naming another whole-number metric as the weight for some nodes of a group would read the
    others' count from the group's total (an attack review read one exactly): the weight key is in the signed
    training configuration, so the nodes told another one refuse before training."""
    grid, roster = deployment
    s = strategy(config(roster=str(roster)), tmp_path)
    to_all_but_1000(s, lambda m: m.content[wire.SM].__setitem__("weight-key", "train_loss"))
    s.start(grid, initial(), num_rounds=1, train_config=train_config(config()))
    why = _refusals(s, wire.TRAIN)
    assert len(why) == N - 1 and all("another training configuration" in w for w in why)


@pytest.mark.parametrize("session", ["/tmp/elsewhere", "../../x", "a", "0123456789abcdef/../x"])
def test_a_session_name_that_is_no_plain_hex_id_is_refused(tmp_path, deployment, session):
    """Session names reach the node's record folder only as a hash, and the hello refuses anything but hex."""
    grid, roster = deployment
    s = strategy(config(roster=str(roster)), tmp_path)
    s.nodes.keys.session = session
    s.start(grid, initial(), num_rounds=1, train_config=train_config(config()))
    assert s.rounds[0]["status"] == "failed"
    assert all("a hex name" in w for w in s.nodes.failures[wire.HELLO]) and len(s.nodes.failures[wire.HELLO]) == N


def test_the_record_folder_must_be_this_users_alone(tmp_path, deployment):
    grid, roster = deployment
    planted = tmp_path / f"securemark-nodes-{os.getuid()}"
    planted.mkdir(mode=0o777)
    os.chmod(planted, 0o777)  # another user's folder would look like this (or a link)
    s = strategy(config(roster=str(roster)), tmp_path)
    s.start(grid, initial(), num_rounds=1, train_config=train_config(config()))
    assert s.rounds[0]["status"] == "failed"
    assert all("closed to others" in w for w in s.nodes.failures[wire.SIGN]) and len(s.nodes.failures[wire.SIGN]) == N


def test_a_replayed_round_is_refused_by_every_node(tmp_path, deployment):
    grid, roster = deployment
    s = strategy(config(rounds=1, roster=str(roster)), tmp_path)
    s.start(grid, initial(), num_rounds=1, train_config=train_config(config()))
    for stage in (wire.TRAIN, wire.SIGN, wire.UNMASK):
        old = stages(grid, stage)
        replies = s.nodes.receive(stage, [_again(m) for m in old], 30.0)
        assert replies == {}
        why = _refusals(s, stage)
        assert len(why) == N and all("Error" in w for w in why)


def _again(msg):
    from flwr.app import Message

    content = RecordDict({k: v for k, v in msg.content.items()})
    return Message(content, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type)


def test_a_signing_node_refuses_a_server_that_does_not_sign(tmp_path, deployment):
    grid, _ = deployment
    s = strategy(config(threat="semi-honest"), tmp_path)
    s.start(grid, initial(), num_rounds=1, train_config=train_config(config()))
    assert s.rounds[0]["status"] == "failed"
    why = _refusals(s, wire.TRAIN)
    assert len(why) == N and all("without signatures" in w for w in why)


@pytest.mark.parametrize("problem", ["one file", "readable key", "another roster"])
def test_a_node_whose_roster_or_key_is_unusable_refuses_every_train_request(tmp_path, deployment, problem):
    grid, roster = deployment
    ctx = grid.contexts[1000]
    if problem == "one file":
        del ctx.node_config[SIGNING_KEY]
    elif problem == "readable key":
        os.chmod(ctx.node_config[SIGNING_KEY], 0o644)
    else:
        R.make(["node-0"], tmp_path / "other")
        ctx.node_config[ROSTER] = str(tmp_path / "other" / "roster.json")
    s = strategy(config(roster=str(roster)), tmp_path)
    s.start(grid, initial(), num_rounds=1, train_config=train_config(config()))
    log = s.console.export_text()
    assert "node 1000 failed at hello" in log and "RosterError" in log  # it signs nothing, so it is never keyed
    assert s.rounds[0]["status"] == "completed" and s.rounds[0]["survived"] == N - 1


def test_a_simulation_makes_its_own_roster_and_its_nodes_sign(tmp_path):
    import json

    from securemark.flower.client_app import simulated_signers_app
    from securemark.flower.signers import simulated

    roster, keys = simulated(N)
    s = strategy_for(config(), tmp_path / "run", max_weight=2000, console=Console(file=io.StringIO()),
                     roster=roster)  # fmt: skip
    grid = InProcessGrid(N, app=simulated_signers_app(roster, keys))
    s.start(grid, initial(), num_rounds=1, train_config=train_config(config()))
    assert s.rounds[0]["status"] == "completed" and len(stages(grid, wire.SIGN)) == N
    assert not any(k in json.dumps(s.rounds) + roster.to_json() for k in keys.values())  # private keys stay in memory


def test_the_malicious_threat_without_a_roster_is_refused_before_any_node_is_met(tmp_path):
    with pytest.raises(ValueError, match="roster"):
        strategy(config(), tmp_path)


@pytest.mark.parametrize("same_session", [False, True])
def test_a_signed_run_killed_after_round_one_resumes_on_fresh_nodes(tmp_path, deployment, same_session):
    """A crash after round 1's checkpoint, then `flwr run` again: a new Flower run, so every node starts with a
    fresh state (its files on disk stay). The resumed run is a new session and trains on. A server that resumes
    under the old session name reaches nodes whose disk still records what they signed and unmasked in round 1
    of that session: rounds 2 on are new, so it goes on too, and nothing of round 1 can be signed again."""
    from flwr.app import Context

    from .test_strategy import killed_after_round_one

    grid, roster = deployment
    cfg = config(rounds=2, roster=str(roster))
    first = strategy(cfg, tmp_path)
    killed_after_round_one(first, grid, cfg)
    grid.contexts = {n: Context(4243, n, c.node_config, RecordDict(), {}) for n, c in grid.contexts.items()}
    resumed = strategy(cfg, tmp_path)
    if same_session:
        resumed.nodes.keys.session = first.nodes.keys.session
    resumed.start(grid, initial(), num_rounds=2, train_config=train_config(cfg), resume=True)
    assert [r["status"] for r in resumed.rounds] == ["completed", "completed"]
    assert len([m for m in stages(grid, wire.SIGN) if m.metadata.group_id == "2"]) == N
