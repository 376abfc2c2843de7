"""The one full simulation in the suite: configs/smoke.toml on Flower's Ray engine, then tracing a copy."""

import json
from pathlib import Path

from numpy.random import default_rng as rng

from securemark.cli import main
from securemark.config import SimConfig
from securemark.quickstart import leak_and_trace
from securemark.sim import simulate

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_config_runs_on_ray_and_copies_trace_to_their_customer(tmp_path, capsys):
    out = tmp_path / "run"
    metrics = simulate(SimConfig.load(ROOT / "configs" / "smoke.toml"), out)
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

    # the quickstart's second half on this run: a laundered leak (fine-tune, prune, int8) names its customer
    leaker, steps, accuracy, traced = leak_and_trace(SimConfig.load(ROOT / "configs" / "smoke.toml"), out, rng(1))
    assert [s["attack"] for s in steps] == ["finetune", "prune", "quantize"]
    assert [s.customer for s in traced.accused] == [leaker]
    assert (out / "leaked.safetensors").is_file() and accuracy["leaked"] > 0.3
