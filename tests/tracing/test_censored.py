"""Censored answers (rounding, float16, a clamp, the k largest probabilities) traced over several trained
models, not one: which model a machine trains from the same seeds depends on its floating-point paths, and a
reading that held for one model and not another once failed the suite on a fresh machine.

The margin: over 20 training seeds x 2 models (`securemark bench censored`, README "Black-box tracing") the
leaker's score stood at >= 2.1 x the certified threshold for every censoring; these tests ask for 1.5 x on
3 seeds x 2 models, and that nobody else is accused."""

import pytest

from securemark.evaluation.censored import CENSORS, Served, leak
from securemark.tracing.blackbox import BlackBoxTracer

MARGIN = 1.5


@pytest.fixture(scope="module", params=[(a, s) for a in ("cnn", "mlp") for s in (21, 22, 23)], ids=str)
def world(request, tmp_path_factory):
    """A model trained from one seed (not among the study's 0..19), its registry and c004's copy."""
    arch, seed = request.param
    reg, copy = leak(arch, seed, tmp_path_factory.mktemp("censored") / "registry")
    yield BlackBoxTracer(reg), copy
    reg.close()


@pytest.mark.parametrize("kind", list(CENSORS))
def test_censored_answers_name_the_leaker_alone_with_margin(world, kind):
    tracer, copy = world
    report = tracer.trace(Served(copy, kind), 800)
    assert [s.customer for s in report.accused] == ["c004"]
    assert report.accused[0].score >= MARGIN * report.threshold
    assert report.alignment["censored_below"] is not None  # read as censored, not by luck as something else
