"""Every way a suspect can fail to be aligned ends in a report that says so ("aligned": false, the reason in
its status) or in NotAligned (exit 3), never in a clean verdict: a rewritten copy read unaligned would be a
silent "nobody"."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from securemark import corpus, data
from securemark.attacks import rewrite as R
from securemark.fingerprint.arch import Arch
from securemark.fingerprint.graph import derive
from securemark.fingerprint.groups import Member, UnitGroup
from securemark.owner import issue_copy
from securemark.registry import Registry, RegistryParams
from securemark.tracing.tracer import NotAligned, Tracer

ARCH = Arch("securemark.corpus.resnet:resnet8", {"width": 8}, (1, 3, 32, 32))


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A ResNet-8 (not a chain) with real BatchNorm statistics, a registry made without its architecture, four
    customers, and c2's copy permuted, rescaled and sign-flipped."""
    torch.manual_seed(0)
    model = corpus.build("resnet8", width=8)
    model.train()
    with torch.no_grad():
        model(data.digits_rgb().x[:128])
    base = {k: v.detach().clone() for k, v in model.eval().state_dict().items()}
    reg = Registry.init(tmp_path_factory.mktemp("reg") / "r", RegistryParams(length=512, max_colluders=3))
    copies = {f"c{i}": issue_copy(reg, base, f"c{i}") for i in range(4)}
    groups = derive(model, torch.zeros(1, 3, 32, 32)).groups
    rng = np.random.default_rng(3)
    leaked = R.permute(R.signflip(R.rescale(copies["c2"], rng, groups=groups)[0], rng, groups=groups)[0], rng,
                       groups=groups)[0]  # fmt: skip
    yield reg, base, leaked, groups
    reg.close()


def test_no_unit_groups_reads_unaligned_and_says_why(setting):
    reg, _, leaked, _ = setting
    report = Tracer(reg).trace(leaked)
    assert not report.aligned and report.to_json()["aligned"] is False
    assert "not a sequential chain" in str(report.alignment["status"])


def test_groups_that_leave_a_weight_out_are_not_used(setting):
    reg, _, leaked, groups = setting
    partial = [g for g in groups if g.name != "conv1"]  # the first stage's stream left out
    report = Tracer(reg, partial).trace(leaked)
    assert not report.aligned and "no unit group covers 'conv1.weight'" in str(report.alignment["status"])


def test_a_suspect_no_group_explains_is_read_as_it_is_or_refused(setting):
    reg, base, leaked, groups = setting
    tracer = Tracer(reg, groups)
    readerless = [UnitGroup("g", (Member("fc.weight", "rows"), Member("fc.bias", "bias"))), *groups]
    report = Tracer(reg, readerless).trace(base)  # a group nothing reads (the classes, here) aligns without a fit
    assert report.aligned and report.accused == []
    more_classes = dict(leaked) | {"fc.weight": torch.zeros(11, leaked["fc.weight"].shape[1])}
    with pytest.raises(NotAligned, match=r"fc\.weight"):
        tracer.trace(more_classes)


def test_the_architecture_at_trace_time_aligns_and_catches(setting):
    reg, _, leaked, _ = setting
    report = Tracer(reg, arch=ARCH).trace(leaked)
    assert report.aligned and [s.customer for s in report.accused] == ["c2"]
    assert report.alignment["permuted"] > 0 and report.alignment["flipped"] > 0


def test_a_malformed_architecture_record_reads_unaligned_with_the_reason(tmp_path):
    from securemark.models import build

    base = {k: v.clone() for k, v in build("cnn", (1, 8, 8), 10).state_dict().items()}
    with Registry.init(tmp_path / "r", RegistryParams(length=256, max_colluders=3)) as reg:
        copy = issue_copy(reg, base, "c0")
        reg.set_arch({"target": "x:y", "graph": "0" * 64, "groups": "not a list"})  # as a damaged file reads
        report = Tracer(reg).trace(copy)
    assert not report.aligned and "architecture record is malformed" in str(report.alignment["status"])
