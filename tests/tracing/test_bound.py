"""The per-observation false-accusation bound: checked against exact enumeration and against 10^5 innocents
for the observations a pirate would choose (one spike, a few spikes, heavy tails)."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securemark.codes import accusation_threshold, tardos
from securemark.tracing.bound import Law, robust_observation
from securemark.tracing.scores import accuse


def exact_tail(law: Law, tau: float, strict: bool = True) -> float:
    """P(S > tau) (or >= tau) by enumerating all 2^L bit patterns: the slow, obvious reference."""
    total = 0.0
    for bits in itertools.product((0, 1), repeat=len(law.w)):
        x = np.array(bits)
        s = float(np.sum(law.w * (x - law.p)))
        if s > tau or (not strict and s >= tau):
            total += float(np.prod(np.where(x == 1, law.p, 1 - law.p)))
    return total


def test_single_spike_golden():
    # one coordinate: S = w (x - p) is two-point; above its lower value S > tau has probability exactly p
    p = np.array([0.2])
    law = Law.of(np.array([50.0]), p)
    top = 50.0 * math.sqrt(0.8 / 0.2)  # w (1 - p) with w = 50 / sqrt(0.16) = 125: 125 * 0.8 = 100
    assert law.maximum == pytest.approx(100.0)
    assert top == pytest.approx(100.0)
    assert law.threshold(0.1) == pytest.approx(100.0)  # p = 0.2 > alpha: only the maximum is safe
    assert exact_tail(law, law.threshold(0.1)) == 0.0
    # the Gaussian rule accuses above 1.28 sigma = 64: P = 0.2, twice alpha
    assert exact_tail(law, accusation_threshold(1, 0.1) * law.std) == pytest.approx(0.2)
    assert law.threshold(0.5) < 100.0 and exact_tail(law, law.threshold(0.5)) == pytest.approx(0.2)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(0, 2**31),
    st.sampled_from(["gauss", "spike", "cauchy", "signs"]),
    st.sampled_from([0.2, 0.05, 0.01, 1e-3]),
)
def test_threshold_and_p_values_hold_against_exact_enumeration(length, seed, kind, alpha):
    rng = np.random.default_rng(seed)
    p = tardos.arcsine_bias(rng.random(length), 3)
    y = {"gauss": rng.standard_normal(length), "cauchy": rng.standard_cauchy(length),
         "signs": np.sign(rng.standard_normal(length)), "spike": rng.standard_normal(length) * 0.01}[kind]  # fmt: skip
    if kind == "spike":
        y[rng.integers(length)] = 1e3
    law = Law.of(y, p)
    tau = law.threshold(alpha)
    assert exact_tail(law, tau) <= alpha * (1 + 1e-9)
    for score in (0.5 * tau, tau, 1.5 * tau + 1e-9):
        assert law.tail_bound(score) >= exact_tail(law, score, strict=False) * (1 - 1e-9)


def innocent_rate(y: np.ndarray, bias: np.ndarray, tau: float, rows: int, rng: np.random.Generator) -> float:
    w, offset = tardos.score_weights(y, bias)
    above = 0
    for _ in range(rows // 20_000):
        x = tardos.draw_rows(bias.astype(np.float32), rng.random((20_000, len(y)), dtype=np.float32))
        above += int(((x @ w.astype(np.float32)) - offset > tau).sum())
    return above / rows


@pytest.mark.parametrize("kind", ["one-spike", "three-spikes", "cauchy", "pirate-copy"])
def test_innocent_rate_over_1e5_rows_stays_below_the_bound(kind):
    """Per-innocent level alpha = 1e-3: the share of 10^5 innocent scores above the certified threshold is at
    most alpha (with a 4-sigma binomial allowance). The Gaussian rule fails the spiked observations."""
    rng = np.random.default_rng(7)
    length, alpha, rows = 512, 1e-3, 100_000
    bias = tardos.arcsine_bias(rng.random(length), 5)
    y = rng.standard_normal(length) * 0.01
    # a spike where p ~ 0.05: its upper value y sqrt((1-p)/p) ~ 4.4 y lies beyond z(1e-3) = 3.1 sigma, and
    # an innocent reaches it with probability p = 50 alpha
    near = np.argsort(np.abs(bias - 0.05))
    if kind == "one-spike":
        y[near[0]] = 500.0
    elif kind == "three-spikes":
        y[near[:3]] = [300.0, 280.0, 260.0]
    elif kind == "cauchy":
        y = rng.standard_cauchy(length)
    else:  # a real pirate observation: 5 colluders' majority, robustly read
        y = np.sign(tardos.draw_rows(bias, rng.random((5, length))).mean(0) - 0.5)
    law = Law.of(y, bias)
    tau = law.threshold(alpha)
    rate = innocent_rate(y, bias, tau, rows, rng)
    assert rate <= alpha + 4 * math.sqrt(alpha / rows), f"{kind}: innocent rate {rate:.2e} above alpha"
    if "spike" in kind:
        gaussian = innocent_rate(y, bias, accusation_threshold(1, alpha) * law.std, rows, rng)
        assert gaussian > 5 * alpha, f"the Gaussian rule should fail a spike, got {gaussian:.2e}"


def test_threshold_costs_little_for_a_pirate_copy():
    """For a real coalition's observation the certified threshold stays near the Gaussian z (here below it:
    Tardos' heavy terms point down for colluding symbols)."""
    rng = np.random.default_rng(3)
    bias = tardos.arcsine_bias(rng.random(2048), 5)
    y = np.sign(tardos.draw_rows(bias, rng.random((5, 2048))).mean(0) - 0.5)
    law = Law.of(y, bias)
    z = accusation_threshold(1000, 1e-3)
    assert 0.9 * z < law.threshold(1e-6) / law.std < 1.1 * z


def test_robust_observation():
    signs = np.where(np.arange(100) % 3 == 0, -1.0, 1.0)
    obs = robust_observation(signs)
    assert obs.clipped == 0 and np.array_equal(obs.y, signs)
    spiked = signs.copy()
    spiked[7] = 1e9
    obs = robust_observation(spiked)
    assert obs.clipped == 1 and obs.y[7] == pytest.approx(2 * 1.0 / 0.6744897501960817)
    merged = np.where(np.arange(100) % 4 == 0, 1.0, 0.125)  # a merge: median |y| 0.125, its +-1 never clipped
    merged[5] = -40.0
    obs = robust_observation(merged)
    assert obs.clipped == 1 and obs.y[0] == 1.0 and obs.y[5] == -1.0
    assert robust_observation(np.zeros(8)).y.tolist() == [0.0] * 8
    with pytest.raises(ValueError, match="non-finite"):
        robust_observation(np.array([1.0, np.nan]))


def test_accuse_orders_by_score_and_handles_zero_observation():
    rng = np.random.default_rng(0)
    bias = tardos.arcsine_bias(rng.random(64), 3)
    y = np.ones(64)
    law = Law.of(y, bias)
    scores = np.array([0.0, 30.0, 10.0, 50.0]) * law.std / 5  # normalized 0, 6, 2, 10
    acc = accuse(scores, law, eps=1e-3)
    assert list(acc.accused) == [3, 1] and acc.threshold < 6
    assert acc.innocent_tail <= 1e-3 / 4 * 1.001
    assert acc.p_values(np.array([0]))[0] == 1.0 and acc.p_values(np.array([3]))[0] < 1e-6
    none = accuse(scores, Law.of(np.zeros(64), bias), eps=1e-3)
    assert len(none.accused) == 0


def test_absurd_observations_are_refused_and_vanishing_ones_accuse_nobody():
    p = np.full(64, 0.3)
    with pytest.raises(ValueError, match="absurd"):
        Law.of(np.linspace(-1, 1, 64) * 1e153, p)  # its norm overflows: the search for lambda would never end
    tiny = np.linspace(-1, 1, 64) * 1e-160  # its norm underflows to 0
    assert Law.of(tiny, p).certify(1e-6) == (0.0, 0.0) and Law.of(tiny, p).std == 0.0
