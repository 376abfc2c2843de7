"""The code-level figures the tracer rests on (n = 1000, eps = 1e-3, 200 trials each)."""

import numpy as np
import pytest

from securemark.codes import accusation_threshold, tardos
from securemark.codes.channel import collude
from securemark.evaluation.codes import CodeTrialSpec, evaluate_code

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("attack", ["majority", "minority", "interleave", "coin-flip", "all-1"])
def test_tardos_five_colluders_length_2048(attack):
    r = evaluate_code(CodeTrialSpec("tardos", 1000, 5, 2048, attack, trials=200, eps=1e-3, seed=11))
    assert r["catch_rate"] >= 0.99
    assert r["false_accusations"] == 0


def test_tardos_ten_colluders_averaging_length_3072():
    r = evaluate_code(CodeTrialSpec("tardos", 1000, 10, 3072, "average", trials=200, eps=1e-3, seed=12))
    assert r["catch_rate"] >= 0.99
    assert r["false_accusations"] == 0


def test_random_codes_fail_under_minority_which_is_why_tardos_is_default():
    rand = evaluate_code(CodeTrialSpec("random", 1000, 3, 2048, "minority", trials=100, seed=13))
    tard = evaluate_code(CodeTrialSpec("tardos", 1000, 3, 2048, "minority", trials=100, seed=13))
    assert rand["catch_rate"] <= 0.05
    assert tard["catch_rate"] >= 0.99


def test_bibd_31_6_1_identifies_coalitions_exactly_in_the_harness():
    r = evaluate_code(CodeTrialSpec("bibd", 31, 5, attack="average", trials=200, seed=14))
    assert r["all_caught_rate"] == 1.0 and r["false_accusations"] == 0 and r["mean_accused"] == 5
    assert r["threshold"] == 1 - 1 / 5


@pytest.mark.parametrize("attack", ["interleave", "minority", "average"])
def test_innocent_false_positive_rate_at_most_eps(attack):
    """2 x 10^5 innocent scores against pirate observations: the share above z(eps = 1e-3, n = 1) is <= eps."""
    rng = np.random.default_rng(15)
    eps, length, innocents, trials = 1e-3, 2048, 1000, 200
    z = accusation_threshold(1, eps)
    above = 0
    for _ in range(trials):
        bias = tardos.arcsine_bias(rng.random(length), 5)
        coalition = tardos.draw_rows(bias, rng.random((5, length)))
        y = collude(2.0 * coalition - 1.0, attack, rng)
        rows = tardos.draw_rows(bias.astype(np.float32), rng.random((innocents, length), dtype=np.float32))
        w, offset = tardos.score_weights(y, bias)
        above += int(((rows @ w - offset) / np.linalg.norm(y) > z).sum())
    rate = above / (trials * innocents)
    assert rate <= eps, f"empirical innocent tail {rate:.2e} above nominal {eps}"
