import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securemark.secagg import shamir


def test_every_threshold_subset_rebuilds_and_smaller_ones_do_not():
    secret = os.urandom(32)
    shares = shamir.split(secret, [1, 2, 3, 4, 5, 6], 4)
    for subset in itertools.combinations(shares, 4):
        assert shamir.combine({x: shares[x] for x in subset}, 4) == secret
    for subset in itertools.combinations(shares, 3):
        with pytest.raises(shamir.ShareError, match="need 4 shares"):
            shamir.combine({x: shares[x] for x in subset}, 4)


def test_tampered_share_is_rejected_not_silently_wrong():
    secret = os.urandom(32)
    shares = shamir.split(secret, [1, 2, 3], 3)
    bad = dict(shares)
    bad[2] = bytes([bad[2][0]]) + bytes([bad[2][1] ^ 1]) + bad[2][2:]
    with pytest.raises(shamir.ShareError, match="inconsistent"):
        shamir.combine(bad, 3)
    other = shamir.split(os.urandom(32), [1, 2, 3], 3)
    with pytest.raises(shamir.ShareError, match="inconsistent"):
        shamir.combine({1: shares[1], 2: shares[2], 3: other[3]}, 3)


def test_threshold_one_shares_are_the_secret_itself():
    secret = bytes(range(32))
    shares = shamir.split(secret, [7, 9], 1)
    assert shares[7] == shares[9] and int.from_bytes(shares[7], "big") == int.from_bytes(secret, "big")


@pytest.mark.parametrize(("holders", "t"), [([1, 1, 2], 2), ([0, 1], 1), ([1, 2], 3), ([1, 2], 0)])
def test_bad_arguments(holders, t):
    with pytest.raises(shamir.ShareError):
        shamir.split(bytes(32), holders, t)


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(1, 8), st.data())
def test_round_trip_property(secret, n, data):
    t = data.draw(st.integers(1, n))
    holders = data.draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n, unique=True))
    shares = shamir.split(secret, holders, t)
    chosen = data.draw(st.lists(st.sampled_from(holders), min_size=t, max_size=n, unique=True))
    assert shamir.combine({x: shares[x] for x in chosen}, t) == secret
