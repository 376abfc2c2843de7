import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securemark.secagg import protocol as P
from securemark.secagg.driver import Session, run_round

CHOICES = (None, "masked", "unmask")  # stays, vanishes before its masked input, vanishes before unmask


def inputs(ids, size, seed=0, dtype=np.uint64):
    rng = np.random.default_rng(seed)
    return {i: rng.integers(0, np.iinfo(dtype).max, size, dtype=dtype, endpoint=True) for i in ids}


def expected_sum(x, ids, dtype=np.uint64):
    total = np.zeros_like(next(iter(x.values())), dtype=dtype)
    for i in ids:
        total += x[i]  # wraps mod 2^k like the protocol
    return total


def drops(ids, pattern):
    return {s: {i for i, d in zip(ids, pattern, strict=True) if d == s} for s in CHOICES[1:]}


def test_every_dropout_pattern_of_five_clients_in_one_session_with_rekeying():
    """3^5 = 243 patterns, one round each, all in one session (the same long-term keys round after round);
    every 40 rounds two nodes lose their keys and are re-keyed. Exact whenever 3 clients stay to the end,
    refused otherwise."""
    ids = (1, 2, 3, 4, 5)
    session = Session("exhaustive")
    outcomes = {"exact": 0, "refused": 0}
    for r, pattern in enumerate(itertools.product(CHOICES, repeat=5), start=1):
        if r % 40 == 0:
            session.join(1 + r % 5)
            session.join(1 + (r + 2) % 5)
        cfg = P.RoundConfig("exhaustive", r, P.complete_graph(ids), threshold=3, size=6)
        x = inputs(ids, 6, seed=r)
        sent = [i for i, d in zip(ids, pattern, strict=True) if d != "masked"]
        stayed = [i for i, d in zip(ids, pattern, strict=True) if d is None]
        if len(stayed) >= 3:
            res = run_round(session, cfg, x, drops(ids, pattern))
            assert res.survivors == tuple(sent)
            np.testing.assert_array_equal(res.total, expected_sum(x, sent))
            outcomes["exact"] += 1
        else:
            with pytest.raises(P.TooFewSurvivors):
                run_round(session, cfg, x, drops(ids, pattern))
            outcomes["refused"] += 1
    # 3, 4 or 5 of the 5 stay, each other one vanishing at one of 2 stages: C(5,3) 2^2 + C(5,4) 2 + 1 = 51
    assert outcomes == {"exact": 51, "refused": 243 - 51}


@settings(max_examples=25, deadline=None)
@given(st.integers(3, 9), st.integers(1, 40), st.data())
def test_random_federations_over_rounds_sum_exactly_or_refuse(n, size, data):
    ids = tuple(range(1, n + 1))
    t = data.draw(st.integers(n // 2 + 1, n))  # a safe threshold: more than half of every holder set
    bits = data.draw(st.sampled_from([32, 64]))
    dtype = np.uint32 if bits == 32 else np.uint64
    session = Session("prop")
    for r in range(1, 4):
        cfg = P.RoundConfig("prop", r, P.complete_graph(ids), t, size, bits)
        pattern = data.draw(st.lists(st.sampled_from(CHOICES), min_size=n, max_size=n))
        x = inputs(ids, size, seed=r, dtype=dtype)
        if sum(d is None for d in pattern) < t:
            with pytest.raises(P.TooFewSurvivors):
                run_round(session, cfg, x, drops(ids, pattern))
            continue
        res = run_round(session, cfg, x, drops(ids, pattern))
        np.testing.assert_array_equal(res.total, expected_sum(x, res.survivors, dtype))


def test_secagg_plus_sparse_graph_with_dropouts_over_rounds():
    ids = tuple(range(1, 31))
    k = P.sparse_degree(30)
    session = Session("plus")
    for r, drop in enumerate(({"masked": {7, 19}, "unmask": {11, 12}}, {"masked": {1, 2, 3}}, {}), start=1):
        graph = P.harary_graph(ids, k, np.random.default_rng(r))  # a new graph every round, the same keys
        assert all(len(p) == k for p in graph.values()) and k < 29
        cfg = P.RoundConfig("plus", r, graph, threshold=k // 2 + 1, size=50)
        x = inputs(ids, 50, seed=r)
        res = run_round(session, cfg, x, drop)
        np.testing.assert_array_equal(res.total, expected_sum(x, res.survivors))
        assert not set(drop.get("masked", ())) & set(res.survivors)


def test_sparse_neighbourhood_too_thin_fails_loudly():
    ids = tuple(range(1, 11))
    graph = P.harary_graph(ids, 2, np.random.default_rng(0))
    cfg = P.RoundConfig("thin", 1, graph, threshold=2, size=4)
    victim = 5
    with pytest.raises(P.TooFewSurvivors, match="client"):
        run_round(Session("thin"), cfg, inputs(ids, 4), {"unmask": {victim, *graph[victim]}})


def test_graphs_are_symmetric_and_validated():
    g = P.harary_graph(tuple(range(1, 12)), 4, np.random.default_rng(1))
    assert all(i in g[j] for i in g for j in g[i])
    with pytest.raises(ValueError, match="even"):
        P.harary_graph((1, 2, 3, 4), 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="symmetric"):
        P.RoundConfig("r", 1, {1: (2,), 2: ()}, 2, 3)
    with pytest.raises(ValueError, match="threshold"):
        P.RoundConfig("r", 1, P.complete_graph((1, 2, 3)), 4, 3)
    with pytest.raises(ValueError, match="2\\^31"):
        P.RoundConfig("r", 1, P.complete_graph((0, 1, 2)), 2, 3)


def test_neighbour_graph_picks_secagg_or_secagg_plus_and_a_majority_threshold():
    rng = np.random.default_rng(0)
    graph, t = P.neighbour_graph(tuple(range(1, 31)), "sparse", rng)
    k = P.sparse_degree(30)
    assert all(len(p) == k for p in graph.values()) and t == k // 2 + 1 and t > (k + 1) / 2
    assert P.neighbour_graph((1, 2, 3, 4), "sparse", rng) == (P.complete_graph((1, 2, 3, 4)), 3)  # too few
    assert P.neighbour_graph((1, 2, 3, 4, 5), "complete", rng) == (P.complete_graph((1, 2, 3, 4, 5)), 3)
    with pytest.raises(ValueError, match="complete"):
        P.neighbour_graph((1, 2, 3), "ring", rng)


def test_nodes_told_different_encodings_make_masks_that_never_cancel(monkeypatch):
    """A lying server gives its victim (node 1) other quantization ranges than nodes 2 and 3, hoping that
    the others' values sit still while the victim's show in the sum. The encoding's digest is bound into
    every key: the victim's pair masks and the others' no longer cancel, so even with every self-mask
    removed the sum is padded (the same round with one encoding sums exactly)."""
    from securemark.prg import add_keystream
    from securemark.secagg.protocol import client as C
    from securemark.secagg.protocol.derive import _self_mask_key

    ids, size = (1, 2, 3), 64
    seeds = {1: b"\x01" * 32, 2: b"\x02" * 32, 3: b"\x03" * 32}
    x = inputs(ids, size, seed=7)
    for r, victim_encoding in ((1, b"common"), (2, b"victim")):
        session = Session(f"lie-{r}")
        for i in ids:
            session.join(i)
        cfg = P.RoundConfig(session.name, r, P.complete_graph(ids), threshold=2, size=size, encoding=b"common")
        told = {i: cfg if i != 1 else dataclasses.replace(cfg, encoding=victim_encoding) for i in ids}
        total = np.zeros(size, dtype=np.uint64)
        for i in ids:
            monkeypatch.setattr(C.os, "urandom", lambda n, i=i: seeds[i][:n] if n == 32 else bytes(n))
            y = P.client_masked_input(session.nodes[i], told[i], session.server.for_client(cfg, i), x[i]).y
            add_keystream(_self_mask_key(told[i], seeds[i], i), y, subtract=True)  # all the server could remove
            total += y
        exact = np.array_equal(total, expected_sum(x, ids))
        assert exact == (victim_encoding == b"common")
        if not exact:  # padded in (nearly) every word, not off by a little
            assert np.mean(total != expected_sum(x, ids)) > 0.9
