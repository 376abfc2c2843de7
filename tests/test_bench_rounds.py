"""The round bench's pieces that need no simulation: the run order and the measured masking cost; the exchange's
poll schedule (its lag bound)."""

import itertools

import pytest

from securemark.bench.rounds import VARIANTS, bench_config, client_masking_seconds, run_order
from securemark.flower.exchange import poll_wait


def test_runs_alternate_so_drift_weighs_on_every_variant_alike():
    assert run_order(1) == list(VARIANTS)
    assert run_order(2) == ["plain", "securemark", "malicious", "flower_secaggplus",
                            "flower_secaggplus", "malicious", "securemark", "plain"]  # fmt: skip
    order = run_order(4)
    assert all(order.count(v) == 4 for v in VARIANTS)
    # each variant's mean position is the same: a linear drift adds the same to each
    assert len({sum(i for i, o in enumerate(order) if o == v) for v in VARIANTS}) == 1


def test_client_masking_seconds_is_measured_and_grows_with_the_update():
    cfg = bench_config(clients=4, params=20_000, rounds=2)
    small, large = client_masking_seconds(cfg, 1_000), client_masking_seconds(cfg, 400_000)
    assert 0 < small < large  # 400x the values: 16 MB of keystream against 40 KB


@pytest.mark.parametrize(("waited", "sleep"), [(0.0, 0.001), (0.01, 0.001), (0.1, 0.002), (1.0, 0.02), (2.5, 0.05)])
def test_poll_sleeps_two_percent_of_the_wait_between_1_and_50_ms(waited, sleep):
    assert poll_wait(waited) == pytest.approx(sleep)


def test_a_reply_is_seen_within_two_percent_or_50_ms():
    """Walk the schedule: a reply that lands at any time t is seen at the next poll, at most max(2% of t plus
    the first millisecond, 50 ms) later."""
    t, polls = 0.0, [0.0]
    while t < 30:
        t += poll_wait(t)
        polls.append(t)
    for before, after in itertools.pairwise(polls):
        assert after - before <= max(0.02 * after + 0.001, 0.05) + 1e-12
    assert len(polls) < 30 / 0.05 + 300  # 20 pulls a second once the wait is long
