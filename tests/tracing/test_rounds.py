"""A federation's registry over many rounds: a model file kept every few rounds (anchors), every round's
projection kept, suspects aligned to a few anchors and read against every base or a mixture of bases; many
suspects traced in one call."""

import json

import numpy as np
import pytest
import torch
from rich.console import Console

from securemark import attacks
from securemark.attacks import rewrite
from securemark.cli import main
from securemark.config import FingerprintConfig
from securemark.fingerprint.align import chain_groups
from securemark.flower.copies import Copies
from securemark.modelio import save_state_dict
from securemark.models import build
from securemark.owner import establish_base, mark
from securemark.registry import RegistryError
from securemark.tracing.mixture import read_bases
from securemark.tracing.tracer import MAX_ALIGNMENTS, Tracer, trace


def _drifted(base: dict, scale: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1
            else v.clone() for k, v in base.items()}  # fmt: skip


def _run(tmp_path, rounds, anchor_every, drift=0.1, customers=8, final=True):
    """A run's registry recorded the way the Flower server records it (Copies.record_base), the models kept."""
    history = [{k: v.clone() for k, v in build("cnn", (1, 8, 8), 10, seed=0).state_dict().items()}]
    for r in range(1, rounds + 1):
        history.append(_drifted(history[-1], drift, r))
    run = Copies(FingerprintConfig(length=256, max_colluders=3, anchor_every=anchor_every), None, Console(quiet=True))
    run.create(tmp_path, history[0])
    for r in range(rounds):
        run.record_base(object(), history[r], after=r)
    reg = run.registry
    if final:
        establish_base(reg, history[-1], run.strength)
    bits = {f"c{i}": reg.customer(f"c{i}").bits for i in range(customers)}

    def copy(name, r):
        return mark(run.fp, run.strength, None, history[r], bits[name])

    return reg, history, copy


def test_a_model_file_is_kept_every_few_rounds_and_every_projection(tmp_path):
    reg, _, copy = _run(tmp_path, rounds=10, anchor_every=4)
    bases = reg.bases()
    assert len(bases) == 11 and [b.kept for b in bases] == [True, False, False, False] * 2 + [True, False, True]
    assert [reg.base_model(b) is None for b in bases[:5]] == [False, True, True, True, False]
    size = reg.size()
    assert size["model_files"] == 4 and size["bases"] == 11 and size["bases_with_model"] == 4
    assert reg.rounds_since_kept() == 0  # the current base (the final model) is always kept
    files = list((tmp_path / "registry" / "bases").glob("*.safetensors"))
    assert size["model_bytes"] == sum(f.stat().st_size for f in files)
    # every copy still reads against its own round; anchors are what it is aligned to
    for r in (1, 5, 9, 10):
        report = trace(copy("c3", r), reg)
        assert [s.customer for s in report.accused] == ["c3"] and report.signal_rms < 1.05
        read = report.alignment["base"]  # its own round, or a neighbour within the mark's noise (1 in 120 here)
        assert abs((10 if read == "current" else int(str(read).rsplit(" ", 1)[1])) - r) <= 1
        assert report.alignment["alignments"] <= MAX_ALIGNMENTS
    # a kept model removed is tamper evidence; a projection-only base has no file to remove
    files[0].unlink()
    with pytest.raises(RegistryError, match="recorded as kept and is missing"):
        Tracer(reg)
    reg.close()


def test_a_resumed_run_keeps_the_rhythm_of_anchors(tmp_path):
    """Which base keeps its model is counted in the registry, so a run stopped and resumed keeps the rhythm."""
    reg, history, _ = _run(tmp_path, rounds=5, anchor_every=3, final=False)  # stopped after round 5
    assert [b.kept for b in reg.bases()] == [True, False, False, True, False]
    reg.close()
    run = Copies(FingerprintConfig(length=256, max_colluders=3, anchor_every=3), None, Console(quiet=True))
    run.reopen(tmp_path, history[0], strength=1.0)
    assert run.registry.rounds_since_kept() == 1
    for r in range(5, 9):
        run.record_base(object(), _drifted(history[-1], 0.1, 100 + r), after=r)
    assert [b.kept for b in run.registry.bases()] == [True, False, False, True, False, False, True, False, False]
    # a run that crashed inside a round records that round's model again when it resumes: nothing is written
    files = sorted((tmp_path / "registry" / "bases").iterdir())
    again = run.registry.bases()[-1]
    model = _drifted(history[-1], 0.1, 108)
    run._based = None
    assert run.record_base(object(), model, after=8) is not None
    last = run.registry.bases()[-1]
    assert sorted((tmp_path / "registry" / "bases").iterdir()) == files
    assert (last.digest, last.kept, last.label) == (again.digest, again.kept, again.label)
    assert run.registry.size()["model_files"] == run.registry.size()["bases_with_model"] == 3
    run.registry.close()


def test_an_early_copy_is_aligned_to_an_anchor_near_its_round(tmp_path):
    """The known failure: an early copy, its units permuted, aligned against a much-trained model alone matches
    units wrongly and reads with drift. Read against every base after the current anchor's alignment, the
    round it came from is found, the anchor near it aligned to, and the copy reads as intact (RMS ~1)."""
    reg, history, copy = _run(tmp_path, rounds=12, anchor_every=12, drift=0.6)
    assert [b.kept for b in reg.bases()] == [True] + [False] * 11 + [True]
    permuted, _ = rewrite.permute(copy("c2", 1), np.random.default_rng(0), chain_groups(history[0]))
    tracer = Tracer(reg)
    report = tracer.trace(permuted)
    assert [s.customer for s in report.accused] == ["c2"]
    assert report.alignment["aligned_to"] == "global model after round 0"
    assert report.alignment["base"] == "global model after round 1" and report.signal_rms < 1.05
    last = tracer._prepare_checked(permuted, len(tracer.bases) - 1)[0]  # the current model's alignment alone
    alone = read_bases(tracer._project(last), tracer._refs, tracer._strengths)
    assert np.sqrt(alone.energy / reg.params.length) > 1.5 * report.signal_rms
    reg.close()


def test_a_customer_mixing_its_own_rounds_is_caught_and_unmarked_mixtures_accuse_nobody(tmp_path):
    """Drift 0.3 a round here: read against any single base the copy carries 1.7-4.5 times the mark's RMS.
    The last mixture extrapolates past the final copy (4 x final - 3 x round 1's): outside what a bounded
    reading combines, so a rough reading tries two bases with free weights.
    Which bases the reading combines need not be the ones mixed (the bases of a run are nearly collinear),
    the reading is: the mark read back at RMS ~1."""
    reg, history, copy = _run(tmp_path, rounds=8, anchor_every=4, drift=0.3)
    rng = np.random.default_rng(1)
    for picked, weights in (([0, 8], None), ([1, 4, 7], [0.2, 0.5, 0.3]), ([2, 6], [1.4, -0.4]), ([1, 8], [-3, 4])):
        mixed, _ = attacks.mix_rounds([copy("c5", r) for r in picked], rng, weights)
        tracer = Tracer(reg)
        report = tracer.trace(mixed)
        single = read_bases(tracer._project(tracer._prepare_checked(mixed, -1)[0]), tracer._refs, tracer._strengths,
                            most=1)  # fmt: skip
        assert [s.customer for s in report.accused] == ["c5"] and report.signal_rms < 1.1
        assert "mixture" in report.alignment
        # no single base fits it: 1.49-3.6x the mixture's RMS over 30 registries (each has fresh secret keys)
        assert np.sqrt(single.energy / reg.params.length) > 1.3 * report.signal_rms
        unmarked, _ = attacks.mix_rounds([history[r] for r in picked], rng, weights)
        assert trace(unmarked, reg).accused == []
    reg.close()


def test_mix_rounds_is_the_weighted_sum_and_refuses_bad_weights():
    a = {"w": torch.ones(3), "n": torch.tensor(4)}
    b = {"w": torch.full((3,), 3.0), "n": torch.tensor(9)}
    mixed, record = attacks.mix_rounds([a, b], np.random.default_rng(0), [0.25, 0.75])
    assert torch.allclose(mixed["w"], torch.full((3,), 2.5)) and mixed["n"] == 4
    assert record == {"attack": "mix-rounds", "copies": 2, "weights": [0.25, 0.75]}
    for bad in ([0.5, 0.6], [np.nan, 1.0], [1.0]):
        with pytest.raises(ValueError, match="mix-rounds"):
            attacks.mix_rounds([a, b], np.random.default_rng(0), bad)


def test_a_registry_of_every_model_in_the_earlier_format_still_traces(tmp_path):
    """Registries written before anchors: every base's model kept, no 'kept' in the records."""
    reg, _, copy = _run(tmp_path, rounds=4, anchor_every=1)
    for key, value in reg._conn.execute("SELECT key, value FROM meta WHERE key LIKE 'base%'").fetchall():
        record = json.loads(value)
        record.pop("kept")
        reg._conn.execute("UPDATE meta SET value = ? WHERE key = ?", (json.dumps(record), key))
    assert all(b.kept is None for b in reg.bases()) and reg.size()["model_files"] == 5
    report = trace(copy("c1", 2), reg)
    assert [s.customer for s in report.accused] == ["c1"]
    assert report.alignment["base"] == "global model after round 2"
    reg.close()


def test_many_suspects_in_one_call(tmp_path, capsys):
    """A folder of suspects: one registry load, one JSON line each, a bad file said on its own line (exit 2)
    while the others are still traced; registry show reports the bases and the registry's size."""
    reg, _, copy = _run(tmp_path, rounds=4, anchor_every=2)
    reg.close()
    folder = tmp_path / "suspects"
    folder.mkdir()
    for name, r in (("c1", 0), ("c4", 3), ("c6", 4)):
        save_state_dict(copy(name, r), folder / f"{name}.safetensors")
    registry = str(tmp_path / "registry")
    assert main(["trace", registry, str(folder), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["suspect"].rsplit("/", 1)[1], line["accused"]) for line in lines] == [
        ("c1.safetensors", ["c1"]), ("c4.safetensors", ["c4"]), ("c6.safetensors", ["c6"])
    ]  # fmt: skip
    (folder / "broken.safetensors").write_bytes(b"not a model")
    (folder / "x\nc9.safetensors: accused: c3.safetensors").write_bytes(b"")  # a name that forges a line
    assert main(["trace", registry, str(folder)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("broken.safetensors: error: " + out[0].split(": error: ", 1)[1])
    assert [line.split(": ", 1)[1] for line in out[1:4]] == ["accused: c1", "accused: c4", "accused: c6"]
    assert len(out) == 5 and out[4].startswith(f"{folder}/x\\nc9.safetensors: accused: c3.safetensors: error")
    # one suspect: the single report as before (pretty JSON, one object)
    assert main(["trace", registry, str(folder / "c4.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accused"] == ["c4"]
    assert main(["registry", "show", registry]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["size"]["bases"] == 5 and shown["size"]["model_files"] == 3
    assert [b["model_kept"] for b in shown["bases"]] == [True, False, True, False, True]
    assert [b["model_file"] for b in shown["bases"]] == [True, False, True, False, True]
