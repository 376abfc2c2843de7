"""What a server learns over many rounds: replayed models refused by the real mod and ClientApp, fixed groups
summed whole, example counts known only as group totals (securemark.secagg.starts, securemark.secagg.groups)."""

import io

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from rich.console import Console

from securemark import training
from securemark.config import SimConfig
from securemark.flower import wire
from securemark.flower.server_app import strategy_for, train_config
from securemark.models import build

from .inprocess import InProcessGrid


def config(clients=4, per_round=4, rounds=1, group=1, partition="iid"):
    return SimConfig.from_dict(
        {
            "data": {"name": "digits", "partition": partition},
            "model": {"name": "mlp"},
            "train": {"rounds": rounds, "clients": clients, "per_round": per_round, "local_epochs": 1, "seed": 1},
            "fingerprint": {"enabled": False},
            "secagg": {"enabled": True, "group": group},
        }
    )


def initial():
    return ArrayRecord({k: v.detach().clone() for k, v in build("mlp", (1, 8, 8), 10, seed=1).state_dict().items()})


def strategy(cfg, tmp_path):
    return strategy_for(cfg, tmp_path, max_weight=2000, console=Console(record=True, width=300, file=io.StringIO()))


def counted(s):
    """Record, round by round, the nodes whose update counted and the total weight the server unmasked."""
    seen, real = [], s.sum.collect

    def collect(r, replies, clock):
        agg = real(r, replies, clock)
        seen.append((sorted(agg.counted), agg.weight, agg.mean.copy()))
        return agg

    s.sum.collect = collect
    return seen


def replaying(s, change):
    """A lying server: every node gets ``change(its first copy)`` instead of a new copy, every round after the
    first (the same model under a new round number and fresh masking, as a replay)."""
    first, real = {}, s.copy_for

    def copy_for(node):
        if node not in first:
            first[node] = {k: v.clone() for k, v in real(node).items()}
            return first[node]
        return change(first[node])

    s.copy_for = copy_for


def plain_updates(grid):
    """Each node's update of its first train message, trained again (the test pins the training randomness)."""
    out = {}
    for m in grid.sent:
        node = m.metadata.dst_node_id
        if str(m.content[wire.SM]["stage"]) == wire.TRAIN and node not in out:
            from .test_strategy import user_update

            out[node] = user_update(grid, node)
    return out


def test_a_replayed_model_is_refused_by_every_node_before_it_trains(tmp_path, monkeypatch):
    s, grid = strategy(config(rounds=3), tmp_path), InProcessGrid(4)
    replaying(s, lambda copy: copy)  # the same copy again
    trained = []
    real_train = training.train
    monkeypatch.setattr(training, "train", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    s.start(grid, initial(), num_rounds=3, train_config=train_config(config()))
    assert [r["status"] for r in s.rounds] == ["completed", "failed", "failed"]
    assert len(trained) == 4  # round 1 only: a replay is refused before any training
    log = s.console.export_text()
    assert log.count("a replayed round") >= 8 and "refused" in log


@pytest.mark.parametrize("scale", [0.0, 1e-6])
def test_a_model_perturbed_far_less_than_an_update_is_refused_too(tmp_path, scale):
    rng = np.random.default_rng(0)

    def nudge(copy):
        return {k: v + scale * float(v.abs().max()) * torch.from_numpy(rng.standard_normal(v.shape).astype("float32"))
                if v.is_floating_point() else v for k, v in copy.items()}  # fmt: skip

    s, grid = strategy(config(rounds=2), tmp_path), InProcessGrid(4)
    replaying(s, lambda copy: {k: v.clone() for k, v in nudge(copy).items()})
    s.start(grid, initial(), num_rounds=2, train_config=train_config(config()))
    assert [r["status"] for r in s.rounds] == ["completed", "failed"]


def _perturbed_replay_attack(tmp_path, monkeypatch, group, repeats=10):
    """Round 1 honest with 6 nodes, A among them; then ``repeats`` rounds in which each node gets its round-1
    copy plus a fresh random change as large as round 1 moved the global model (past the near-repeat check),
    and A never answers. The server's estimate of A's update: round 1's sum minus the mean of the later sums."""
    from .test_strategy import repeatable_training

    repeatable_training(monkeypatch)
    cfg = config(clients=6, per_round=6, rounds=1 + repeats, group=group)
    s, grid = strategy(cfg, tmp_path), InProcessGrid(6)
    seen = counted(s)
    a = 1000
    state = {"size": None}
    rng = np.random.default_rng(1)

    def far(copy):
        if state["size"] is None:  # one round's update of the global model, on the same scale for every tensor
            before = initial().to_torch_state_dict()
            state["size"] = float(np.linalg.norm(np.concatenate([
                (s.weights[k] - before[k]).double().numpy().ravel() for k in before])))  # fmt: skip
        out = {}
        names = [k for k, v in copy.items() if v.is_floating_point()]
        total = sum(copy[k].numel() for k in names)
        for k, v in copy.items():
            noise = torch.from_numpy(rng.standard_normal(v.shape).astype("float32"))
            out[k] = v + state["size"] / total**0.5 * noise if k in names else v
        return out

    replaying(s, far)
    real_receive = s.nodes.receive

    def without_a(stage, msgs, timeout, need=None):
        got = real_receive(stage, msgs, timeout, need)
        return {n: r for n, r in got.items() if not (n == a and stage == wire.TRAIN and seen)}

    s.nodes.receive = without_a
    s.start(grid, initial(), num_rounds=1 + repeats, train_config=train_config(cfg))
    ups = plain_updates(grid)
    (_, w1, mean1), later = seen[0], seen[1:]
    assert later and all(a not in nodes for nodes, _, _ in later)
    estimate = mean1 * w1 - np.mean([m * w for _, w, m in later], axis=0)
    weighted = {n: u * w for n, (u, w) in ups.items()}
    return estimate, weighted, later


def _corr(x, y):
    return float(np.corrcoef(x, y)[0, 1])


def test_a_perturbed_replay_without_groups_still_reads_one_nodes_update(tmp_path, monkeypatch):
    """The near-repeat check cannot tell a change as large as a round's from a round: without groups a server
    that replays with such changes reads a node's update closely (the reason for secagg.group)."""
    estimate, weighted, later = _perturbed_replay_attack(tmp_path, monkeypatch, group=1)
    assert all(nodes == [1001, 1002, 1003, 1004, 1005] for nodes, _, _ in later)
    assert _corr(estimate, weighted[1000]) > 0.5


def test_with_groups_a_perturbed_replay_reads_no_less_than_a_whole_groups_sum(tmp_path, monkeypatch):
    estimate, weighted, later = _perturbed_replay_attack(tmp_path, monkeypatch, group=2)
    summed = next(nodes for nodes, _, _ in later)
    assert len(summed) == 4 and 1000 not in summed  # A's group sits out whole: only the other pairs are summed
    mate = ({1001, 1002, 1003, 1004, 1005} - set(summed)).pop()
    group_sum = weighted[1000] + weighted[mate]
    assert _corr(estimate, group_sum) > 0.9  # what the server reads is the group's sum ...
    assert _corr(estimate - group_sum, weighted[1000]) < 0.3  # ... and nothing of A beyond it


def participation(seen, nodes):
    return np.array([[1.0 if n in counted_ else 0.0 for n in nodes] for counted_, _, _ in seen])


@pytest.mark.parametrize("group", [1, 2])
def test_example_counts_over_twelve_rounds_are_known_only_as_group_totals(tmp_path, group):
    """5 clients of a Dirichlet split, 3 sampled a round, 12 rounds. Without groups the totals the server
    unmasks give every client's count by least squares; with groups of 2 or more no client's count is a linear
    function of them (its indicator is outside the row space of the participation matrix), and each group's
    total is."""
    cfg = config(clients=5, per_round=3, rounds=12, group=group, partition="dirichlet")
    s, grid = strategy(cfg, tmp_path), InProcessGrid(5)
    seen = counted(s)
    s.start(grid, initial(), num_rounds=12, train_config=train_config(cfg))
    nodes = sorted(grid.contexts)
    true = np.array([float(len(training_set(grid, n, cfg))) for n in nodes])
    m, totals = participation(seen, nodes), np.array([float(w) for _, w, _ in seen])
    assert np.allclose(m @ true, totals)  # the totals are the counts' sums over who counted
    solution, *_ = np.linalg.lstsq(m, totals, rcond=None)
    identifiable = [np.linalg.matrix_rank(np.vstack([m, np.eye(5)[i]])) == np.linalg.matrix_rank(m) for i in range(5)]
    if group == 1:
        assert all(identifiable) and np.allclose(solution, true)  # every count, exactly
        return
    assert not any(identifiable)
    groups = {tuple(s.nodes.groups.of[s.nodes.ids[n]]) for n in nodes}
    node_of = {i: n for n, i in s.nodes.ids.items()}
    for g in groups:
        members = [nodes.index(node_of[i]) for i in g]
        assert np.isclose(solution[members].sum(), true[members].sum())  # a group's total is what it learns
    assert np.abs(solution - true).max() > 0.1 * true.min()


def training_set(grid, node, cfg):
    from securemark import data

    ctx = grid.contexts[node].node_config
    return data.client_data(cfg.data, int(ctx["partition-id"]), int(ctx["num-partitions"]), cfg.train.seed)


def test_with_groups_the_train_exchange_waits_for_whole_groups_not_a_count(tmp_path):
    """Once the threshold's worth of inputs is in, the exchange waits only the grace for the rest; with groups a
    straggler's whole group is lost without it, so the inputs are counted in whole groups."""
    cfg = config(clients=6, per_round=6, group=2)
    s, grid = strategy(cfg, tmp_path), InProcessGrid(6)
    s.start(grid, initial(), num_rounds=1, train_config=train_config(cfg))
    need, st = s.sum.need(), s.sum.round
    node_of = {i: n for n, i in st.ids.items()}
    pairs = [[node_of[i] for i in g] for g in st.srv.cfg.groups]
    assert st.srv.cfg.threshold == 4 and len(pairs) == 3
    assert not need({pairs[0][0], pairs[1][0], pairs[2][0], pairs[0][1]})  # four inputs, one whole pair
    assert need({*pairs[0], *pairs[1]})


def test_after_a_round_fails_past_unmask_the_model_steps_until_the_nodes_take_it(tmp_path):
    """Node 1000 deals garbage shares: round 1 fails after the others revealed theirs, so they refuse its model.
    The server steps a hundredth of the model's norm (no round has completed); these nodes' updates are 0.8 of
    it, so that step is inside their 2% and refused as a replay (round 2), and the doubled one is taken."""
    from flwr.app import Array, MetricRecord, RecordDict

    from securemark.flower.mod import securemark_mod

    from .test_strategy import _hostile, app_with

    def garbage(content):
        content[wire.PAYLOAD]["values"] = [bytes(len(v)) for v in content[wire.PAYLOAD]["values"]]

    def shrink(arrays):
        moved = ArrayRecord({k: Array(v.numpy() * 0.2) for k, v in arrays.items()})
        return RecordDict({"arrays": moved, "metrics": MetricRecord({"num-examples": 10})})

    cfg = config(clients=4, per_round=4, rounds=3)
    s, grid = (
        strategy(cfg, tmp_path),
        InProcessGrid(4, app=app_with(shrink, mods=[_hostile(wire.TRAIN, garbage), securemark_mod])),
    )
    s.start(grid, initial(), num_rounds=3, train_config=train_config(cfg))
    log = s.console.export_text()
    assert [m["status"] for m in s.rounds] == ["failed", "failed", "completed"], log
    assert "could not open" in s.rounds[0]["reason"] and log.count("a replayed round") == 3
    assert log.count("model stepped") == 2


def test_the_step_after_a_failure_moves_even_a_zero_model_and_doubles_only_on_refusals_to_a_cap(tmp_path):
    s = strategy(config(), tmp_path)
    assert s.sum.after_failure(np.ones(100)) is None  # nobody revealed, nobody refused: the model stays
    s.sum.revealed = True
    zero = s.sum.after_failure(np.zeros(100))
    assert np.linalg.norm(zero) == pytest.approx(1e-3 * 10)  # a zero model still moves
    s.sum.moved = 2.0
    assert np.linalg.norm(s.sum.after_failure(np.ones(100))) == pytest.approx(1.0)  # half the last movement
    s.sum.round = type("Round", (), {"sampled": 4})()  # a round of 4 nodes, 3 of which refused a replay
    s.sum.nodes.failures[wire.TRAIN] = ["securemark_mod refused the train message: Replay: ..."] * 3
    sizes = [np.linalg.norm(s.sum.after_failure(np.ones(100))) for _ in range(10)]
    assert sizes[:3] == pytest.approx([2.0, 4.0, 8.0]) and max(sizes) == pytest.approx(64.0)


def test_a_group_larger_than_a_round_is_a_config_error():
    from securemark.config import ConfigError

    with pytest.raises(ConfigError, match=r"secagg.group \(1..train.per_round\)"):
        config(clients=10, per_round=3, group=5)


def test_a_node_whose_floor_is_above_the_runs_groups_is_refused_and_its_group_sits_out(tmp_path):
    """Groups of 3 over 6 nodes; node 1000 requires 4. It refuses round 1 (whose other group alone is under
    the threshold), is refused for the run, and from round 2 its group sits out while the other trains."""
    cfg = config(clients=6, per_round=6, rounds=2, group=3)
    s, grid = strategy(cfg, tmp_path), InProcessGrid(6)
    grid.contexts[1000].node_config["securemark-min-group"] = 4
    seen = counted(s)
    s.start(grid, initial(), num_rounds=2, train_config=train_config(cfg))
    log = s.console.export_text()
    assert [m["status"] for m in s.rounds] == ["failed", "completed"], log
    assert "GroupTooSmall" in log and "its floor (securemark-min-group) is above this run's groups" in log
    assert "one lost node fails the round" in log and 1000 in s.nodes.refused
    mates = set(s.nodes.groups.of[s.nodes.ids[1000]])
    assert len(seen) == 1 and not {s.nodes.ids[n] for n in seen[0][0]} & mates and len(seen[0][0]) == 3


def test_a_weight_cap_that_changes_within_a_session_is_refused(tmp_path):
    """Totals of min(count, cap) over rounds with different caps tell a group's counts apart (an attack review
    read three, 52 rounds): a node keeps the session's first cap and refuses another."""
    s, grid = strategy(config(rounds=2), tmp_path), InProcessGrid(4)
    real_setup = s.sum.setup

    def setup(r, sampled, tensors, inner):
        s.sum.max_weight = 2000 if r == 1 else 1999
        return real_setup(r, sampled, tensors, inner)

    s.sum.setup = setup
    s.start(grid, initial(), num_rounds=2, train_config=train_config(config()))
    assert [r["status"] for r in s.rounds] == ["completed", "failed"]
    why = s.nodes.failures[wire.TRAIN]
    assert len(why) == 4 and all("weight cap was 2000" in w for w in why)


def test_one_node_claiming_a_replay_moves_no_model(tmp_path):
    """The server reads a replay refusal from a node's error reason, which a hostile node can write: one node
    claiming it (and failing the round) must not make the server step the model, only refusals from more than
    half of the round's nodes do."""
    cfg = config(rounds=1)
    s = strategy(cfg, tmp_path)
    s.sum.round = type("R", (), {"sampled": 4})()
    s.nodes.failures[wire.TRAIN] = ["securemark_mod refused the train message: Replay: a replayed round, refused"]
    assert s.sum.after_failure(np.ones(10)) is None
    s.nodes.failures[wire.TRAIN] *= 3
    assert s.sum.after_failure(np.ones(10)) is not None
