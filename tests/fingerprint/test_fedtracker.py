import numpy as np

from securemark import attacks, models
from securemark.fingerprint.carrier import CarrierSpec
from securemark.fingerprint.fedtracker import PerCustomerFingerprints, argmax_trace
from securemark.fingerprint.keys import OwnerSecret


def _setup(customers=12, length=64):
    base = models.build("cnn", (1, 8, 8), 10, seed=3).state_dict()
    fps = PerCustomerFingerprints.create(OwnerSecret.generate(), CarrierSpec(), base, customers, length, 0.05)
    return base, fps


def test_fast_extraction_matches_each_customers_own_projection():
    base, fps = _setup()
    copy = fps.embed(base, 4)
    soft = fps.extract_all(copy)
    dv = fps.layout.read(copy) - fps.layout.read(base)
    for j in (0, 4, 11):  # slow reference: customer j's Projection applied to the carrier change
        np.testing.assert_allclose(soft[j], fps.projection(j).apply(dv) / fps.strength, atol=1e-9)


def test_an_intact_copy_shows_its_own_fingerprint_and_argmax_names_it():
    base, fps = _setup()
    soft = fps.extract_all(fps.embed(base, 7))
    agreement = fps.agreement(soft)
    np.testing.assert_allclose(soft[7], 2.0 * fps.bits[7] - 1, atol=1e-5)  # exact up to float32 weights
    assert agreement[7] == 1.0 and np.all(np.delete(agreement, 7) < 0.8)
    assert argmax_trace(agreement).tolist() == [7]


def test_argmax_accuses_someone_even_for_an_unmarked_model():
    """The weakness the evaluation measures: no threshold, so an innocent is always named."""
    base, fps = _setup()
    noisy, _ = attacks.add_noise(base, 1e-3, np.random.default_rng(0))
    accused = argmax_trace(fps.agreement(fps.extract_all(noisy)))
    assert len(accused) == 1 and 0 <= accused[0] < fps.customers


def test_customers_get_distinct_projections_and_fingerprints():
    _, fps = _setup(customers=5)
    assert len({fps.groups[j].tobytes() for j in range(5)}) == 5
    assert len({fps.bits[j].tobytes() for j in range(5)}) == 5
