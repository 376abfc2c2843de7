"""A ServerApp killed mid-run (SIGKILL, Ray and all) and resumed: the same registry, key, code rows and strength,
the rounds already done kept; a copy issued before the kill and the final copy both traced to their customer."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from securemark.cli import main
from securemark.fingerprint.embed import Fingerprinter
from securemark.flower.processes import BIN, flower_env
from securemark.modelio import load_state_dict, save_state_dict
from securemark.registry import Registry

ROOT = Path(__file__).resolve().parents[2]


def wait_for_round(state: Path, proc: subprocess.Popen, r: int, timeout: float = 300) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if state.is_file() and json.loads(state.read_text())["round"] >= r:
            return json.loads(state.read_text())
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    raise TimeoutError(f"no checkpoint of round {r} after {timeout} s")


def test_a_run_killed_mid_round_resumes_with_the_same_registry_and_old_copies_still_trace(tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [str(BIN / "securemark"), "simulate", str(ROOT / "configs" / "smoke.toml"), "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--set", "train.rounds=8"],
        env=flower_env(tmp_path / "home"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: Ray's processes die with it
    )
    try:
        wait_for_round(out / "checkpoint" / "state.json", proc, 1)  # killed at once: somewhere in round 2 or 3
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    done = state["round"]
    assert 1 <= done < 8 and not (out / "report.md").exists()
    key = (out / "registry" / "owner.key").read_bytes()

    # the copy client-001 received for round done + 1, made as the server made it, before the kill
    registry = Registry.open(out / "registry")
    weights = load_state_dict(out / "checkpoint" / f"round-{done}.safetensors")
    fp = Fingerprinter.create(registry.secret, registry.params.carrier, weights, registry.params.length)
    bits = registry.customer("client-001", create=False).bits
    issued = fp.embed(weights, bits, state["strength"])
    registry.close()

    assert main(["simulate", str(ROOT / "configs" / "smoke.toml"), "--resume", str(out)]) == 2  # one line, exit 2
    assert "not both" in capsys.readouterr().err
    assert main(["simulate", str(ROOT / "configs" / "smoke.toml"), "--out", str(out), "--set", "train.rounds=8"]) == 2
    assert "--resume it" in capsys.readouterr().err
    assert main(["simulate", "--resume", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["round"] for m in metrics["rounds"]] == list(range(1, 9))
    assert all(m["status"] == "completed" for m in metrics["rounds"])
    assert (out / "registry" / "owner.key").read_bytes() == key and (out / "report.md").is_file()
    assert json.loads((out / "checkpoint" / "state.json").read_text())["strength"] == state["strength"]
    # the copy issued before the kill, read with the resumed run's registry against the base it was made from,
    # gives client-001's row exactly; `securemark trace` reads it against every round's kept model and names
    # client-001 alone, as it does the final copy
    registry = Registry.open(out / "registry")
    fp = Fingerprinter.create(registry.secret, registry.params.carrier, weights, registry.params.length)
    assert ((fp.extract(issued, fp.project(weights), state["strength"]) > 0) == bits).all()
    assert (registry.customer("client-001", create=False).bits == bits).all()
    assert len(registry.bases()) == 9  # the initial model and the model after each of the 8 rounds
    registry.close()
    save_state_dict(issued, tmp_path / "early.safetensors")
    # the early copy is read against its own round's model; the final copy against the final model or round 7's:
    # two late models can differ by less than the mark's noise, and the least-energy choice between them is then
    # close to a coin toss (seen once in CI: "global model after round 7"; a known weakness of reading against
    # every round's model, which leaves the accusation as it is)
    for copy, bases in (
        (tmp_path / "early.safetensors", [f"global model after round {done}"]),
        (out / "customers" / "client-001.safetensors", ["current", "global model after round 7"]),
    ):
        capsys.readouterr()
        assert main(["trace", str(out / "registry"), str(copy), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["accused"] == ["client-001"] and report["alignment"]["base"] in bases
    capsys.readouterr()
    assert main(["simulate", "--resume", str(out)]) == 2
    assert "finished run" in capsys.readouterr().err
