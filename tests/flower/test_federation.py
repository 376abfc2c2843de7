"""Federation rounds through the real ClientApp (in process): dropouts, failed rounds, what the server sees."""

import numpy as np
from rich.console import Console

from securemark import training
from securemark.config import SimConfig
from securemark.flower import wire
from securemark.flower.client_app import encoded_update
from securemark.flower.server_app import Federation
from securemark.secagg.quantize import QuantConfig, decode

from .inprocess import InProcessGrid


def config(fingerprint=True, secagg=True, clients=5):
    return SimConfig.from_dict(
        {
            "data": {"name": "digits"},
            "model": {"name": "mlp"},
            "train": {"rounds": 1, "clients": clients, "per_round": clients, "local_epochs": 1, "seed": 1},
            "fingerprint": {"enabled": fingerprint, "length": 128, "eval_copies": 2},
            "secagg": {"enabled": secagg},
        }
    )


def federation(tmp_path, cfg):
    grid = InProcessGrid(cfg.train.clients)
    fed = Federation(grid, cfg, tmp_path, Console(quiet=True))
    fed.out.mkdir(parents=True, exist_ok=True)
    fed.discover()
    fed.setup_fingerprint()
    return grid, fed


def lose_replies(monkeypatch, fed, lost):
    """Simulate clients vanishing: their replies at the given stages never reach the server."""
    real_send = fed.send

    def lossy_send(stage, contents, round_no):
        return {n: r for n, r in real_send(stage, contents, round_no).items() if n not in lost.get(stage, ())}

    monkeypatch.setattr(fed, "send", lossy_send)


def replay_encoded(grid, node):
    """A node's encoded update, rebuilt from its (deterministic) train message, before masking."""
    train_msg = next(m for m in grid.sent if m.metadata.dst_node_id == node and m.metadata.message_type == "train")
    return encoded_update(train_msg, grid.contexts[node])[0]


def test_round_with_dropouts_applies_the_survivors_weighted_mean(tmp_path, monkeypatch):
    grid, fed = federation(tmp_path, config())
    # 1001 vanishes before its masked input arrives; 1003 after sending it (its input still counts)
    lose_replies(monkeypatch, fed, {wire.TRAIN: {1001}, wire.UNMASK: {1003}})
    before = dict(fed.weights)
    m = fed.run_round(1)
    assert m["status"] == "completed" and m["survived"] == 4 and m["dropped"] == 1
    assert m["max_bit_error"] == 0.0
    qcfg = QuantConfig(fed.cfg.secagg.clip, fed.cfg.secagg.bits, fed.max_weight, 5)
    total = sum(replay_encoded(grid, n) for n in grid.contexts if n != 1001)
    expected = decode(total, qcfg).mean  # the survivors' weighted mean, from their plain encodings
    got = training.flatten(fed.weights, fed.names) - training.flatten(before, fed.names)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_too_few_survivors_fail_the_round_loudly_and_leave_the_model(tmp_path, monkeypatch):
    _, fed = federation(tmp_path, config())
    lose_replies(monkeypatch, fed, {wire.TRAIN: {1000, 1002, 1004}})  # 2 of 5 left, threshold 3
    before = {k: v.clone() for k, v in fed.weights.items()}
    m = fed.run_round(1)
    assert m["status"] == "failed" and "threshold" in m["reason"]
    assert all(bool((fed.weights[k] == before[k]).all()) for k in before)


def test_stages_travel_as_messages_and_client_state_is_cleared(tmp_path):
    grid, fed = federation(tmp_path, config())
    fed.run_round(1)
    kinds = {m.metadata.message_type for m in grid.sent}
    assert kinds == {wire.HELLO, wire.ADVERTISE, wire.SHARE_KEYS, wire.TRAIN, wire.UNMASK}
    train_msgs = [m for m in grid.sent if m.metadata.message_type == wire.TRAIN]
    firsts = {m.metadata.dst_node_id: m.content[wire.MODEL].to_torch_state_dict()["net.1.weight"] for m in train_msgs}
    assert len({t.sum().item() for t in firsts.values()}) == 5  # every client got its own copy
    for ctx in grid.contexts.values():
        assert wire.STATE not in ctx.state


def test_plain_fedavg_baseline_from_the_same_code(tmp_path):
    cfg = config(fingerprint=False, secagg=False, clients=3)
    fed = Federation(InProcessGrid(3), cfg, tmp_path, Console(quiet=True))
    rounds = fed.run()
    assert rounds[0]["status"] == "completed" and "max_bit_error" not in rounds[0]
    assert (tmp_path / "global.safetensors").exists() and (tmp_path / "report.md").exists()
    assert not (tmp_path / "registry").exists() and not (tmp_path / "customers").exists()
