import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from securemark.evaluation.stats import meets_target, summarize, wilson


def test_wilson_golden_values():
    # 0 of n: [0, z^2 / (n + z^2)]; n of n: [n / (n + z^2), 1]  (z = 1.959964)
    z2 = 1.959963984540054**2
    assert wilson(0, 200) == pytest.approx((0.0, z2 / (200 + z2)))
    assert wilson(0, 200)[1] == pytest.approx(0.018846, abs=1e-6)
    assert wilson(200, 200) == pytest.approx((200 / (200 + z2), 1.0))
    lo, hi = wilson(5, 10)  # symmetric about 1/2, worked by hand: 0.5 -+ 0.2634
    assert lo == pytest.approx(1 - hi) and hi == pytest.approx(0.76340, abs=1e-5)


@given(st.integers(1, 5000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_contains_the_estimate_and_stays_in_the_unit_interval(kn):
    k, n = kn
    lo, hi = wilson(k, n)
    assert 0.0 <= lo <= k / n + 1e-12 and k / n - 1e-12 <= hi <= 1.0


@given(st.integers(0, 50), st.integers(50, 400))
def test_wilson_narrows_with_more_trials(k, n):
    lo1, hi1 = wilson(k, n)
    lo4, hi4 = wilson(4 * k, 4 * n)  # same proportion, four times the trials
    assert hi4 - lo4 < hi1 - lo1


@pytest.mark.parametrize(("k", "n"), [(-1, 10), (11, 10), (0, 0)])
def test_wilson_rejects_impossible_counts(k, n):
    with pytest.raises(ValueError):
        wilson(k, n)


def _trial(size, caught, colluders, innocents, accuracy=0.9):
    return {
        "coalition_size": size, "caught": caught, "colluders_accused": colluders, "innocents_accused": innocents,
        "accuracy": accuracy, "bit_agreement": 1.0, "survival": 0.5, "top_colluder_score": 6.0,
        "top_innocent_score": 3.0, "tracing_seconds": 0.1, "attack_seconds": 0.2,
    }  # fmt: skip


def test_summarize_counts_by_hand():
    trials = [_trial(3, True, 3, 0, 0.9), _trial(3, True, 1, 2, 0.8), _trial(3, False, 0, 0, 0.7)]
    trials.append(_trial(3, True, 2, 0))
    cell = summarize(trials)
    assert cell["trials"] == 4 and cell["catch_rate"] == 0.75 and cell["all_caught_rate"] == 0.25
    assert cell["innocents_accused"] == 2 and cell["trials_with_innocent"] == 1
    assert cell["colluders_accused_mean"] == 1.5 and cell["accuracy"] == pytest.approx(0.825)
    assert (cell["catch_low"], cell["catch_high"]) == wilson(3, 4)
    assert not meets_target(cell)


def test_a_control_cell_has_no_catch_rate_and_meets_the_target_only_without_accusations():
    clean = summarize([_trial(0, False, 0, 0) for _ in range(5)])
    assert clean["catch_rate"] is None and math.isnan(clean["top_colluder_score"]) and meets_target(clean)
    assert not meets_target(summarize([_trial(0, False, 0, 1)] + [_trial(0, False, 0, 0)] * 4))


def test_summarize_needs_a_trial():
    with pytest.raises(ValueError):
        summarize([])
