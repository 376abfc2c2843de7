import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from securemark.codes import accusation_threshold, gaussian_sf, pack_bits, tardos, unpack_bits


def test_threshold_golden_values():
    assert accusation_threshold(1, 0.5) == 0.0
    assert math.isclose(accusation_threshold(1, 0.158655253931457), 1.0, rel_tol=1e-9)
    # Phi^-1(1 - 1e-6) = 4.753424308822899
    assert math.isclose(accusation_threshold(1000, 1e-3), 4.753424308822899, rel_tol=1e-9)


def test_gaussian_sf_far_tail_keeps_precision():
    assert math.isclose(float(gaussian_sf(0.0)), 0.5)
    assert math.isclose(float(gaussian_sf(10.0)), 7.619853024160527e-24, rel_tol=1e-9)


def test_arcsine_bias_endpoints_and_middle():
    t = tardos.cutoff(5)
    assert t == 1 / 1500
    p = tardos.arcsine_bias(np.array([0.0, 0.5, 1.0]), 5)
    np.testing.assert_allclose(p, [t, 0.5, 1 - t], rtol=1e-12)


def test_arcsine_bias_density_matches_arcsine_law():
    p = tardos.arcsine_bias(np.random.default_rng(0).random(200_000), 10)
    # P(p < 1/4) under the arcsine law on [t, 1-t] is (asin(1/2) - asin(sqrt t)) / (pi/2 - 2 asin(sqrt t))
    tp = math.asin(math.sqrt(tardos.cutoff(10)))
    expected = (math.pi / 6 - tp) / (math.pi / 2 - 2 * tp)
    assert abs(np.mean(p < 0.25) - expected) < 0.005


def test_soft_score_golden_by_hand():
    # S = 1 * (1 - .5)/sqrt(.25) + (-1) * (0 - .2)/sqrt(.16) = 1 + 0.5
    rows = np.array([[True, False]])
    bias = np.array([0.5, 0.2])
    y = np.array([1.0, -1.0])
    np.testing.assert_allclose(tardos.soft_scores_reference(rows, y, bias), [1.5])
    w, offset = tardos.score_weights(y, bias)
    np.testing.assert_allclose(rows @ w - offset, [1.5])


@given(st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_pack_round_trip(length, seed):
    bits = np.random.default_rng(seed).random((3, length)) < 0.5
    np.testing.assert_array_equal(unpack_bits(pack_bits(bits), length), bits)


def test_innocent_scores_are_standardized():
    rng = np.random.default_rng(1)
    bias = tardos.arcsine_bias(rng.random(512), 5)
    y = np.where(rng.random(512) < 0.5, -1.0, 1.0)
    rows = tardos.draw_rows(bias, rng.random((20_000, 512)))
    z = tardos.soft_scores_reference(rows, y, bias) / np.linalg.norm(y)
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03


def test_the_length_rule_hand_worked():
    """L >= pi^2/2 c^2 ln(n/eps): c = 3, n = 40, eps = 1e-3: 4.9348 x 9 x ln(40000) = 4.9348 x 9 x 10.5966 = 470.6.
    Inverted, L = 2048, c = 5 serves n <= 1e-3 e^(4096 / (pi^2 25)) = 1e-3 e^16.600 = 16,199; L = 256, c = 3
    serves none (n <= 0.32)."""
    from securemark.codes.tardos import customers_for, length_for

    assert length_for(40, 3, 1e-3) == 471
    assert customers_for(2048, 5, 1e-3) == 16199 and customers_for(256, 3, 1e-3) == 0
    for n in (1, 10, 1000, 10**6):  # the two agree: the length for n serves at least n
        assert customers_for(length_for(n, 4, 1e-6), 4, 1e-6) >= n
        assert customers_for(length_for(n, 4, 1e-6) - 1, 4, 1e-6) < n + 1
