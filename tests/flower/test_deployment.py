"""A real deployment on 127.0.0.1: flower-superlink, three flower-supernode processes, `flwr run`.

The shipped apps and examples/flower-pytorch each run two masked, fingerprinted rounds; final copies must trace
to their customers. Every process started here is stopped (its whole process group), also when the test fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from securemark.cli import main
from securemark.flower.processes import BIN, Processes, flower_env, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
NODES = 3
DEADLINE_S = 420


@pytest.fixture
def deployment(tmp_path):
    """Starts the SuperLink and SuperNodes; yields (env, processes); stops them all."""
    yield from _deployment(tmp_path, lambda i: "")


@pytest.fixture
def signed_deployment(tmp_path):
    """The same, each SuperNode holding the owner's roster and its own signing key (``securemark roster init``)."""
    assert main(["roster", "init", ",".join(f"node-{i}" for i in range(NODES)), "--out", str(tmp_path / "roster")]) == 0
    keys = tmp_path / "roster"
    yield from _deployment(tmp_path, lambda i: f" securemark-roster='{keys / 'roster.json'}' "
                                               f"securemark-signing-key='{keys / f'node-{i}.key'}'")  # fmt: skip


def _deployment(tmp_path, extra):
    if shutil.which("flower-superlink", path=str(BIN)) is None:
        pytest.fail(f"flower-superlink is not installed in {BIN}")
    home = tmp_path / "flwr-home"
    home.mkdir()
    link = free_port()
    connection = f'[superlink.local-test]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    (home / "config.toml").write_text('[superlink]\ndefault = "local-test"\n\n' + connection)
    procs = Processes(flower_env(home), tmp_path, tmp_path / "logs")
    try:
        procs.start("superlink", "flower-superlink", "--insecure", "--port", str(link))
        wait_for_port(link, 60)
        for i in range(NODES):
            procs.start(
                f"supernode-{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions={NODES}{extra(i)}",
            )  # fmt: skip
        yield procs
    finally:
        procs.stop()


def flwr_run(procs: Processes, app: Path, overrides: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "flwr"), "run", str(app), "--stream", "-c", overrides]
    try:
        done = subprocess.run(cmd, env=procs.env, cwd=procs.cwd, capture_output=True, text=True, timeout=DEADLINE_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"flwr run did not finish in {DEADLINE_S} s:\n{exc.stdout}\n{procs.tails()}")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{procs.tails()}"
    return done


def traced(registry: Path, copy: Path, capsys) -> list[str]:
    capsys.readouterr()
    assert main(["trace", str(registry), str(copy), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["accused"]


def test_flwr_run_against_a_real_superlink_with_three_supernodes(deployment, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = (
        f'output="{out}" data.name="digits" train.rounds=2 train.clients={NODES} train.per_round={NODES} '
        'fingerprint.length=256 fingerprint.max_colluders=2 fingerprint.identity="partition-id"'
    )  # an --insecure SuperLink: partition ids said explicitly (any node can claim one)
    done = flwr_run(deployment, ROOT, overrides)
    assert (out / "report.md").is_file(), f"the ServerApp did not finish:\n{done.stdout}\n{deployment.tails()}"
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [m["status"] for m in rounds] == ["completed", "completed"]
    assert all(m["survived"] == NODES and m["dropped"] == 0 and m["max_bit_error"] == 0.0 for m in rounds)
    assert sorted(p.stem for p in (out / "customers").iterdir()) == [f"client-{i:03d}" for i in range(NODES)]
    assert traced(out / "registry", out / "customers" / "client-001.safetensors", capsys) == ["client-001"]


def test_signed_rounds_on_real_supernodes_that_hold_the_owners_roster(signed_deployment, tmp_path, capsys):
    out, roster = tmp_path / "signed", tmp_path / "roster" / "roster.json"
    overrides = (
        f'output="{out}" data.name="digits" train.rounds=2 train.clients={NODES} train.per_round={NODES} '
        'fingerprint.length=256 fingerprint.max_colluders=2 fingerprint.identity="partition-id" '
        f'secagg.threat="malicious" secagg.roster="{roster}"'
    )
    done = flwr_run(signed_deployment, ROOT, overrides)
    assert (out / "report.md").is_file(), f"the ServerApp did not finish:\n{done.stdout}\n{signed_deployment.tails()}"
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [m["status"] for m in rounds] == ["completed", "completed"]
    assert all(m["survived"] == NODES and "sign" in m["stage_seconds"] for m in rounds)
    assert traced(out / "registry", out / "customers" / "client-002.safetensors", capsys) == ["client-002"]


def test_the_example_app_runs_masked_and_fingerprinted_on_real_supernodes(deployment, tmp_path, capsys):
    out = tmp_path / "example"
    overrides = f'out="{out}" num-server-rounds=2 identity="partition-id"'
    done = flwr_run(deployment, ROOT / "examples" / "flower-pytorch", overrides)
    assert (out / "global.safetensors").is_file(), f"{done.stdout}\n{deployment.tails()}"
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [m["status"] for m in rounds] == ["completed", "completed"]
    assert all(m["survived"] == NODES and m["max_bit_error"] == 0.0 for m in rounds)
    for i in range(NODES):
        name = f"client-{i:03d}"
        assert traced(out / "registry", out / "customers" / f"{name}.safetensors", capsys) == [name]
