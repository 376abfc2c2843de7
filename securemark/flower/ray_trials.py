"""Evaluation trials on Ray: ``securemark evaluate CONFIG --ray [local | auto | ray://host:port]``.

One actor per CPU of the cluster. What every trial shares (the base model, the pirate's data and the test set,
the config) reaches each actor once, through Ray's object store; each scheme reaches it once too, and the actor
rebuilds it (registry, tracer) before its first trial. Then a task ships only trial keys (attack, coalition
size, index), a few at a time, to whichever actor is free. A trial's randomness is seeded by its key
(:func:`securemark.evaluation.harness.trial`), so the records are those of the serial run, trial by trial: the
same coalitions, attacks and verdicts, scores equal to float rounding (torch sums in an order that depends on
its thread count, one per actor here).

A scheme travels as its registry's files, owner key included: an evaluation's registries are throwaway ones
(made fresh for the run) and the actors are the owner's own. Each actor writes the copy to a temp folder, builds
the scheme from it and deletes it before its first trial, so only a worker killed in that moment leaves one.
Do not point ``--ray`` at a cluster you would not give that key to. (This module sits in securemark/flower/
because that layer is the one place that imports ray and flwr.)
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayTaskError
from ray.util import ActorPool

from securemark.evaluation.config import EvalConfig
from securemark.evaluation.harness import Runner, Setting, TrialKey, trial
from securemark.evaluation.schemes import Scheme, SharedScheme
from securemark.registry import Registry

TRIALS_PER_TASK = 4  # a trial takes 0.1-1 s here: enough to hide a call's overhead, small enough to balance


@ray.remote(num_cpus=1)
class TrialActor:
    def __init__(self, setting: Setting, cfg: EvalConfig) -> None:
        torch.set_num_threads(1)  # one actor per core: intra-op threads would only contend
        self.setting, self.cfg = setting, cfg
        self.scheme: Scheme | None = None

    def load(self, item: tuple[str, Any]) -> None:
        """Hold the scheme packed by :func:`_payload` in place of the previous one. A registry copy is on
        disk only while the scheme is built: the scheme's tracer and fingerprinter read the registry once, into
        memory, so the files (owner key included) are deleted before any trial runs, and a worker killed
        mid-run leaves none behind."""
        self.close()
        kind, payload = item
        if kind != "registry":
            self.scheme = payload
            return
        folder = Path(tempfile.mkdtemp(prefix="securemark-trials-"))
        try:
            self.scheme = SharedScheme(Registry.from_files(folder / "registry", payload), self.setting.base)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def run(self, keys: list[TrialKey]) -> list[dict[str, Any]]:
        assert self.scheme is not None, "load a scheme first"
        return [trial(self.scheme, key, self.setting, self.cfg) for key in keys]

    def close(self) -> None:
        if self.scheme is not None:
            self.scheme.close()
        self.scheme = None


def _payload(scheme: Scheme) -> tuple[str, Any]:
    if isinstance(scheme, SharedScheme):
        return "registry", scheme.registry.files()
    return "object", scheme  # the FedTracker baseline: arrays in memory, nothing on disk


def connect(address: str) -> bool:
    """Join Ray at ``address`` (``local`` starts it on this machine's cores); True when this call started it."""
    if ray.is_initialized():
        return False
    check_reachable(address)
    # "local" always starts a private instance (no address would join RAY_ADDRESS or the last `ray start`)
    ray.init(address=address, log_to_driver=False, include_dashboard=False)
    return True


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """A host:port address must accept a connection within ``timeout`` (ray.init would wait for minutes)."""
    if address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"no Ray cluster answers at {address} ({exc})") from None


@contextmanager
def ray_runner(address: str, setting: Setting, cfg: EvalConfig) -> Iterator[Runner]:
    started = connect(address)
    actors: list[Any] = []
    try:
        cpus = max(1, int(ray.available_resources().get("CPU", 1)))  # a shared cluster: what is free now
        shared = [ray.put(setting), ray.put(cfg)]
        actors = [TrialActor.remote(*shared) for _ in range(cpus)]
        pool = ActorPool(actors)

        def run(scheme: Scheme, keys: list[TrialKey], done: Callable[[dict[str, Any]], None]) -> None:
            payload = ray.put(_payload(scheme))
            ray.get([a.load.remote(payload) for a in actors])
            chunks = [keys[i : i + TRIALS_PER_TASK] for i in range(0, len(keys), TRIALS_PER_TASK)]
            try:
                for records in pool.map_unordered(lambda actor, chunk: actor.run.remote(chunk), chunks):
                    for record in records:
                        done(record)
            except RayTaskError as exc:  # one line, not Ray's framed remote traceback
                raise RuntimeError(f"a trial failed on a Ray actor: {exc.cause!r}") from None

        yield run
    finally:
        for a in actors:  # schemes live in actor memory only: nothing on disk to wait for
            ray.kill(a)
        if started:
            ray.shutdown()
