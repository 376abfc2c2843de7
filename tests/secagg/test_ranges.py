import math

import pytest

from securemark.secagg.ranges import FIRST, GROWTH, MAX_RANGE, SCALE, Ranges, pow2ceil


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
    r.replay([{"widened": ["a"], "clipped": 1}, {"round": 2}, {"widened": ["a", "b"], "clipped": 3}])
    assert r.summed
    assert r.grown == {"a": 2, "b": 1}
    assert r.parts([("a", 1, 0.0), ("b", 1, 0.0), ("c", 1, 0.0)]) == ((1, 128.0), (1, 32.0), (1, 8.0))


def test_ranges_stay_finite_and_refuse_a_broken_model():
    r = Ranges(8.0, {"a": 10_000})
    assert r.parts([("a", 1, 1.0)]) == ((1, MAX_RANGE),) and math.isfinite(MAX_RANGE)
    with pytest.raises(ValueError, match="'b' holds NaN"):
        r.parts([("b", 1, float("nan"))])
