import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from securemark.config import ConfigError, SimConfig, _toml_value, valid_ray_address
from securemark.evaluation.config import EvalConfig

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        is_evaluation = "evaluate" in tomllib.loads(path.read_text())
        (EvalConfig if is_evaluation else SimConfig).load(path)


def test_overrides_flat_round_trip_and_toml_round_trip(tmp_path):
    cfg = SimConfig.load(
        ROOT / "configs" / "smoke.toml", ["train.rounds=5", "secagg.graph=sparse", "data.name=mnist5k"]
    )
    assert cfg.train.rounds == 5 and cfg.secagg.graph == "sparse" and cfg.data.name == "mnist5k"
    assert SimConfig.from_flat(cfg.to_flat()) == cfg
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    assert SimConfig.load(tmp_path / "c.toml") == cfg


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"roundz": 3}}, "unknown key train.roundz"),
        ({"bogus": {}}, "unknown configuration section or key 'bogus'"),
        ({"train": {"rounds": "three"}}, "train.rounds must be of type int"),
        ({"train": {"rounds": 0}}, "train.rounds"),
        ({"train": {"clients": 4, "per_round": 5}}, "train.per_round"),
        ({"secagg": {"dropout": 1.5}}, "secagg.dropout"),
        ({"data": {"partition": "weird"}}, "data.partition"),
        ({"fingerprint": {"enabled": "yes"}}, "fingerprint.enabled must be of type bool"),
    ],
)
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        SimConfig.from_dict(raw)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        SimConfig.load(tmp_path / "none.toml")
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        SimConfig.load(ROOT / "configs" / "smoke.toml", ["train.rounds"])


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"fingerprint": {"length": -5}}, "fingerprint.length"),
        ({"fingerprint": {"eps": 2.0}}, "fingerprint.eps"),
        ({"fingerprint": {"eps": float("nan")}}, "fingerprint.eps"),
        ({"fingerprint": {"max_colluders": 0}}, "fingerprint.max_colluders"),
        ({"fingerprint": {"budget": -1.0}}, "fingerprint.budget"),
        ({"fingerprint": {"budget": float("inf")}}, "fingerprint.budget"),
        ({"fingerprint": {"code": "foo"}}, "fingerprint.code"),
        ({"fingerprint": {"eval_copies": -1}}, "fingerprint.eval_copies"),
        ({"secagg": {"clip": -1.0}}, "secagg.clip"),
        ({"secagg": {"clip": float("nan")}}, "secagg.clip"),
        ({"secagg": {"bits": 0}}, "secagg.bits"),
        ({"secagg": {"bits": 64}}, "secagg.bits"),
        ({"secagg": {"timeout": -1.0}}, "secagg.timeout"),
        ({"secagg": {"dropout": float("nan")}}, "secagg.dropout"),
        ({"secagg": {"threat": "byzantine"}}, "secagg.threat"),
        ({"secagg": {"threat": "malicious", "enabled": False}}, "secagg.threat"),
        ({"secagg": {"roster": "r.json"}}, "secagg.roster"),
        ({"secagg": {"signers": 0.6}}, "secagg.signers"),
        ({"secagg": {"threat": "malicious", "graph": "sparse"}}, "secagg.threat"),
        ({"secagg": {"signers": 1.5}}, "secagg.signers"),
        ({"data": {"alpha": -1.0}}, "data.alpha"),
        ({"data": {"classes_per_client": 0}}, "data.classes_per_client"),
        ({"data": {"test_fraction": float("nan")}}, "data.test_fraction"),
        ({"train": {"clients": 10**9}}, "train.clients"),
        ({"train": {"lr": float("inf")}}, "train.lr"),
        ({"train": {"lr": 0.0}}, "train.lr"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"local_epochs": 0}}, "train.local_epochs"),
        ({"train": {"seed": -1}}, "train.seed"),
        ({"model": {"width": -3}}, "model.width"),
        ({"resources": {"num_cpus": float("nan")}}, "resources.num_cpus"),
        ({"resources": {"num_gpus": -0.5}}, "resources.num_gpus"),
        ({"output": ""}, "output"),
    ],
)
def test_every_value_is_range_checked(raw, key):
    with pytest.raises(ConfigError, match="invalid value for " + re.escape(key)):
        SimConfig.from_dict(raw)


def test_relative_paths_in_a_file_follow_the_file_not_the_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "c.toml").write_text('output = "../runs/x"\n[data]\nname = "mnist"\nfiles = "parquet/*.parquet"\n')
    monkeypatch.chdir(tmp_path / "..")
    cfg = SimConfig.load(folder / "c.toml")
    assert Path(cfg.output) == tmp_path / "runs" / "x"
    assert Path(cfg.data.files) == folder / "parquet" / "*.parquet"
    # what the user types (--set, Flower's run config) is theirs: the working directory's
    assert SimConfig.load(folder / "c.toml", ["output=elsewhere"]).output == "elsewhere"
    assert SimConfig.from_flat({"output": "rel"}).output == "rel"
    absolute = str(tmp_path / "abs")
    assert SimConfig.load(folder / "c.toml", [f'output="{absolute}"']).output == absolute


def test_a_shipped_evaluation_config_means_the_same_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = EvalConfig.load(ROOT / "configs" / "collusion-smoke.toml")
    assert Path(cfg.source.run) == ROOT / "runs" / "smoke"
    assert Path(cfg.source.config) == ROOT / "configs" / "smoke.toml"
    assert Path(cfg.output) == ROOT / "runs" / "collusion-smoke"
    assert Path(SimConfig.load(ROOT / "configs" / "quickstart.toml").output) == ROOT / "runs" / "quickstart"


def test_a_config_written_into_a_folder_names_its_paths_from_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = SimConfig.load(ROOT / "configs" / "smoke.toml", ["data.files=local/*.parquet"])
    run = tmp_path / "deep" / "run"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(cfg.to_toml(run))
    text = (run / "config.toml").read_text()
    assert 'files = "../../local/*.parquet"' in text and str(tmp_path) not in text.replace(str(ROOT), "")
    monkeypatch.chdir(ROOT)
    back = SimConfig.load(run / "config.toml")
    assert Path(back.data.files) == tmp_path / "local" / "*.parquet" and Path(back.output) == Path(cfg.output)


@given(st.text())
def test_any_string_survives_a_toml_round_trip(text):
    assert tomllib.loads("v = " + _toml_value(text))["v"] == text


@pytest.mark.parametrize(
    ("address", "ok"),
    [("", True), ("auto", True), ("127.0.0.1:6379", True), ("ray://head.lan:10001", True), ("[::1]:6379", True),
     ("host:99999", False), ("::1", False), ("local", False), ("http://x:1", False), ("ray://x", False)],
)  # fmt: skip
def test_ray_addresses(address, ok):
    assert valid_ray_address(address) is ok


@pytest.mark.parametrize("path", ["   ", "a\x00b", "line\nbreak"])
def test_blank_or_control_character_paths_are_refused(path):
    with pytest.raises(ConfigError, match="invalid value for output"):
        SimConfig.from_dict({"output": path})
