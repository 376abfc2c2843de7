import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securemark.secagg.quantize import QuantConfig, QuantizationError, decode, encode


def test_weighted_mean_hand_worked():
    # bits=2, clip=1.5: step 1, grid {-1.5, -0.5, 0.5, 1.5} -> q = {0, 1, 2, 3}. Values on the grid encode exactly.
    cfg = QuantConfig(clip=1.5, bits=2, max_weight=10, max_clients=4)
    rng = np.random.default_rng(0)
    xs, ws = [-0.5, 0.5, 1.5], [3, 2, 1]  # q = 1, 2, 3 with weights 3, 2, 1: sum n q = 10, sum n = 6
    total = sum(encode(np.array([x]), w, cfg, rng) for x, w in zip(xs, ws, strict=True))
    assert list(total) == [10, 6, 0]
    dec = decode(total, cfg, 3)
    assert dec.total_weight == 6 and dec.clipped == 0
    assert dec.mean[0] == pytest.approx(10 / 6 * 1.0 - 1.5)  # = (3 * -0.5 + 2 * 0.5 + 1.5) / 6


def test_clipping_is_counted():
    cfg = QuantConfig(clip=1.0, bits=8)
    out = encode(np.array([0.5, 3.0, -7.0, 1.0]), 2, cfg, np.random.default_rng(0))
    assert out[-1] == 2 and out[-2] == 2
    assert out[1] == 2 * cfg.levels and out[2] == 0


def test_modulus_is_the_smallest_that_cannot_wrap():
    assert QuantConfig(bits=16, max_weight=1000, max_clients=16).modulus_bits == 32
    assert QuantConfig(bits=16, max_weight=1 << 16, max_clients=1024).modulus_bits == 64
    with pytest.raises(QuantizationError, match="wrap"):
        QuantConfig(bits=30, max_weight=1 << 30, max_clients=1 << 10)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused(bad):
    with pytest.raises(QuantizationError, match="non-finite"):
        encode(np.array([0.0, bad]), 1, QuantConfig(), np.random.default_rng(0))


def test_bad_weight_and_shape():
    cfg = QuantConfig(max_weight=5)
    with pytest.raises(QuantizationError, match="weight 6"):
        encode(np.zeros(3), 6, cfg, np.random.default_rng(0))
    with pytest.raises(QuantizationError, match="flat vector"):
        encode(np.zeros((2, 2)), 1, cfg, np.random.default_rng(0))


def test_stochastic_rounding_is_unbiased():
    cfg = QuantConfig(clip=1.0, bits=4)
    x = np.full(200_000, 0.3)
    q = decode(encode(x, 1, cfg, np.random.default_rng(1)), cfg, 1).mean  # weight 1: the quantized values
    assert abs(q.mean() - 0.3) < 1e-3
    assert set(np.round(np.unique(q), 9)) <= set(np.round(-1 + cfg.step * np.arange(16), 9))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-2, 2), min_size=1, max_size=20), st.integers(1, 30), st.integers(2, 20))
def test_error_within_one_step(values, weight, bits):
    cfg = QuantConfig(clip=2.0, bits=bits, max_weight=64, max_clients=2)
    x = np.array(values)
    dec = decode(encode(x, weight, cfg, np.random.default_rng(0)), cfg, 1)
    assert np.all(np.abs(dec.mean - x) <= cfg.step + 1e-12)


def _encode_reference(x, weight, cfg, rng):
    """The encoding as the module doc writes it, one fresh array per step, products in Python integers."""
    x = np.asarray(x, dtype=np.float64)
    u = rng.random(x.shape, dtype=np.float32)
    q = np.minimum(np.floor((np.clip(x, -cfg.clip, cfg.clip) + cfg.clip) * (1.0 / cfg.step) + u), cfg.levels)
    values = [int(v) * weight % (1 << cfg.modulus_bits) for v in q]
    return np.array([*values, weight, int(np.sum(np.abs(x) > cfg.clip))], dtype=cfg.dtype)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-3, 3) | st.sampled_from([-1.0, 1.0, -0.0, 2.0]), min_size=1, max_size=30),
    st.integers(1, 1 << 20),
    st.sampled_from([2, 16, 30]),
    st.integers(0, 2**32),
)
def test_encode_matches_the_step_by_step_reference(values, weight, bits, seed):
    """The in-place encoding against the reference, bit for bit, on both moduli (30 bits and a weight near
    2^20 take the 64-bit one, where a float product would lose the low bits)."""
    cfg = QuantConfig(clip=1.0, bits=bits, max_weight=1 << 20, max_clients=4, size=64)
    x = np.array(values)
    got = encode(x, weight, cfg, np.random.default_rng(seed))
    assert got.dtype == cfg.dtype
    assert np.array_equal(got, _encode_reference(x, weight, cfg, np.random.default_rng(seed)))


def test_clipped_slot_counts_in_the_wrap_bound():
    """bits=1, max_weight=1: the value slots need 1 bit per client, but the clipped slot can reach clients x D."""
    small = QuantConfig(bits=1, max_weight=1, max_clients=1 << 20, size=1 << 12)
    assert small.bound == (1 << 20) * (1 << 12) and small.modulus_bits == 64
    assert QuantConfig(bits=1, max_weight=1, max_clients=4, size=8).modulus_bits == 32
    with pytest.raises(QuantizationError, match="flat vector"):
        encode(np.zeros(9), 1, QuantConfig(size=8), np.random.default_rng(0))


def test_decode_refuses_sums_no_honest_clients_produce():
    cfg = QuantConfig(clip=1.0, bits=4, max_weight=10, max_clients=8, size=3)
    good = sum(encode(np.array([0.1, -0.2, 5.0]), w, cfg, np.random.default_rng(w)) for w in (2, 3))
    assert decode(good, cfg, 2).total_weight == 5 and decode(good, cfg, 2).clipped == 2
    for bad_weight in (0, 1, 21):  # below the number of contributors, or above 2 x max_weight
        total = good.copy()
        total[-2] = bad_weight
        with pytest.raises(QuantizationError, match="impossible total weight"):
            decode(total, cfg, 2)
    total = good.copy()
    total[0] = 5 * cfg.levels + 1  # more than weight x levels
    with pytest.raises(QuantizationError, match="impossible sum"):
        decode(total, cfg, 2)
    total = good.copy()
    total[-1] = 7  # 2 clients x 3 values = 6 at most
    with pytest.raises(QuantizationError, match="impossible sum"):
        decode(total, cfg, 2)
