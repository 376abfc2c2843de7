import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securemark.secagg import protocol as P
from securemark.secagg.driver import run_round
from securemark.secagg.protocol import Stage

STAGES = (Stage.ADVERTISE, Stage.SHARE, Stage.MASKED, Stage.UNMASK)


def inputs(ids, size, seed=0, dtype=np.uint64):
    rng = np.random.default_rng(seed)
    return {i: rng.integers(0, np.iinfo(dtype).max, size, dtype=dtype, endpoint=True) for i in ids}


def expected_sum(x, ids, dtype=np.uint64):
    total = np.zeros_like(next(iter(x.values())), dtype=dtype)
    for i in ids:
        total += x[i]  # wraps mod 2^k like the protocol
    return total


def test_every_dropout_pattern_of_five_clients_threshold_three():
    """Each client stays or vanishes before one of the 4 stages: 5^5 = 3125 patterns, all checked."""
    ids = (1, 2, 3, 4, 5)
    cfg = P.RoundConfig("run", 1, P.complete_graph(ids), threshold=3, size=6)
    x = inputs(ids, 6)
    outcomes = {"exact": 0, "refused": 0}
    for pattern in itertools.product((None, *STAGES), repeat=5):
        drop = {s: {i for i, d in zip(ids, pattern, strict=True) if d == s} for s in STAGES}
        sent_input = [
            i for i, d in zip(ids, pattern, strict=True) if d not in (Stage.ADVERTISE, Stage.SHARE, Stage.MASKED)
        ]
        stayed = [i for i, d in zip(ids, pattern, strict=True) if d is None]
        if len(stayed) >= 3:
            r = run_round(cfg, x, drop)
            assert r.survivors == tuple(sent_input)
            np.testing.assert_array_equal(r.total, expected_sum(x, sent_input))
            outcomes["exact"] += 1
        else:
            with pytest.raises(P.TooFewSurvivors):
                run_round(cfg, x, drop)
            outcomes["refused"] += 1
    assert outcomes["exact"] + outcomes["refused"] == 5**5 and outcomes["exact"] > 0


@settings(max_examples=25, deadline=None)
@given(st.integers(3, 9), st.integers(1, 40), st.data())
def test_random_federations_sum_exactly_or_refuse(n, size, data):
    ids = tuple(range(1, n + 1))
    t = data.draw(st.integers(2, n))
    bits = data.draw(st.sampled_from([32, 64]))
    dtype = np.uint32 if bits == 32 else np.uint64
    cfg = P.RoundConfig("prop", data.draw(st.integers(0, 99)), P.complete_graph(ids), t, size, bits)
    pattern = data.draw(st.lists(st.sampled_from((None, *STAGES)), min_size=n, max_size=n))
    drop = {s: {i for i, d in zip(ids, pattern, strict=True) if d == s} for s in STAGES}
    x = inputs(ids, size, dtype=dtype)
    stayed = [i for i, d in zip(ids, pattern, strict=True) if d is None]
    if len(stayed) < t:
        with pytest.raises(P.TooFewSurvivors):
            run_round(cfg, x, drop)
        return
    r = run_round(cfg, x, drop)
    np.testing.assert_array_equal(r.total, expected_sum(x, r.survivors, dtype))


def test_secagg_plus_sparse_graph_with_dropouts():
    ids = tuple(range(1, 31))
    k = P.sparse_degree(30)
    graph = P.harary_graph(ids, k, np.random.default_rng(3))
    assert all(len(p) == k for p in graph.values()) and k < 29
    cfg = P.RoundConfig("plus", 2, graph, threshold=k // 2 + 1, size=50)
    x = inputs(ids, 50)
    r = run_round(cfg, x, {Stage.SHARE: {4}, Stage.MASKED: {7, 19}, Stage.UNMASK: {11, 12}})
    np.testing.assert_array_equal(r.total, expected_sum(x, r.survivors))
    assert 7 not in r.survivors and 11 in r.survivors


def test_sparse_neighbourhood_too_thin_fails_loudly():
    ids = tuple(range(1, 11))
    graph = P.harary_graph(ids, 2, np.random.default_rng(0))
    cfg = P.RoundConfig("thin", 1, graph, threshold=3, size=4)
    victim = 5
    with pytest.raises(P.TooFewSurvivors, match="client"):
        run_round(cfg, inputs(ids, 4), {Stage.UNMASK: set(graph[victim])})


def test_graphs_are_symmetric_and_validated():
    g = P.harary_graph(tuple(range(1, 12)), 4, np.random.default_rng(1))
    assert all(i in g[j] for i in g for j in g[i])
    with pytest.raises(ValueError, match="even"):
        P.harary_graph((1, 2, 3, 4), 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="symmetric"):
        P.RoundConfig("r", 1, {1: (2,), 2: ()}, 2, 3)
    with pytest.raises(ValueError, match="threshold"):
        P.RoundConfig("r", 1, P.complete_graph((1, 2, 3)), 4, 3)
    with pytest.raises(ValueError, match=">= 1"):
        P.RoundConfig("r", 1, P.complete_graph((0, 1, 2)), 2, 3)


def test_neighbour_graph_picks_secagg_or_secagg_plus_and_a_majority_threshold():
    rng = np.random.default_rng(0)
    graph, t = P.neighbour_graph(tuple(range(1, 31)), "sparse", rng)
    k = P.sparse_degree(30)
    assert all(len(p) == k for p in graph.values()) and t == k // 2 + 1
    assert P.neighbour_graph((1, 2, 3, 4), "sparse", rng) == (P.complete_graph((1, 2, 3, 4)), 3)  # too few
    assert P.neighbour_graph((1, 2, 3, 4, 5), "complete", rng) == (P.complete_graph((1, 2, 3, 4, 5)), 3)
    with pytest.raises(ValueError, match="complete"):
        P.neighbour_graph((1, 2, 3), "ring", rng)
