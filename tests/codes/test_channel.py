import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from securemark.codes.channel import ATTACKS, collude

DISCRETE = [a for a in ATTACKS if a != "average"]


@given(st.sampled_from(DISCRETE), st.integers(1, 8), st.integers(1, 64), st.integers(0, 2**32 - 1))
def test_marking_assumption(attack, c, length, seed):
    rng = np.random.default_rng(seed)
    rows = np.where(rng.random((c, length)) < 0.5, -1.0, 1.0)
    y = collude(rows, attack, rng)
    agree = np.abs(rows.sum(0)) == c
    np.testing.assert_array_equal(y[agree], rows[0, agree])
    assert set(np.unique(y)) <= {-1.0, 1.0}


def test_hand_worked_attacks():
    rows = np.array([[1, 1, -1, 1], [1, -1, -1, -1], [1, -1, -1, 1.0]])
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(collude(rows, "average", rng), [1, -1 / 3, -1, 1 / 3])
    np.testing.assert_array_equal(collude(rows, "majority", rng), [1, -1, -1, 1])
    np.testing.assert_array_equal(collude(rows, "minority", rng), [1, 1, -1, -1])
    np.testing.assert_array_equal(collude(rows, "all-1", rng), [1, 1, -1, 1])
    np.testing.assert_array_equal(collude(rows, "all-0", rng), [1, -1, -1, -1])


def test_unknown_attack_is_named():
    with pytest.raises(ValueError, match="unknown collusion attack 'nope'"):
        collude(np.ones((2, 3)), "nope", np.random.default_rng(0))
