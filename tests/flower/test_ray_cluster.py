"""A Ray head started beforehand (its own process group, stopped by its id): a federation joins it through
resources.ray_address, then an evaluation runs its trials on it (--ray ADDRESS)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from securemark.cli import main
from securemark.config import SimConfig
from securemark.evaluation.config import EvalConfig
from securemark.evaluation.harness import evaluate
from securemark.flower import ray_trials
from securemark.sim import simulate

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """(address, temp dir) of a fresh Ray head; its temp dir is short (Unix socket paths) and its own."""
    port, temp = _free_port(), tempfile.mkdtemp(prefix="smray", dir="/tmp")
    cmd = [RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--block", "--include-dashboard=false",
           "--disable-usage-stats", f"--temp-dir={temp}"]  # fmt: skip
    head = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None, "ray start exited"
            time.sleep(0.5)
        else:
            pytest.fail("the Ray head did not open its port within 90 s")
        yield f"127.0.0.1:{port}", Path(temp)
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the group this test started, by its id: nothing else
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def _drivers(temp: Path) -> int:
    """Drivers that have connected to the head (one log per driver process in its session)."""
    return len(list(temp.glob("session_*/logs/python-core-driver-*")))


def test_simulation_and_evaluation_join_a_running_ray_cluster(ray_head, tmp_path):
    address, temp = ray_head
    overrides = ["train.rounds=1", f'resources.ray_address="{address}"']
    metrics = simulate(SimConfig.load(ROOT / "configs" / "smoke.toml", overrides), tmp_path / "run")
    assert metrics["rounds"][0]["status"] == "completed" and metrics["rounds"][0]["survived"] == 4
    assert _drivers(temp) >= 1  # it ran on this head, not on a private instance

    sets = [f'source.run="{tmp_path / "run"}"', 'evaluate.schemes=["tardos"]', "evaluate.trials=2",
            "fidelity.budgets=[]"]  # fmt: skip
    results = evaluate(
        EvalConfig.load(ROOT / "configs" / "collusion-smoke.toml", sets), tmp_path / "eval", ray_address=address
    )
    assert [c["trials"] for c in results["cells"]] == [2] * len(results["cells"]) and results["cells"]
    launder = next(c for c in results["cells"] if c["attack"] == "launder" and c["coalition_size"] == 1)
    assert launder["catch_rate"] == 1.0 and launder["innocents_accused"] == 0
    assert _drivers(temp) >= 2

    # the CLI starts the actors before it imports torch (prestart), and the run takes them over
    args = [
        "evaluate",
        str(ROOT / "configs" / "collusion-smoke.toml"),
        "--out",
        str(tmp_path / "cli"),
        "--ray",
        address,
    ]
    assert main([*args, *[x for s in sets for x in ("--set", s)]]) == 0
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert [(c["attack"], c["coalition_size"], c["catch_rate"]) for c in cli["cells"]] == [
        (c["attack"], c["coalition_size"], c["catch_rate"]) for c in results["cells"]
    ]
    assert not ray_trials._prestarted  # taken over, nothing left behind
