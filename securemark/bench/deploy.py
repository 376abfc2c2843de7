"""``securemark bench deploy``: a real deployment on loopback, plain FedAvg against masked rounds.

One SuperLink and N SuperNodes (``flower-supernode``) on 127.0.0.1, then three ``flwr run``s of the shipped
apps on digits: plain (fingerprint and masking off), masked, and masked with one SuperNode killed (SIGKILL, its
whole process group) once the first round is done; then a second SuperLink whose N SuperNodes hold a roster
(``securemark roster``) and a masked run under ``secagg.threat = "malicious"``. Per-round seconds and the
server's per-stage seconds come from each run's metrics.json.

``isolation="subprocess"`` (Flower's default): each SuperNode starts its own ``flower-superexec``, which starts
a fresh ``flwr-clientapp`` process per message. ``isolation="process"``: the SuperNodes start none, and a
long-running ``flower-superexec`` is started beside each one, as a deployment would run it in its own container.
In Flower 1.41 that SuperExec, too, starts one ``flwr-clientapp`` per message (a process holds one execution
token), so the option measures whether the separate launcher changes anything; ``clientapp_import_seconds`` is
what each of those processes spends importing the shipped ClientApp (torch included) before it can answer.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from securemark.errors import InputError, RunFailed
from securemark.flower.processes import BIN, Processes, flower_env, free_port, wait_for_port
from securemark.secagg.roster import make

RUN_DEADLINE_S = 900


ISOLATIONS = ("subprocess", "process")


def bench_deploy(
    app: Path, nodes: int = 4, rounds: int = 3, grace: float = 10.0, isolation: str = "subprocess"
) -> dict[str, Any]:
    if nodes < 3 or rounds < 2:
        raise InputError("need nodes >= 3 (a masked round needs a majority) and rounds >= 2")
    if isolation not in ISOLATIONS:
        raise InputError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if not (Path(app) / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{app} is not a Flower app directory (no pyproject.toml)")
    with tempfile.TemporaryDirectory(prefix="securemark-deploy-") as tmp:
        work = Path(tmp)
        home = work / "flwr-home"
        home.mkdir()
        links = {"bench": free_port(), "signed": free_port()}
        (home / "config.toml").write_text('[superlink]\ndefault = "bench"\n' + "".join(
            f'\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n' for name, port in links.items()
        ))  # fmt: skip
        procs = Processes(flower_env(home), work, work / "logs")
        previous = signal.signal(signal.SIGTERM, _terminate)  # a bench that is killed still stops what it started
        try:
            supernodes = _federation(procs, "bench", links["bench"], nodes, isolation, lambda i: "")
            common = (
                f'data.name="digits" train.rounds={rounds} train.clients={nodes} train.per_round={nodes} '
                f"fingerprint.length=256 fingerprint.max_colluders=2 secagg.grace={grace} "
                'fingerprint.identity="partition-id"'  # an --insecure SuperLink: anyone can claim a partition id
            )
            runs = {
                "plain": _run(procs, app, work / "plain", common + " fingerprint.enabled=false secagg.enabled=false"),
                "masked": _run(procs, app, work / "masked", common),
            }
            runs["masked_one_killed"] = _run(procs, app, work / "killed", common, kill=supernodes[0])
            # the malicious threat: nodes that hold the owner's roster (they refuse unsigned rounds: a federation
            # of their own)
            folder = work / "roster"
            make([f"node-{i}" for i in range(nodes)], folder)
            _federation(procs, "signed", links["signed"], nodes, isolation,
                        lambda i: f" securemark-roster='{folder / 'roster.json'}' "
                                  f"securemark-signing-key='{folder / f'node-{i}.key'}'")  # fmt: skip
            signed = f' secagg.threat="malicious" secagg.roster="{folder / "roster.json"}"'
            runs["malicious"] = _run(procs, app, work / "malicious", common + signed, superlink="signed")
        finally:
            procs.stop()
            signal.signal(signal.SIGTERM, previous)
    plain, masked = runs["plain"]["median_seconds"], runs["masked"]["median_seconds"]
    return {
        "nodes": nodes,
        "rounds": rounds,
        "grace_seconds": grace,
        "isolation": isolation,
        "clientapp_import_seconds": _import_seconds(),
        "plain_seconds": plain,
        "masked_seconds": masked,
        "masked_over_plain": round(masked / plain, 3),
        "malicious_seconds": runs["malicious"]["median_seconds"],
        "malicious_over_plain": round(runs["malicious"]["median_seconds"] / plain, 3),
        "runs": runs,
    }


def _federation(
    procs: Processes, name: str, link: int, nodes: int, isolation: str, extra: Callable[[int], str]
) -> list[subprocess.Popen]:
    """A SuperLink on ``link`` and ``nodes`` SuperNodes (node ``i``'s config: its partition, then ``extra(i)``)."""
    procs.start(f"superlink-{name}", "flower-superlink", "--insecure", "--port", str(link))
    wait_for_port(link, 60)
    node = ("flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--isolation", isolation)
    supernodes = []
    for i in range(nodes):
        where, port = f"partition-id={i} num-partitions={nodes}{extra(i)}", free_port()
        supernodes.append(procs.start(f"supernode-{name}-{i}", *node, "--port", str(port), "--node-config", where))
        if isolation == "process":  # the launcher a deployment runs beside each SuperNode
            wait_for_port(port, 60)
            procs.start(f"superexec-{name}-{i}", "flower-superexec", "--insecure", "--runtime-api-address",
                        f"127.0.0.1:{port}", "--parent-pid", str(supernodes[-1].pid))  # fmt: skip
    return supernodes


def _run(
    procs: Processes, app: Path, out: Path, overrides: str, kill: subprocess.Popen | None = None,
    superlink: str = "bench",
) -> dict:  # fmt: skip
    cmd = [str(BIN / "flwr"), "run", str(Path(app).resolve()), superlink, "--stream", "-c",
           f'output="{out}" {overrides}']  # fmt: skip
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
        raise RunFailed(f"flwr run failed (exit {proc.returncode}):\n{(procs.logs / log.name).read_text()[-3000:]}")
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


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _import_seconds(repeats: int = 3) -> float:
    """Median wall seconds of a fresh interpreter importing the shipped ClientApp: what every per-message
    ``flwr-clientapp`` process pays before it can answer."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import securemark.flower.client_app"], check=True)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 2)
