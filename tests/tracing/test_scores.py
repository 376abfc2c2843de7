import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from securemark.codes import pack_bits, tardos
from securemark.tracing.scores import PackedCodebook, dense_scores_reference, tardos_scores


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 200), st.integers(0, 2**31), st.sampled_from(["table", "dense", "auto"]))
def test_packed_scores_match_dense_reference(n, length, seed, method):
    rng = np.random.default_rng(seed)
    bias = tardos.arcsine_bias(rng.random(length), 4)
    rows = tardos.draw_rows(bias, rng.random((n, length)))
    y = rng.standard_normal(length)
    book = PackedCodebook.from_packed_rows(pack_bits(rows), length)
    w, offset = tardos.score_weights(y, bias)
    np.testing.assert_allclose(
        book.matvec(w, method) - offset, dense_scores_reference(rows, y, bias), atol=1e-3, rtol=1e-4
    )
    if method == "auto":
        np.testing.assert_allclose(tardos_scores(book, y, bias), book.matvec(w, "dense") - offset)


def test_weights_beyond_float32_are_scored_without_overflow():
    """The fast paths sum in float32 (overflow near 3.4e38); an observation scaled by 1e40 (any finite y up
    to tracing.bound.MAX_OBSERVATION is a valid input) must give the float64 reference's scores, scaled."""
    rng = np.random.default_rng(7)
    bias = tardos.arcsine_bias(rng.random(100), 3)
    rows = tardos.draw_rows(bias, rng.random((40, 100)))
    book = PackedCodebook.from_packed_rows(pack_bits(rows), 100)
    y = rng.standard_normal(100)
    for method in ("dense", "table"):
        w, _ = tardos.score_weights(1e40 * y, bias)
        got = book.matvec(w, method)
        assert np.all(np.isfinite(got))
        assert np.allclose(got / 1e40, rows @ (w / 1e40), rtol=1e-5, atol=1e-3 * np.abs(w / 1e40).sum())
