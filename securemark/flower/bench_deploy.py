"""``securemark bench deploy``: a real deployment on loopback, plain FedAvg against masked rounds.

One SuperLink and N SuperNodes (``flower-supernode``, the default subprocess isolation: a fresh ClientApp
process per message) on 127.0.0.1, then three ``flwr run``s of the shipped apps on digits: plain (fingerprint
and masking off), masked, and masked with one SuperNode killed (SIGKILL, its whole process group) once the
first round is done. Per-round seconds and the server's per-stage seconds come from each run's metrics.json.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from securemark.flower.processes import BIN, Processes, flower_env, free_port, wait_for_port

RUN_DEADLINE_S = 900


def bench_deploy(app: Path, nodes: int = 4, rounds: int = 3, grace: float = 10.0) -> dict[str, Any]:
    if nodes < 3 or rounds < 2:
        raise ValueError("need nodes >= 3 (a masked round needs a majority) and rounds >= 2")
    if not (Path(app) / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{app} is not a Flower app directory (no pyproject.toml)")
    with tempfile.TemporaryDirectory(prefix="securemark-deploy-") as tmp:
        work = Path(tmp)
        home = work / "flwr-home"
        home.mkdir()
        link = free_port()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
        )
        procs = Processes(flower_env(home), work, work / "logs")
        try:
            procs.start("superlink", "flower-superlink", "--insecure", "--port", str(link))
            wait_for_port(link, 60)
            node = ("flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port")
            supernodes = []
            for i in range(nodes):
                where = f"partition-id={i} num-partitions={nodes}"
                supernodes.append(procs.start(f"supernode-{i}", *node, str(free_port()), "--node-config", where))
            common = (
                f'data.name="digits" train.rounds={rounds} train.clients={nodes} train.per_round={nodes} '
                f"fingerprint.length=256 fingerprint.max_colluders=2 secagg.grace={grace}"
            )
            runs = {
                "plain": _run(procs, app, work / "plain", common + " fingerprint.enabled=false secagg.enabled=false"),
                "masked": _run(procs, app, work / "masked", common),
            }
            runs["masked_one_killed"] = _run(procs, app, work / "killed", common, kill=supernodes[0])
        finally:
            procs.stop()
    plain, masked = runs["plain"]["median_seconds"], runs["masked"]["median_seconds"]
    return {
        "nodes": nodes,
        "rounds": rounds,
        "grace_seconds": grace,
        "isolation": "subprocess (flower-supernode default)",
        "plain_seconds": plain,
        "masked_seconds": masked,
        "masked_over_plain": round(masked / plain, 3),
        "runs": runs,
    }


def _run(procs: Processes, app: Path, out: Path, overrides: str, kill: subprocess.Popen | None = None) -> dict:
    cmd = [str(BIN / "flwr"), "run", str(Path(app).resolve()), "--stream", "-c", f'output="{out}" {overrides}']
    log = (procs.logs / f"flwr-run-{out.name}.log").open("w")
    proc = subprocess.Popen(cmd, env=procs.env, cwd=procs.cwd, stdout=log, stderr=subprocess.STDOUT)
    killed_after = None
    end = time.monotonic() + RUN_DEADLINE_S
    while proc.poll() is None and time.monotonic() < end:
        if kill is not None and killed_after is None and _rounds_done(out) >= 1:
            os.killpg(kill.pid, signal.SIGKILL)
            kill.wait()
            killed_after = 1
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
        raise TimeoutError(f"flwr run did not finish in {RUN_DEADLINE_S} s; log: {log.name}")
    rounds = json.loads((out / "metrics.json").read_text())["rounds"] if (out / "metrics.json").is_file() else []
    if proc.returncode != 0 or not rounds:
        raise RuntimeError(f"flwr run failed (exit {proc.returncode}):\n{(procs.logs / log.name).read_text()[-3000:]}")
    seconds = [m["seconds"] for m in rounds]
    return {
        "per_round_seconds": seconds,
        "median_seconds": statistics.median(seconds[1:]),  # round 1 also sets up (keys, identities, imports)
        "status": [m["status"] for m in rounds],
        "survived": [m.get("survived") for m in rounds],
        "stage_seconds": [m.get("stage_seconds") for m in rounds],
        "killed_after_round": killed_after,
    }


def _rounds_done(out: Path) -> int:
    try:
        return len(json.loads((out / "metrics.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0
