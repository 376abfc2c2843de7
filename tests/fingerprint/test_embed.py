import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securemark.fingerprint import CarrierSpec, Fingerprinter, OwnerSecret, Projection
from securemark.fingerprint.carrier import CarrierMismatch
from securemark.models import build

SECRET = OwnerSecret(bytes(range(32)))


def cnn_state(seed=0):
    return {k: v.clone() for k, v in build("cnn", (1, 8, 8), 10, seed=seed).state_dict().items()}


def rows(n, length, seed=0):
    return np.random.default_rng(seed).random((n, length)) < 0.5


def test_projection_rows_are_orthonormal():
    proj = Projection.derive(SECRET, 50, 7)
    x = np.stack([proj.adjoint(e) for e in np.eye(7)])  # rows of X, (7, 50)
    np.testing.assert_allclose(x @ x.T, np.eye(7), atol=1e-12)
    np.testing.assert_allclose(proj.apply(np.eye(50)[3]), x[:, 3])  # apply agrees with the same X


@settings(max_examples=30, deadline=None)
@given(st.integers(8, 400), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_the_float32_adjoint_is_the_float64_one_rounded(size, length, seed):
    """The copy-making path (float32, one gather) against the reference adjoint: float32 rounding apart."""
    proj = Projection.derive(SECRET, size, length)
    y = np.random.default_rng(seed).standard_normal(length) * 10.0 ** np.random.default_rng(seed).integers(-3, 4)
    fast = proj.adjoint32(y)
    assert fast.dtype == np.float32 and fast.shape == (size,)
    np.testing.assert_allclose(fast, proj.adjoint(y), rtol=2e-7, atol=0)


def test_projection_depends_on_the_secret_only_through_hkdf():
    a = Projection.derive(SECRET, 1000, 64)
    b = Projection.derive(SECRET, 1000, 64)
    c = Projection.derive(OwnerSecret(bytes(32)), 1000, 64)
    np.testing.assert_array_equal(a.groups, b.groups)
    assert (a.groups != c.groups).mean() > 0.9
    assert np.bincount(a.groups).min() >= 1000 // 64  # balanced groups


def test_carrier_smaller_than_code_is_refused():
    with pytest.raises(ValueError, match="fewer than the code length"):
        Projection.derive(SECRET, 10, 16)


@pytest.mark.parametrize("mode", ["weights", "filter-mean"])
def test_embed_then_extract_is_exact(mode):
    base = cnn_state()
    fp = Fingerprinter.create(SECRET, CarrierSpec(mode=mode), base, 256)
    s = fp.strength_for_budget(base, 0.05)
    bits = rows(1, 256)[0]
    copy = fp.embed(base, bits, s)
    y = fp.extract(copy, fp.project(base), s)
    np.testing.assert_allclose(y, 2.0 * bits - 1.0, atol=1e-4)
    assert all(copy[k] is base[k] for k in base if base[k].dim() < 2)  # biases untouched


def test_a_float64_model_is_marked_in_float64():
    """A float64 model keeps its dtype and extracts its row to float64 rounding, also at tiny scales (a
    float32 change would round to nothing on weights of 1e-40)."""
    for scale in (1.0, 1e-40):
        base = {k: v.double() * scale for k, v in cnn_state().items()}
        fp = Fingerprinter.create(SECRET, CarrierSpec(), base, 256)
        s = fp.strength_for_budget(base, 0.05)
        bits = rows(1, 256)[0]
        copy = fp.embed(base, bits, s)
        assert all(copy[k].dtype == torch.float64 for k in base)
        np.testing.assert_allclose(fp.extract(copy, fp.project(base), s), 2.0 * bits - 1.0, atol=1e-9)


def test_average_of_copies_extracts_mean_of_rows():
    base = cnn_state()
    fp = Fingerprinter.create(SECRET, CarrierSpec(), base, 512)
    s = fp.strength_for_budget(base, 0.05)
    code = rows(4, 512, seed=3)
    copies = [fp.embed(base, b, s) for b in code]
    avg = {k: torch.stack([c[k] for c in copies]).mean(0) for k in base}
    np.testing.assert_allclose(fp.extract(avg, fp.project(base), s), (2.0 * code - 1.0).mean(0), atol=1e-4)


def test_strength_meets_fidelity_budget_exactly():
    base = cnn_state()
    fp = Fingerprinter.create(SECRET, CarrierSpec(), base, 512)
    s = fp.strength_for_budget(base, 0.03)
    v = fp.layout.read(base)
    delta = fp.layout.read(fp.embed(base, rows(1, 512)[0], s)) - v
    assert abs(np.sqrt(np.mean(delta**2)) / np.sqrt(np.mean(v**2)) - 0.03) < 1e-5


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(16, 64), st.integers(8, 40), st.integers(0, 2**31))
def test_exact_extraction_for_random_models(layers, width, length, seed):
    gen = torch.Generator().manual_seed(seed)
    sd = {f"layer{i}.weight": torch.randn(width, 3, generator=gen) for i in range(layers)}
    sd["bias"] = torch.randn(5, generator=gen)
    fp = Fingerprinter.create(SECRET, CarrierSpec(), sd, length)
    bits = rows(1, length, seed)[0]
    y = fp.extract(fp.embed(sd, bits, 0.5), fp.project(sd), 0.5)
    np.testing.assert_allclose(y, 2.0 * bits - 1.0, atol=1e-4)


def test_mismatched_suspect_names_the_tensor():
    base = cnn_state()
    fp = Fingerprinter.create(SECRET, CarrierSpec(), base, 64)
    bad = dict(base)
    bad["head.1.weight"] = torch.zeros(3, 3)
    with pytest.raises(CarrierMismatch, match=r"'head.1.weight' has shape \[3, 3\]"):
        fp.project(bad)
    missing = {k: v for k, v in base.items() if k != "features.0.weight"}
    with pytest.raises(CarrierMismatch, match=r"'features\.0\.weight' is missing"):
        fp.project(missing)


def test_carrier_patterns_select_tensors_in_name_order():
    sd = {"b.weight": torch.zeros(2, 2), "a.weight": torch.zeros(3, 2), "a.bias": torch.zeros(3)}
    assert [n for n, _ in CarrierSpec().select(sd)] == ["a.weight", "b.weight"]
    assert [n for n, _ in CarrierSpec(exclude=("a.*",)).select(sd)] == ["b.weight"]
    with pytest.raises(CarrierMismatch, match="no tensor matches"):
        CarrierSpec(include=("zzz",)).select(sd)
