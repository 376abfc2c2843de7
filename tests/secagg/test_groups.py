"""Fixed groups (securemark.secagg.groups): formed once, checked by every node, summed only whole."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securemark.secagg import protocol as P
from securemark.secagg.driver import Session, run_round
from securemark.secagg.groups import Groups

GROUPS = ((1, 2, 3), (4, 5, 6))


def cfg_of(r, groups=GROUPS, session="s", size=8):
    clients = tuple(sorted(i for g in groups for i in g))
    return P.RoundConfig(session, r, P.complete_graph(clients), len(clients) // 2 + 1, size, 64, b"", groups)


def inputs_of(clients, seed=0):
    rng = np.random.default_rng(seed)
    return {i: rng.integers(0, 1 << 40, 8, dtype=np.uint64) for i in clients}


def test_groups_form_in_joining_order_the_remainder_joins_the_last_and_never_change():
    g = Groups(3)
    assert g.form([5, 1]) == [5, 1]  # fewer than 3 without a group: they wait
    assert g.form([5, 1, 2, 7, 9, 4, 8]) == []
    assert g.of[5] == (1, 2, 5) and g.of[8] == (4, 7, 8, 9)  # 7 = 3 + 4: the remainder joined the last group
    assert g.form([8, 1, 10, 11, 12]) == [] and g.of[8] == (4, 7, 8, 9) and g.of[10] == (10, 11, 12)
    assert g.whole([9, 1, 10], available={1, 2, 4, 5, 7, 8, 9, 10, 11, 12}, want=4) == [4, 7, 8, 9]
    assert g.whole([1, 9], available={1, 2, 4, 7, 8, 9}, want=4) == [4, 7, 8, 9]  # 5 is gone: 1's group sits out
    assert g.of_round([1, 2, 5]) == ((1, 2, 5),)
    with pytest.raises(ValueError, match="whole groups"):
        g.of_round([1, 2])


def test_round_configs_hold_whole_disjoint_groups_and_bind_them_into_every_key():
    with pytest.raises(ValueError, match="groups must split"):
        P.RoundConfig("s", 1, P.complete_graph((1, 2, 3, 4)), 3, 8, 64, b"", ((1, 2), (2, 3, 4)))
    with pytest.raises(ValueError, match="groups must split"):
        P.RoundConfig("s", 1, P.complete_graph((1, 2, 3, 4)), 3, 8, 64, b"", ((1, 2),))
    alone = P.RoundConfig("s", 1, P.complete_graph((1, 2)), 2, 8, 64, b"", ((1,), (2,)))
    assert alone.groups == () and alone.context("p", 1, 2) == P.RoundConfig("s", 1, P.complete_graph((1, 2)), 2, 8)\
        .context("p", 1, 2)  # fmt: skip
    other = cfg_of(1, ((1, 2, 4), (3, 5, 6)))
    assert cfg_of(1).context("pair", 1, 2) != other.context("pair", 1, 2)


def test_the_server_sums_only_groups_whose_every_input_arrived():
    session, cfg = Session("s"), cfg_of(1, (*GROUPS, (7, 8, 9)))
    x = inputs_of(cfg.clients)
    res = run_round(session, cfg, x, drop={"masked": {5}})
    assert res.survivors == (1, 2, 3, 7, 8, 9)  # 4 and 6 sent theirs; their group is not whole
    assert np.array_equal(res.total, x[1] + x[2] + x[3] + x[7] + x[8] + x[9])
    with pytest.raises(P.TooFewSurvivors, match=r"3 masked inputs arrived \(4 more of groups not whole\)"):
        run_round(Session("s"), cfg, x, drop={"masked": {5, 8}})


def test_a_node_refuses_a_regrouping_a_group_under_its_floor_and_a_survivor_list_that_splits_a_group():
    session, cfg = Session("s"), cfg_of(1)
    run_round(session, cfg, inputs_of(cfg.clients))
    keys = session.nodes[1]
    regrouped = cfg_of(2, ((1, 2, 4), (3, 5, 6)))
    with pytest.raises(
        P.ProtocolViolation, match=r"client 1's group was \[1, 2, 3\] earlier in this session, now \[1, 2, 4\]"
    ):
        P.check_round(keys, regrouped)
    with pytest.raises(P.ProtocolViolation, match="this node requires 4 or more"):
        P.check_round(keys, cfg_of(2), min_group=4)
    later = cfg_of(3)
    m = P.client_masked_input(keys, later, session.server.for_client(later, 1), inputs_of(later.clients)[1])
    assert m.y.shape == (8,)
    with pytest.raises(P.ProtocolViolation, match=r"part of the group \[4, 5, 6\]"):
        P.client_unmask(keys, later, session.server.for_client(later, 1), [1, 2, 3, 4, 5], {})
    assert keys.open_round is None or keys.open_round == later.round  # nothing revealed either way


def test_a_lying_server_unmasks_whole_groups_or_nothing_whatever_survivor_list_it_names():
    """Every survivor list over three groups of two, shown to every node: a sum is unmasked exactly when the list
    is a union of whole groups with t = 4 or more clients (t reveals are needed; every honest node checks)."""
    pairs = ((1, 2), (3, 4), (5, 6))
    for size in range(1, 7):
        for names in itertools.combinations(range(1, 7), size):
            session, cfg = Session("s"), cfg_of(1, pairs)
            x = inputs_of(cfg.clients)
            for i in cfg.clients:
                session.join(i)
            masked = {i: P.client_masked_input(session.nodes[i], cfg, session.server.for_client(cfg, i), x[i])
                      for i in cfg.clients}  # fmt: skip
            srv = P.ServerRound(cfg)
            for i in names:
                P.server_receive_masked(srv, i, masked[i])
            # the lying server's claim: exactly these survivors, whatever groups they split
            srv.closed, srv.inputs, srv.waiting = True, set(names), {}
            srv.masked_sum = sum((masked[i].y for i in names), np.zeros(8, np.uint64))
            for i in names:
                try:
                    reveals, bad = P.client_unmask(session.nodes[i], cfg, session.server.for_client(cfg, i), names,
                                                   P.server_shares_for(srv, i))  # fmt: skip
                except P.SecAggError:
                    continue
                P.server_receive_unmask(srv, i, reveals, bad)
            whole = len(names) >= 4 and all(set(p) <= set(names) or not set(p) & set(names) for p in pairs)
            try:
                total = P.server_sum(srv)
            except P.SecAggError:
                assert not whole, names
                continue
            assert whole, names
            assert np.array_equal(total, sum(x[i] for i in names))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 4), st.lists(st.integers(1, 12), min_size=2, max_size=12, unique=True), st.data())
def test_any_drops_sum_exactly_the_whole_groups(size, ids, data):
    groups = Groups(size)
    if groups.form(ids):
        return  # too few to make one group
    gs = groups.of_round(ids)
    clients = tuple(sorted(ids))
    threshold = len(clients) // 2 + 1
    cfg = P.RoundConfig("s", 1, P.complete_graph(clients), threshold, 8, 64, b"", gs)
    lost = set(data.draw(st.lists(st.sampled_from(clients), max_size=len(clients) // 3)))
    whole = {i for g in gs if not set(g) & lost for i in g}
    x = inputs_of(clients, seed=len(ids))
    if len(whole) < threshold:
        with pytest.raises(P.TooFewSurvivors):
            run_round(Session("s"), cfg, x, drop={"masked": lost})
        return
    res = run_round(Session("s"), cfg, x, drop={"masked": lost})
    assert set(res.survivors) == whole
    assert np.array_equal(res.total, sum((x[i] for i in whole), np.zeros(8, np.uint64)))


def test_a_group_must_be_a_clique_of_the_rounds_graph():
    """A graph that splits a group (here a matching: each node one neighbour) would let a server unmask each
    component's sum on its own, a piece of a group: no node accepts such a round."""
    matching = {1: (2,), 2: (1,), 3: (4,), 4: (3,), 5: (6,), 6: (5,)}
    with pytest.raises(ValueError, match=r"the group \[1, 2, 3\] must be a clique"):
        P.RoundConfig("s", 1, matching, 2, 8, 64, b"", GROUPS)


@settings(max_examples=40, deadline=None)
@given(st.integers(5, 40), st.integers(2, 4), st.integers(0, 2**32 - 1))
def test_sparse_graphs_make_every_group_a_clique_with_a_safe_threshold(n, size, seed):
    groups = Groups(size)
    groups.form(range(1, n + 1))
    gs = groups.of_round(range(1, n + 1))
    graph, threshold = P.neighbour_graph(tuple(range(1, n + 1)), "sparse", np.random.default_rng(seed), gs)
    cfg = P.RoundConfig("s", 1, graph, threshold, 8, 64, b"", gs)  # checks the cliques and the threshold
    for i in cfg.clients:
        cfg.check_safe_threshold(i)


def test_a_group_named_on_the_wire_by_a_non_member_is_refused():
    from securemark.flower import wire

    rec = wire.round_config_record(cfg_of(1), 1)
    rec["groups"] = [99, 99, 99, 77, 77, 77]
    with pytest.raises(ValueError, match="named by one of its members"):
        wire.round_config_from(rec)
    rec["groups"] = [2, 2, 2, 6, 6, 6]  # any member names it
    assert wire.round_config_from(rec)[0].groups == GROUPS
