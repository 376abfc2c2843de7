import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from securemark.flower import wire

from .inprocess import flatten

shapes = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 5)), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(shapes, st.sampled_from([np.float16, np.float32, np.float64]), st.data())
def test_difference_is_the_flat_difference(dims, dtype, draw):
    """The one-pass update against the reference (both sides flattened to float64, then subtracted)."""
    names = [f"t{i}" for i in range(len(dims))]
    finite = {"allow_nan": False, "allow_infinity": False, "width": np.dtype(dtype).itemsize * 8}
    before = {n: draw.draw(arrays(dtype, d, elements=st.floats(**finite))) for n, d in zip(names, dims, strict=True)}
    after = {n: draw.draw(arrays(dtype, d, elements=st.floats(**finite))) for n, d in zip(names, dims, strict=True)}
    got = wire.difference(after, before, sorted(names))
    assert got.dtype == np.float64
    assert np.array_equal(got, flatten(after, sorted(names)) - flatten(before, sorted(names)))


def test_checksum_names_any_change_of_a_masked_vector():
    y = np.arange(1000, dtype=np.uint32)
    base = wire.checksum(y)
    assert base == wire.checksum(y.copy())
    for pos in (0, 499, 999):
        z = y.copy()
        z[pos] ^= 1
        assert wire.checksum(z) != base
    assert wire.checksum(y[::-1].copy()) != base
