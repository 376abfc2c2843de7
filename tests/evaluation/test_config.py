import re
from pathlib import Path

import pytest

from securemark.config import ConfigError, SimConfig
from securemark.evaluation.config import EvalConfig
from securemark.evaluation.harness import plan

ROOT = Path(__file__).resolve().parents[2]
EVAL_CONFIGS = [ROOT / "configs" / "collusion-smoke.toml", *sorted((ROOT / "simulations" / "configs").glob("*.toml"))]


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=lambda p: p.name)
def test_shipped_evaluation_configs_load_round_trip_and_plan_cells(path, tmp_path):
    if path.name.endswith("-base.toml"):  # a simulate config that trains an evaluation's base model
        SimConfig.load(path)
        return
    cfg = EvalConfig.load(path)
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    assert EvalConfig.load(tmp_path / "c.toml") == cfg
    assert plan(cfg) or cfg.blackbox.trials > 0


def test_plan_runs_collusions_on_coalitions_and_laundering_on_single_copies():
    cfg = EvalConfig.from_dict({
        "code": {"max_colluders": 2},  # BIBD: PG(2, 2) serves 7 customers
        "evaluate": {"customers": 50, "schemes": ["tardos", "bibd"], "coalition_sizes": [0, 1, 2, 8]},
        "attacks": {"launder": "prune:ratio=0.5", "avg": "collude:average > quantize:bits=8"},
    })  # fmt: skip
    assert plan(cfg) == [
        ("tardos", "launder", 0), ("tardos", "launder", 1), ("tardos", "avg", 2), ("tardos", "avg", 8),
        ("bibd", "launder", 0), ("bibd", "launder", 1), ("bibd", "avg", 2),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"attacks": {"x": "collude:mean"}}, "attacks.x: .*method must be one of"),
        ({"attacks": {"x": "prune:ratio=half"}}, "attacks.x: .*ratio must be float"),
        ({"attacks": {}}, "attacks"),
        ({"evaluate": {"schemes": ["tardos", "deepmarks"]}}, "evaluate.schemes"),
        ({"evaluate": {"coalition_sizes": [1, 2000]}}, "evaluate.coalition_sizes"),
        ({"evaluate": {"trials": "many"}}, "evaluate.trials must be of type int"),
        ({"evaluate": {"coalition_sizes": [1, "two"]}}, r"evaluate.coalition_sizes\[1\] must be of type int"),
        ({"code": {"carrier_mode": "bn"}}, "code.carrier_mode"),
        ({"fidelity": {"attack": "shrink"}}, "fidelity.attack"),
        ({"attacks": {"x": "quantize:bits=3"}}, "attacks.x: .*bits must be 4, 8 or 16"),
        ({"attacks": {"x": "noise:std=nan"}}, "attacks.x: .*std must be finite"),
        ({"attacks": {"x": "prune:ratio=5"}}, r"attacks.x: .*ratio must be in \[0, 1\)"),
        ({"attacks": {"x": "finetune:lr=nan"}}, "attacks.x: .*lr must be finite"),
        ({"attacks": {"x": "rescale:low=4,high=2"}}, "attacks.x: .*low must be <= high"),
        ({"attacks": {"x": "collude:average,align=2"}}, "attacks.x: .*align must be 0 or 1"),
        ({"fidelity": {"budgets": [0.1]}, "evaluate": {"schemes": ["bibd"]}}, "fidelity.budgets"),
    ],
)
def test_bad_evaluation_configs_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig.from_dict(raw)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"code": {"eps": float("nan")}}, "code.eps"),
        ({"code": {"budget": float("inf")}}, "code.budget"),
        ({"code": {"length": 8}}, "code.length"),
        ({"code": {"include": []}}, "code.include"),
        ({"evaluate": {"seed": -1}}, "evaluate.seed"),
        ({"fidelity": {"copies": 0}}, "fidelity.copies"),
        ({"fidelity": {"budgets": [float("nan")]}}, "fidelity.budgets"),
        ({"source": {"run": ""}}, "source.run"),
        ({"blackbox": {"students": ["cnn:0"]}}, "blackbox.students"),
        ({"blackbox": {"students": ["rnn:4"]}}, "blackbox.students"),
        ({"blackbox": {"students": ["cnn:nan"]}}, "blackbox.students"),
        ({"blackbox": {"students": ["mlp"]}}, "blackbox.students"),
        ({"blackbox": {"students": []}}, "blackbox.students"),
        ({"blackbox": {"coalition_sizes": [0]}}, "blackbox.coalition_sizes"),
        ({"blackbox": {"coalition_sizes": [1001]}}, "blackbox.coalition_sizes"),
        ({"blackbox": {"budget": 0.0}}, "blackbox.budget"),
        ({"blackbox": {"trials": 1, "tail": -1}}, "blackbox.triggers, blackbox.tail"),
        ({"blackbox": {"copies": 0}}, "blackbox.epochs, blackbox.copies"),
        ({"blackbox": {"students": ["cnn:0.05"]}}, "blackbox.students"),
        ({"blackbox": {"coalition_sizes": [1, 1]}}, "blackbox.coalition_sizes"),
        ({"blackbox": {"coalition_sizes": []}}, "blackbox.coalition_sizes"),
        ({"blackbox": {"tail": 5}}, "blackbox.trials"),
        ({"blackbox": {"trials": -1}}, "blackbox.trials"),
        ({"attacks": {}, "blackbox": {"trials": 1}, "fidelity": {"budgets": [0.1]}}, "fidelity"),
    ],
)
def test_evaluation_values_are_range_checked(raw, key):
    with pytest.raises(ConfigError, match="invalid value for " + re.escape(key)):
        EvalConfig.from_dict(raw)


def test_black_box_defaults_bind_only_when_the_cells_run():
    """A small white-box evaluation is not refused for the black-box defaults (10 copies), nor a black-box
    one for the white-box coalition sizes it does not use."""
    assert EvalConfig.from_dict({"evaluate": {"customers": 5, "coalition_sizes": [0, 1, 2]}}).blackbox.copies == 10
    cfg = EvalConfig.from_dict({"attacks": {}, "evaluate": {"customers": 5},
                                "blackbox": {"trials": 1, "copies": 5, "coalition_sizes": [1, 2]}})  # fmt: skip
    assert cfg.evaluate.coalition_sizes == (1, 2, 4, 8) and plan(cfg) == []


def test_black_box_students_parse_and_allow_an_evaluation_without_attacks():
    cfg = EvalConfig.from_dict({"attacks": {}, "blackbox": {"trials": 2, "students": ["cnn:2.5", "mlp:hard"]}})
    assert plan(cfg) == [] and cfg.blackbox.student_cells() == [("cnn", 2.5, False), ("mlp", 1.0, True)]


def test_an_apps_run_needs_its_architecture_and_its_held_out_data(tmp_path):
    """A run with no simulate config is a user's app's: its model comes from the registry's architecture record
    and its data from source.data; either missing is named, with what to do."""
    import numpy as np

    from securemark.corpus.net import Net  # a class that builds with no arguments, as an app's own Net()
    from securemark.errors import InputError
    from securemark.evaluation.harness import app_setting
    from securemark.fingerprint.arch import record_of
    from securemark.modelio import save_state_dict
    from securemark.registry import Registry, RegistryParams

    model = Net()
    save_state_dict(model.state_dict(), tmp_path / "global.safetensors")
    with Registry.init(tmp_path / "registry", RegistryParams(length=64, max_colluders=2)):
        pass
    with pytest.raises(InputError, match=r"registry no architecture.*model=Net"):
        app_setting(tmp_path, "x.npz", 0)
    with Registry.open(tmp_path / "registry") as reg:
        reg.set_arch(record_of(model, (1, 3, 32, 32)))
    with pytest.raises(InputError, match=r"--data x\.npz"):
        app_setting(tmp_path, "", 0)
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 3, 32, 32)), z=np.zeros(4))
    with pytest.raises(InputError, match="name the inputs 'x' and the labels 'y'"):
        app_setting(tmp_path, str(tmp_path / "bad.npz"), 0)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "held.npz", x=rng.random((40, 3, 32, 32)), y=rng.integers(0, 10, 40))
    s = app_setting(tmp_path, str(tmp_path / "held.npz"), 0)
    assert len(s.pool) == len(s.test) == 20 and type(s.fresh()).__name__ == type(model).__name__
