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


# --- an update in parts, each with its own range -------------------------------------------------------------
def test_parts_hand_worked():
    """bits=2: part 1 range 1.5 (step 1, grid -1.5 -0.5 0.5 1.5), part 2 range 3 (step 2, grid -3 -1 1 3).
    Values on the grids encode exactly; 7.0 in part 2 is clipped to 3 and counted in part 2's slot."""
    cfg = QuantConfig.of_parts(((1, 1.5), (2, 3.0)), bits=2, max_weight=10, max_clients=4)
    assert cfg.size == 3 and cfg.extra == 3 and cfg.n_parts == 2
    rng = np.random.default_rng(0)
    a = encode(np.array([0.5, -1.0, 7.0]), 2, cfg, rng)  # q = 2 | 1, 3 (clipped)
    b = encode(np.array([-1.5, 1.0, -3.0]), 1, cfg, rng)  # q = 0 | 2, 0
    assert list(a) == [4, 2, 6, 2, 0, 1] and list(b) == [0, 2, 0, 1, 0, 0]
    dec = decode(a + b, cfg, 2)
    assert dec.total_weight == 3 and dec.clipped_parts == (0, 1) and dec.clipped == 1
    np.testing.assert_allclose(dec.mean, [(2 * 0.5 - 1.5) / 3, (2 * -1.0 + 1.0) / 3, (2 * 3.0 - 3.0) / 3])


def test_a_tensor_beyond_the_old_clip_aggregates_exactly_within_its_step():
    """The BatchNorm case: a running variance moving by hundreds beside weights moving by 1e-3. With its own
    range nothing is clipped, and every part's mean is within that part's step of the true weighted mean."""
    rng = np.random.default_rng(3)
    weights_part, var_part = 1e-3 * rng.standard_normal((4, 500)), 300 + 50 * rng.standard_normal((4, 16))
    cfg = QuantConfig.of_parts(((500, 8.0), (16, 1024.0)), bits=24, max_weight=1 << 16, max_clients=4)
    ns = [120, 80, 300, 7]
    total = sum(encode(np.concatenate([weights_part[k], var_part[k]]), ns[k], cfg, rng) for k in range(4))
    dec = decode(total, cfg, 4)
    expected = sum(n * np.concatenate([weights_part[k], var_part[k]]) for k, n in enumerate(ns)) / sum(ns)
    step = np.repeat([2 * 8.0 / cfg.levels, 2 * 1024.0 / cfg.levels], [500, 16])
    assert dec.clipped == 0 and np.all(np.abs(dec.mean - expected) < step)
    one = QuantConfig(clip=0.5, bits=24, max_weight=1 << 16, max_clients=4, size=516)  # the old single range
    old = decode(sum(encode(np.concatenate([weights_part[k], var_part[k]]), ns[k], one, rng) for k in range(4)), one, 4)
    assert old.clipped == 4 * 16 and abs(old.mean[-1] - expected[-1]) > 200  # what one range did


def test_the_digest_names_the_encoding_exactly():
    base = QuantConfig.of_parts(((3, 8.0), (2, 64.0)), 24, 1 << 16, 5)
    assert base.digest() == QuantConfig.of_parts(((3, 8.0), (2, 64.0)), 24, 1 << 16, 5).digest()
    others = [
        QuantConfig.of_parts(((3, 8.0), (2, 128.0)), 24, 1 << 16, 5),  # one range
        QuantConfig.of_parts(((2, 8.0), (3, 64.0)), 24, 1 << 16, 5),  # where the parts split
        QuantConfig.of_parts(((3, 8.0), (2, 64.0)), 23, 1 << 16, 5),  # bits
        QuantConfig.of_parts(((3, 8.0), (2, 64.0)), 24, 1 << 15, 5),  # max weight
        QuantConfig.of_parts(((3, 8.0), (2, 64.0)), 24, 1 << 16, 6),  # clients
    ]
    assert len({base.digest(), *(o.digest() for o in others)}) == 6 and len(base.digest()) == 32


@pytest.mark.parametrize(
    "parts",
    [
        ((-1, 1.0),),
        ((3, 0.0),),
        ((3, -1.0),),
        ((3, float("nan")),),
        ((3, float("inf")),),
        ((3, 1e-300),),
        ((3, 1e308),),
    ],
)
def test_bad_parts_are_refused(parts):
    """A range whose step would underflow (5e-324 made it 0) or whose values would overflow is refused."""
    with pytest.raises(QuantizationError, match="part"):
        QuantConfig.of_parts(parts, 16, 10, 4)


def test_an_empty_tensor_is_an_empty_part():
    """A state_dict may hold a tensor with no values: its part is empty, its clipped slot 0."""
    cfg = QuantConfig.of_parts(((2, 1.0), (0, 8.0), (1, 2.0)), bits=8, max_weight=4, max_clients=2)
    dec = decode(encode(np.array([0.5, -0.25, 1.5]), 3, cfg, np.random.default_rng(0)), cfg, 1)
    assert dec.clipped_parts == (0, 0, 0) and np.all(
        np.abs(dec.mean - [0.5, -0.25, 1.5]) <= [2 / 255, 2 / 255, 4 / 255]
    )
    with pytest.raises(QuantizationError, match="size"):
        QuantConfig.of_parts(((0, 1.0),), 16, 10, 4)


def test_an_update_of_another_length_than_its_parts_is_refused():
    cfg = QuantConfig.of_parts(((3, 1.0), (2, 1.0)), 16, 10, 4)
    with pytest.raises(QuantizationError, match="flat vector of 5"):
        encode(np.zeros(4), 1, cfg, np.random.default_rng(0))
    with pytest.raises(QuantizationError, match="D \\+ 3"):
        decode(np.zeros(7, dtype=cfg.dtype), cfg, 1)


def _encode_parts_reference(x, weight, cfg, rng):
    """Part by part as the module doc writes it, products in Python integers."""
    u = rng.random(x.shape, dtype=np.float32)
    values, clipped, start = [], [], 0
    for length, c in cfg.parts:
        part, step = x[start : start + length], 2 * c / cfg.levels
        q = np.minimum(np.floor((np.clip(part, -c, c) + c) * (1.0 / step) + u[start : start + length]), cfg.levels)
        values += [int(v) * weight % (1 << cfg.modulus_bits) for v in q]
        clipped.append(int(np.sum(np.abs(part) > c)))
        start += length
    return np.array([*values, weight, *clipped], dtype=cfg.dtype)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 6), st.sampled_from([0.25, 1.0, 8.0, 4096.0])), min_size=1, max_size=5),
    st.integers(1, 1 << 16),
    st.sampled_from([2, 16, 24, 32]),
    st.integers(0, 2**32),
    st.data(),
)
def test_parts_match_the_reference(parts, weight, bits, seed, data):
    cfg = QuantConfig.of_parts(tuple(parts), bits, 1 << 16, 8)
    x = np.array(data.draw(st.lists(st.floats(-5000, 5000), min_size=cfg.size, max_size=cfg.size)))
    got = encode(x, weight, cfg, np.random.default_rng(seed))
    assert np.array_equal(got, _encode_parts_reference(x, weight, cfg, np.random.default_rng(seed)))
    dec = decode(got, cfg, 1)
    for start, stop, c in cfg.spans(cfg.size):
        clipped = np.clip(x[start:stop], -c, c)
        assert np.all(np.abs(dec.mean[start:stop] - clipped) <= 2 * c / cfg.levels * (1 + 1e-9))


# --- what one lying client can do (no input validation): the bound docs/explanations/masking.md states ----------
PARTS = ((3, 1.0), (3, 8.0))


def _honest_sum(rng, weights, cfg):
    return sum(encode(rng.uniform(-0.2, 0.2, cfg.size), w, cfg, rng) for w in weights)


@settings(max_examples=200, deadline=None)
@given(lie=st.lists(st.integers(0, (1 << 64) - 1), min_size=9, max_size=9), seed=st.integers(0, 2**32 - 1))
def test_one_lying_client_leaves_every_parts_mean_within_its_range(lie, seed):
    """Whatever vector one client sends (any residues, weight slot included), the mean decode returns lies in
    [-c_p, c_p] for every part p, or the sum is refused: one client moves part p's mean by at most 2 c_p."""
    cfg = QuantConfig.of_parts(PARTS, 16, 100, 10)
    rng = np.random.default_rng(seed)
    total = _honest_sum(rng, [50] * 9, cfg) + np.array(lie, dtype=np.uint64)  # wraps mod 2^64, as masks do
    try:
        dec = decode(total, cfg, 10)
    except QuantizationError:
        return
    for start, stop, c in cfg.spans(cfg.size):
        assert np.all(np.abs(dec.mean[start:stop]) <= c * (1 + 1e-12))


def test_the_weight_one_wrap_attack_reaches_the_bound_not_its_weights_share():
    """A client declaring weight 1 beside 9 of weight 50 (an honest one moves a mean by at most 2 c / 451) that
    sends a wrapped negative value moves part 2's mean by 0.5 c, 113 times its weight's share: the bound that
    holds is the part's range, which the docs state."""
    cfg = QuantConfig.of_parts(PARTS, 16, 100, 10)
    rng = np.random.default_rng(0)
    honest = _honest_sum(rng, [50] * 9, cfg)
    fair = honest + encode(np.zeros(cfg.size), 1, cfg, rng)
    shift = (cfg.levels // 4) * 451  # a quarter of the range, weighted by the round's total weight
    liar = encode(np.zeros(cfg.size), 1, cfg, rng)
    liar[3:6] -= np.uint64(shift)  # wraps: a "negative" contribution to part 2
    moved = decode(honest + liar, cfg, 10).mean - decode(fair, cfg, 10).mean
    np.testing.assert_allclose(moved[3:6], -0.5 * 8.0, atol=2 * 8.0 / cfg.levels)
    assert abs(moved[3]) / (2 * 8.0 / 451) > 100
