import numpy as np
import pytest

from securemark.codes import bibd
from securemark.codes.channel import collude


@pytest.mark.parametrize(("q", "v", "k"), [(2, 7, 3), (3, 13, 4), (5, 31, 6)])
def test_projective_plane_is_a_v_k_1_design(q, v, k):
    inc = bibd.incidence(q).astype(int)
    assert inc.shape == (v, v)
    assert (inc.sum(0) == k).all() and (inc.sum(1) == k).all()
    meet = inc.T @ inc  # lines x lines: common points
    assert (meet[~np.eye(v, dtype=bool)] == 1).all()


def test_non_prime_order_is_refused():
    with pytest.raises(ValueError, match="prime"):
        bibd.incidence(4)


@pytest.mark.parametrize("detector", ["and", "soft"])
def test_every_coalition_up_to_five_is_identified_exactly(detector):
    q, rows = 5, bibd.code_rows(5)  # (31, 6, 1): 31 users, resists 5 colluders
    pm = 2.0 * rows - 1.0
    for size in range(1, 6):
        coalitions = bibd.all_coalitions(31, size)  # up to 169,911 coalitions
        y = pm[coalitions].mean(axis=1)  # (N, 31) averaged observations
        if detector == "and":
            anded = y > 1 - 1 / 5
            hit = (~(~rows[None] & anded[:, None, :])).all(-1)  # (N, users)
        else:
            zero = (1 - y) / 2
            hit = zero @ (~rows).T / (q + 1) > bibd.soft_threshold(q, 5)
        truth = np.zeros_like(hit)
        np.put_along_axis(truth, coalitions, True, axis=1)
        assert (hit == truth).all(), f"coalition size {size}"


def test_soft_scores_golden_values():
    q, k, size = 5, 6, 3
    rows = bibd.code_rows(q)
    y = collude(2.0 * rows[:size] - 1.0, "average", np.random.default_rng(0))
    s = bibd.soft_scores(y, rows)
    np.testing.assert_allclose(s[:size], (k + size - 1) / (k * size))
    np.testing.assert_allclose(s[size:], 1 / k)
