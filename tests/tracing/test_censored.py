"""Censored answers (rounding, float16, a clamp, the k largest probabilities) traced over several trained
models, not one: which model a machine trains from the same seeds depends on its floating-point paths, and a
reading that held for one model and not another once failed the suite on a fresh machine.

The margin: over 20 training seeds of each of these two models (`securemark bench censored`,
docs/experiments/blackbox.md) the leaker's score stood at >= 2.17 x the certified threshold for every censoring; these
tests ask for 1.5 x on 3 other seeds x 2 models, and that nobody else is accused."""

import pytest
import torch

from securemark.bench.censored import CENSORS, Served, leak
from securemark.tracing.blackbox import BlackBoxTracer
from securemark.tracing.oracle import OracleError

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


@pytest.mark.parametrize("served", ["top1", "labels", "top1-negated"])
def test_answers_that_show_the_top_class_alone_get_no_verdict_not_nobody(world, served):
    """A top-1 answer (its probability, the rest 0), a one-hot label or its negation carry no output mark:
    the trace refuses to give a verdict (exit 2 in the CLI) instead of a clean "accused: nobody"."""
    tracer, copy = world

    class TopOnly(Served):
        @torch.no_grad()
        def __call__(self, x):
            p = torch.softmax(self.model(torch.from_numpy(x)).double(), dim=1)
            self.used += len(x)
            top = torch.zeros_like(p).scatter(1, p.argmax(dim=1, keepdim=True), 1.0)
            return {"top1": top * p, "labels": top, "top1-negated": -top}[served].numpy()

    with pytest.raises(OracleError, match="top class alone and carry no readable mark: no black-box verdict"):
        tracer.trace(TopOnly(copy, "rounded"), 800)
