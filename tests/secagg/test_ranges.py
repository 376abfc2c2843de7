import math

import pytest

from securemark.secagg.ranges import FIRST, GROWTH, MAX_RANGE, MOST_GROWN, SCALE, Ranges, pow2ceil


def test_pow2ceil():
    assert [pow2ceil(x) for x in (1.0, 8.0, 8.1, 0.3, 49660.8)] == [1.0, 8.0, 16.0, 0.5, 65536.0]


def test_ranges_hand_worked():
    """floor 8, SCALE 16: weights of |w| <= 0.1 get the floor; a running variance of 3103.8 gets
    16 x 3103.8 = 49660.8 -> 65536; a running mean at zero gets the floor."""
    assert (SCALE, GROWTH, FIRST) == (16.0, 4.0, 256.0)
    r = Ranges(8.0, summed=True)
    tensors = [("fc.weight", 3, 0.1), ("bn.running_var", 2, 3103.8), ("bn.running_mean", 4, 0.0)]
    assert r.parts(tensors) == ((3, 8.0), (2, 65536.0), (4, 8.0))
    assert r.grow([n for n, _, _ in tensors], [0, 5, 1]) == ["bn.running_var", "bn.running_mean"]
    assert r.parts(tensors) == ((3, 8.0), (2, 262144.0), (4, 32.0))  # 4x, from the next round on
    r.grow([n for n, _, _ in tensors], [0, 0, 2])
    assert r.parts(tensors)[2] == (4, 128.0)


def test_the_first_round_has_a_floor_256_times_wider_until_a_sum_is_seen():
    """Before any sum a running variance at 1 says nothing of how far it moves: floor 8 x 256 = 2048."""
    r = Ranges(8.0)
    tensors = [("fc.weight", 3, 0.1), ("bn.running_var", 2, 1.0), ("big", 1, 500.0)]
    assert r.parts(tensors) == ((3, 2048.0), (2, 2048.0), (1, 8192.0))
    r.grow(["fc.weight", "bn.running_var", "big"], [0, 0, 0])
    assert r.parts(tensors) == ((3, 8.0), (2, 16.0), (1, 8192.0))


def test_a_resumed_run_widens_as_the_run_did():
    r = Ranges(8.0)
    r.replay([{"widened": ["a"], "clipped": 1}, {"round": 2}, {"widened": ["a", "b"], "clipped": 3}, {"clipped": 0}])
    assert r.summed
    assert r.grown == {"a": 2, "b": 1}
    assert r.parts([("a", 1, 0.0), ("b", 1, 0.0), ("c", 1, 0.0)]) == ((1, 128.0), (1, 32.0), (1, 8.0))


def test_a_client_that_lies_about_clipped_counts_widens_a_range_4096x_at_most():
    """The sum bounds a clipped count only by the part's length: one client can claim clipping every round.
    Growth stops at MOST_GROWN = 6 steps (4096x: the floor's step 8 x 4096 x 2 / 2^32 = 1.5e-5)."""
    r = Ranges(8.0, summed=True)
    for _ in range(50):
        r.grow(["a"], [1])
    assert r.grown == {"a": MOST_GROWN} and r.parts([("a", 1, 0.1)]) == ((1, 8.0 * 4**6),)
    assert Ranges(8.0, {"a": 10_000}, summed=True).parts([("a", 1, 1.0)]) == ((1, 16.0 * 4**6),)
    assert Ranges(8.0, summed=True).parts([("big", 1, 1e300)]) == ((1, MAX_RANGE),) and math.isfinite(MAX_RANGE)
    with pytest.raises(ValueError, match="'b' holds NaN"):
        r.parts([("b", 1, float("nan"))])


def test_round_bits_hand_worked():
    """10 clients of at most 500 examples: the sum needs ceil(log2(5001)) = 13 bits for weights. The first round
    takes the 8-byte sum (min(32, 64 - 13) = 32 bits); later rounds the 4-byte one (32 - 13 = 19 >= 16 bits);
    with up to 2^16 examples 4-byte words would leave 12 bits: 8-byte, 32 bits."""
    from securemark.secagg.quantize import QuantConfig
    from securemark.secagg.ranges import round_bits

    assert [round_bits(32, 10, 500, s) for s in (False, True)] == [32, 19]
    assert round_bits(32, 10, 1 << 16, True) == 32 and round_bits(12, 10, 500, False) == 12
    assert QuantConfig.of_parts(((10, 8.0),), 19, 500, 10).modulus_bits == 32
    assert QuantConfig.of_parts(((10, 8.0),), 20, 500, 10).modulus_bits == 64  # one more bit would not fit
