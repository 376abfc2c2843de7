import tomllib
from pathlib import Path

import pytest

from securemark.config import ConfigError, SimConfig
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
