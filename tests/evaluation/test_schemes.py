import numpy as np
import pytest

from securemark import attacks, models
from securemark.evaluation.config import EvalConfig
from securemark.evaluation.schemes import make_scheme
from securemark.registry import Registry
from securemark.tracing.tracer import trace


def _cfg(length=128, **evaluate):
    return EvalConfig.from_dict({
        "code": {"length": length, "max_colluders": 3, "eps": 1e-3, "budget": 0.05},
        "evaluate": {"customers": 30, **evaluate},
    })  # fmt: skip


@pytest.fixture
def base():
    return models.build("cnn", (1, 8, 8), 10, seed=1).state_dict()


@pytest.mark.parametrize("name", ["tardos", "random", "bibd", "fedtracker"])
def test_every_scheme_traces_an_intact_copy_to_its_customer_alone(name, base, tmp_path):
    scheme = make_scheme(name, _cfg(), base, tmp_path)
    assert scheme.customers == (13 if name == "bibd" else 30)  # PG(2, 3) has 13 lines
    outcome = scheme.trace(scheme.copy(5))
    assert outcome.accused.tolist() == [5]
    assert scheme.survival(outcome, np.array([5])) == pytest.approx((1.0, 1.0))
    scheme.close()


def test_shared_scheme_survival_of_an_average_and_the_registry_trace_agree(base, tmp_path):
    # L = 512: an average of two scores ~2x the threshold (at 128 it falls below it about one time in five)
    scheme = make_scheme("tardos", _cfg(length=512), base, tmp_path)
    coalition = np.array([2, 9])
    merged, _ = attacks.collude([scheme.copy(2), scheme.copy(9)], "average", np.random.default_rng(0))
    outcome = scheme.trace(merged)
    # the extracted code is exactly the mean of the two +-1 rows: common bits all kept, cosine 1
    rows = 2.0 * scheme.rows[coalition] - 1
    np.testing.assert_allclose(outcome.soft, rows.mean(0), atol=1e-6)
    assert scheme.survival(outcome, coalition) == pytest.approx((1.0, 1.0))
    # the cached Tracer and a fresh trace() through the registry give the same verdict
    with Registry.open(tmp_path / "tardos") as reg:
        names = [s.customer for s in trace(merged, reg).accused]
    assert names == [f"customer-{j:05d}" for j in outcome.accused]
    assert set(outcome.accused) <= {2, 9} and len(outcome.accused) >= 1
    scheme.close()


def test_shared_scheme_refuses_an_existing_registry(base, tmp_path):
    make_scheme("random", _cfg(), base, tmp_path).close()
    with pytest.raises(RuntimeError, match="already holds a registry"):
        make_scheme("random", _cfg(), base, tmp_path)
