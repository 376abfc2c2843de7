"""examples/flower-resnet: a user's Flower app with a BatchNorm ResNet-8 (written as torchvision writes it), run in
process with securemark's lines; its run then evaluated under collusion by `securemark evaluate --run --data`,
the model rebuilt from the architecture the app registered."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flwr.app import Context, RecordDict

from securemark.cli import main
from securemark.evaluation.stats import meets_target

from .inprocess import InProcessGrid
from .test_deployment import traced

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "flower-resnet"
sys.path.insert(0, str(EXAMPLE))

from resnetexample import client_app, server_app, task  # noqa: E402


def test_the_resnet_app_trains_masked_unclipped_and_its_run_is_evaluated(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the app saves final_model.pt where it runs
    out = tmp_path / "run"
    config = {"num-server-rounds": 3, "fraction-evaluate": 0.5, "local-epochs": 2, "lr": 0.05, "out": str(out)}
    grid = InProcessGrid(3, app=client_app.app, run_config=config)
    server_app.main(grid, Context(4242, 0, {}, RecordDict(), config))  # the app's own ServerApp function
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [m["status"] for m in rounds] == ["completed"] * 3
    # every BatchNorm statistic within its tensor's range (one range for all clipped the stem's statistics and left
    # such runs at chance): a share under 1e-5 in every round (one value of 237k, 4e-6, in round 2 once in ~20 runs;
    # its range then widens), said on the round line
    assert all(m["clipped_share"] < 1e-5 and m["survived"] == 3 and m["max_bit_error"] == 0.0 for m in rounds), rounds
    assert rounds[-1]["global_accuracy"] > 0.5  # chance is 0.1; 0.80-0.94 after 3 rounds in 8 runs (fresh secrets)
    for name in ("client-000", "client-002"):
        assert traced(out / "registry", out / "customers" / f"{name}.safetensors", capsys) == [name]

    task.save_held_out(str(tmp_path / "heldout.npz"))
    sets = ['evaluate.schemes=["tardos"]', "evaluate.trials=2", "fidelity.budgets=[]", "evaluate.customers=20"]
    argv = ["evaluate", str(ROOT / "configs" / "collusion-smoke.toml"), "--run", str(out), "--data",
            str(tmp_path / "heldout.npz"), "--out", str(tmp_path / "eval")]  # fmt: skip
    assert main([*argv, *(x for s in sets for x in ("--set", s))]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["source"]["model"] == "the app's registered architecture"
    cells = {(c["attack"], c["coalition_size"]): c for c in results["cells"]}
    assert set(cells) == {("launder", 0), ("launder", 1), ("average", 3), ("median-finetune", 3)}
    assert all(c["trials"] == 2 for c in cells.values())
    assert cells["launder", 0]["innocents_accused"] == 0 and meets_target(cells["launder", 0])  # the control
    assert "launder" in (tmp_path / "eval" / "report.md").read_text()


def test_stripping_securemark_leaves_a_plain_flower_app(tmp_path):
    from .test_example import strip_securemark

    plain = strip_securemark(EXAMPLE, tmp_path / "plain")
    tagged = sum("# securemark" in line for py in EXAMPLE.rglob("*.py") for line in py.read_text().splitlines())
    assert tagged == 5  # the mod and its import; the strategy wrapped, its import and its output folder
    for py in plain.rglob("*.py"):
        code = py.read_text()
        assert "import securemark" not in code and "from securemark" not in code
        compile(code, str(py), "exec")
