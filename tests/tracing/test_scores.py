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
