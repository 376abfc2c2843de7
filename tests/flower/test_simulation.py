"""The one full simulation in the suite: configs/smoke.toml on Flower's Ray engine; then tracing a copy, a
laundered leak, and configs/collusion-smoke.toml's evaluation, all on that run's output."""

import csv
import json
import warnings
from pathlib import Path

import matplotlib.image
import pytest
import torch
from numpy.random import default_rng as rng

from securemark import models
from securemark.bench.simulate import _early_traced, _traced
from securemark.cli import main
from securemark.config import SimConfig
from securemark.evaluation.config import EvalConfig
from securemark.evaluation.harness import evaluate, plan
from securemark.evaluation.outputs import rewrite
from securemark.modelio import load_state_dict
from securemark.quickstart import leak_and_trace
from securemark.registry import Registry
from securemark.sim import simulate

ROOT = Path(__file__).resolve().parents[2]


def _function_record(out: Path) -> dict:
    with Registry.open(out / "registry") as reg:
        record = reg.function_mark(reg.base().digest)
    assert record is not None
    return record[0]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    return out, simulate(SimConfig.load(ROOT / "configs" / "smoke.toml"), out)


def test_smoke_config_runs_on_ray_and_copies_trace_to_their_customer(smoke_run, capsys):
    out, metrics = smoke_run
    rounds = metrics["rounds"]
    assert [m["status"] for m in rounds] == ["completed", "completed"]
    assert all(m["max_bit_error"] == 0.0 and m["survived"] == 4 for m in rounds)
    assert rounds[-1]["global_accuracy"] > 0.3  # chance is 0.1
    for name in ("config.toml", "metrics.json", "global.safetensors", "report.md", "accuracy.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "customers").iterdir()) == [f"client-00{i}.safetensors" for i in range(4)]
    assert SimConfig.load(out / "config.toml") == SimConfig.load(ROOT / "configs" / "smoke.toml")  # resolved config
    capsys.readouterr()
    assert main(["trace", str(out / "registry"), str(out / "customers" / "client-002.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accused"] == ["client-002"]
    # the copies carry the black-box mark too: read from each round's issued copies, and through outputs only
    # (1 for the function mark alone, ~0 without it; the white-box mark's feature noise takes it to 0.69-0.97 in
    # 16 smoke runs with fresh secrets); round 1's copies, of the untrained initial model, carry the white-box
    # mark alone (fingerprint.function_initial)
    assert "min_function_cosine" not in rounds[0] and rounds[1]["min_function_cosine"] > 0.5
    module = models.build_spec(_function_record(out)["model"])
    models.load_weights(module, load_state_dict(out / "customers" / "client-002.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module.eval()), str(out / "client-002.torchscript.pt"))
    argv = ["trace", str(out / "registry"), "--query-model", str(out / "client-002.torchscript.pt"), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["accused"] == ["client-002"]
    traced = _traced(out)  # bench simulate's checks
    assert traced["copies_issued"] == traced["copies_naming_their_customer_alone"] == 4
    early = _early_traced(out)  # round 1's copies, made from the initial model, against every round's model
    assert early["bases_kept"] == 3 and early["first_round_copies_alone_every_base"] == 4

    # the quickstart's second half on this run: a laundered leak (fine-tune, prune, int8) names its customer
    leaker, steps, accuracy, traced = leak_and_trace(SimConfig.load(ROOT / "configs" / "smoke.toml"), out, rng(1))
    assert [s["attack"] for s in steps] == ["finetune", "prune", "quantize"]
    assert [s.customer for s in traced.accused] == [leaker]
    assert (out / "leaked.safetensors").is_file() and accuracy["leaked"] > 0.3


def test_collusion_smoke_evaluation_writes_results_report_and_plots(smoke_run, tmp_path, monkeypatch):
    """`securemark evaluate configs/collusion-smoke.toml --out DIR`, from another working directory (a config's
    relative paths are read from its own folder), on the smoke run."""
    run, _ = smoke_run
    overrides = [f'source.run="{run}"']
    cfg = EvalConfig.load(ROOT / "configs" / "collusion-smoke.toml", overrides)
    monkeypatch.chdir(tmp_path)
    argv = ["evaluate", str(ROOT / "configs" / "collusion-smoke.toml"), "--out", str(tmp_path / "eval")]
    assert main([*argv, "--set", overrides[0]]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    cells = {(c["scheme"], c["attack"], c["coalition_size"]): c for c in results["cells"]}
    assert list(cells) == plan(cfg) and all(c["trials"] == 4 for c in cells.values())

    # controls, the laundered unmarked base: the Gaussian-threshold tracers accuse nobody; the baselines have no
    # false-accusation bound (argmax always names someone; BIBD's detector reads laundering noise as marks)
    for scheme in ("tardos", "random"):
        assert cells[(scheme, "launder", 0)]["innocents_accused"] == 0
    assert cells[("fedtracker", "launder", 0)]["trials_with_innocent"] == 4
    assert cells[("bibd", "launder", 0)]["trials_with_innocent"] > 0
    # a single laundered copy is traced to its customer alone; an average of three without laundering too
    for scheme in ("tardos", "random"):
        assert cells[(scheme, "launder", 1)]["catch_rate"] == 1.0
    tardos_avg = cells[("tardos", "average", 3)]
    assert tardos_avg["catch_rate"] == 1.0 and tardos_avg["innocents_accused"] == 0
    assert tardos_avg["survival"] == pytest.approx(1.0, abs=1e-3)  # linear merge: the mean row, intact
    assert cells[("bibd", "average", 3)]["customers"] == 13  # PG(2, 3)
    for f in results["fidelity"].values():
        assert abs(f["drop_pp"]) < 5.0  # digits CNN, 5 copies: a loose sanity bound, the real one is in #5's note

    out = tmp_path / "eval"
    saved = json.loads((out / "results.json").read_text())  # strict JSON: NaN written as null
    assert len(saved["cells"]) == len(cells) and [r["budget"] for r in saved["fidelity_sweep"]] == [0.02, 0.05, 0.1]
    with (out / "results.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == len(cells)
    assert len((out / "trials.jsonl").read_text().splitlines()) == 4 * len(cells)
    report = (out / "report.md").read_text()
    for png in ("catch.png", "survival.png", "fidelity.png"):
        assert f"]({png})" in report
        height, width, _ = matplotlib.image.imread(out / png).shape  # a real, decodable PNG
        assert height > 100 and width > 100
    with pytest.raises(FileExistsError):
        evaluate(cfg, out)
    (out / "catch.png").unlink()
    rewrite(out)  # report and plots again from the saved files alone
    assert (out / "report.md").read_text() == report and (out / "catch.png").is_file()


def test_black_box_cells_alone_on_the_run(smoke_run, tmp_path):
    """An evaluation of black-box cells only (attacks = {}), on the run's global model and held-out share."""
    run, _ = smoke_run
    config = tmp_path / "bb.toml"
    config.write_text(
        f'output = "{tmp_path / "unused"}"\nattacks = {{}}\n[source]\nrun = "{run}"\n[code]\nlength = 256\n'
        'max_colluders = 3\n[evaluate]\ncustomers = 40\n[blackbox]\ntrials = 1\nstudents = ["mlp:4"]\n'
        "coalition_sizes = [2]\nepochs = 1\nqueries = 600\ncopies = 2\n"
    )
    cfg = EvalConfig.load(config)
    assert plan(cfg) == []
    with pytest.raises(ValueError, match="serves"):  # refused before any cell runs
        evaluate(EvalConfig.load(config, ["blackbox.queries=100000"]), tmp_path / "refused")
    assert not (tmp_path / "refused" / "results.json").exists()
    results = evaluate(cfg, tmp_path / "eval")
    assert results["cells"] == [] and results["fidelity"] == {}
    cells = {c["name"]: c for c in results["blackbox"]["cells"]}
    assert list(cells) == ["intact, HTTP, 2000 queries", "mlp student, soft T=4, control (unmarked teacher)",
                           "mlp student, soft T=4, c=2"]  # fmt: skip
    assert cells["intact, HTTP, 2000 queries"]["catch"] == 1.0
    assert sum(c["innocents_accused"] for c in cells.values()) == 0
    assert results["blackbox"]["innocent_tail"]["scores"] == 39 + 40 + 38
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Black-box cells" in report and "Black-box cells only" in report and "## Cells" not in report
    assert not (tmp_path / "eval" / "catch.png").exists()


def test_evaluate_without_a_source_says_how_to_make_one(tmp_path, capsys):
    config = str(ROOT / "configs" / "collusion-smoke.toml")
    args = ["evaluate", config, "--out", str(tmp_path / "e"), "--set", f"source.run={tmp_path / 'none'}"]
    assert main([*args, "--set", 'source.config=""']) == 2
    assert "holds no finished run" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_a_run_without_a_cluster_address_starts_a_private_ray_instance():
    """Ray's default joins what RAY_ADDRESS or the last `ray start` names (a dead head hangs every run)."""
    from securemark.flower.simulation import backend_config

    cfg = SimConfig.load(ROOT / "configs" / "smoke.toml")
    assert backend_config(cfg)["init_args"]["address"] == "local"
    joined = SimConfig.load(ROOT / "configs" / "smoke.toml", ['resources.ray_address="127.0.0.1:6379"'])
    assert backend_config(joined)["init_args"]["address"] == "127.0.0.1:6379"
