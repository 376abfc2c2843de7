"""A real deployment on 127.0.0.1: flower-superlink, three flower-supernode processes, `flwr run .`.

Two masked, fingerprinted rounds on digits; then a customer's final copy must trace to that customer.
Every process started here is stopped (its whole process group), also when the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from securemark.cli import main

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NODES = 3
DEADLINE_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@pytest.fixture
def deployment(tmp_path):
    """Starts the SuperLink and SuperNodes; yields (env, connection name, log dir); stops them all."""
    if shutil.which("flower-superlink", path=str(BIN)) is None:
        pytest.fail(f"flower-superlink is not installed in {BIN}")
    home, logs = tmp_path / "flwr-home", tmp_path / "logs"
    home.mkdir()
    logs.mkdir()
    link = free_port()
    connection = f'[superlink.local-test]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    (home / "config.toml").write_text('[superlink]\ndefault = "local-test"\n\n' + connection)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        log = (logs / f"{name}.log").open("w")
        procs.append(
            subprocess.Popen(
                [str(BIN / args[0]), *args[1:]], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the apps it spawns are stopped with it
            )
        )  # fmt: skip

    try:
        start("superlink", "flower-superlink", "--insecure", "--port", str(link))
        wait_for_port(link, 60)
        for i in range(NODES):
            start(
                f"supernode-{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions={NODES}",
            )  # fmt: skip
        yield env, logs
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_flwr_run_against_a_real_superlink_with_three_supernodes(deployment, tmp_path, capsys):
    env, logs = deployment
    out = tmp_path / "run"
    overrides = (
        f'output="{out}" data.name="digits" train.rounds=2 train.clients={NODES} train.per_round={NODES} '
        "fingerprint.length=256 fingerprint.max_colluders=2"
    )
    cmd = [str(BIN / "flwr"), "run", str(ROOT), "--stream", "-c", overrides]
    try:
        done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=DEADLINE_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"flwr run did not finish in {DEADLINE_S} s:\n{exc.stdout}\n{_tails(logs)}")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{_tails(logs)}"
    assert (out / "report.md").is_file(), f"the ServerApp did not finish:\n{done.stdout}\n{_tails(logs)}"

    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [m["status"] for m in rounds] == ["completed", "completed"]
    assert all(m["survived"] == NODES and m["dropped"] == 0 and m["max_bit_error"] == 0.0 for m in rounds)
    assert sorted(p.stem for p in (out / "customers").iterdir()) == [f"client-{i:03d}" for i in range(NODES)]
    capsys.readouterr()
    assert main(["trace", str(out / "registry"), str(out / "customers" / "client-001.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accused"] == ["client-001"]


def _tails(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*.log")))
