"""A node's record of the models it trained from (securemark.secagg.starts): what it refuses, and when."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securemark.flower import wire
from securemark.secagg.starts import NEAR, K, Replay, Starts


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3000), st.integers(0, 2**32 - 1))
def test_the_sketch_is_linear_and_keeps_norms_on_average(size, seed):
    rng = np.random.default_rng(seed)
    node = Starts()
    a, b = rng.standard_normal(size), rng.standard_normal(size)
    assert np.allclose(node.sketch(a) - node.sketch(b), node.sketch(a - b))
    assert node.sketch(a).shape == (K,)
    assert not np.array_equal(node.sketch(a), Starts().sketch(a)) or size == 0  # each node its own key


def test_norms_through_the_sketch_are_unbiased_with_the_stated_spread():
    rng = np.random.default_rng(0)
    v = rng.standard_normal(5000) * rng.exponential(1.0, 5000)  # uneven coordinates
    ratios = np.array([np.linalg.norm(Starts().sketch(v)) ** 2 for _ in range(400)]) / np.linalg.norm(v) ** 2
    assert abs(ratios.mean() - 1) < 0.03 and 0.5 * (2 / K) ** 0.5 < ratios.std() < 2 * (2 / K) ** 0.5


def test_a_model_is_refused_only_after_its_round_was_revealed_and_only_when_near():
    rng = np.random.default_rng(1)
    node, w, update = Starts(), rng.standard_normal(1000), rng.standard_normal(1000)
    node.check(node.sketch(w), 1)
    node.masked(node.sketch(w), float(np.linalg.norm(update)), 1)
    node.check(node.sketch(w), 2)  # masked, never revealed (the round failed before unmask): it may train again
    node.masked(node.sketch(w), float(np.linalg.norm(update)), 2)
    node.revealed(1)  # a stale round: nothing recorded
    node.check(node.sketch(w), 3)
    node.revealed(2)
    with pytest.raises(Replay, match="of the one this node trained from in round 2") as refused:
        node.check(node.sketch(w), 3)
    assert f"{np.linalg.norm(update):.3g}" not in str(refused.value)  # the server reads the reason: no norm in it
    step = rng.standard_normal(1000)
    size = np.linalg.norm(update)
    for scale, refused in ((0.5 * NEAR, True), (3 * NEAR, False)):
        moved = w + step * (scale * size / np.linalg.norm(node.sketch(step)))
        if refused:
            with pytest.raises(Replay):
                node.check(node.sketch(moved), 3)
        else:
            node.check(node.sketch(moved), 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_model_holding_nan_or_infinity_is_refused(bad):
    w = np.zeros(10)
    w[3] = bad
    with pytest.raises(Replay, match="NaN or infinite"):
        Starts().sketch(w)


def test_the_record_round_trips_through_the_nodes_state_pending_round_included():
    rng = np.random.default_rng(2)
    node = Starts()
    for r in (1, 2, 3):
        node.masked(node.sketch(rng.standard_normal(50)), float(rng.exponential()), r)
        if r < 3:
            node.revealed(r)
    back = wire.starts_from(wire.starts_record(node))
    assert back.key == node.key and back.rounds == [1, 2] and np.array_equal(back.models, node.models)
    assert back.updates == node.updates and back.pending[0] == 3 and np.array_equal(back.pending[1], node.pending[1])
    assert wire.starts_from(wire.starts_record(Starts())).rounds == []
