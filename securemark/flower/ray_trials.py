"""Evaluation trials on Ray: ``securemark evaluate CONFIG --ray [local | auto | ray://host:port]``.

One actor per free CPU of the cluster but one, and the driver. What every trial shares (the base model, the
pirate's data and the test set, the config) reaches each actor once, through Ray's object store; each scheme
reaches it once too, and the actor rebuilds it (registry, tracer) before its first trial. Then calls ship only
trial keys (attack, coalition size, index), a few at a time (an actor runs its calls in order, so its scheme is
built before its trials start). Submitting returns at once: the driver builds the next scheme, measures
fidelity and runs the fidelity sweep while the actors run trials; then it runs queued trials itself and
collects the records as they come. A trial's randomness is seeded by its key
(:func:`securemark.evaluation.trials.trial`), so the records are those of the serial run, trial by trial: the
same coalitions, attacks and verdicts, scores equal to float rounding (torch sums in an order that depends on
its thread count).

A scheme travels as its registry's files, owner key included: an evaluation's registries are throwaway ones
(made fresh for the run) and the actors are the owner's own. Each actor writes the copy to a temp folder, builds
the scheme from it and deletes it before its first trial, so only a worker killed in that moment leaves one.
Do not point ``--ray`` at a cluster you would not give that key to.

Starting an actor means importing torch and securemark in a fresh worker (about 2.6 s here). This module
imports neither at the top, so ``prestart`` (called by the CLI before it imports anything heavy) can start the
actors first: they import while this process does the same, and ``ray_runner`` takes them over. (This module
sits in securemark/flower/ because that layer is the one place that imports ray and flwr.)
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from securemark.errors import RunFailed

if TYPE_CHECKING:
    from securemark.evaluation.config import EvalConfig
    from securemark.evaluation.schemes import Scheme
    from securemark.evaluation.trials import Done, Setting, TrialKey

TRIALS_PER_TASK = 4  # a trial takes 0.1-1 s here: enough to hide a call's overhead, small enough to balance
DEPTH = 2  # chunks queued on an actor at once: it has the next while the driver is busy elsewhere


@ray.remote(num_cpus=1)
class TrialActor:
    def __init__(self) -> None:
        import torch

        import securemark.evaluation.trials  # noqa: F401  (imported now, while the driver is busy)

        torch.set_num_threads(1)  # one actor per core: intra-op threads would only contend
        self.setting: Setting | None = None
        self.cfg: EvalConfig | None = None
        self.schemes: dict[str, Scheme] = {}
        self.failed: dict[str, str] = {}  # scheme -> why its load failed

    def share(self, setting: Setting, cfg: EvalConfig) -> None:
        self.setting, self.cfg = setting, cfg

    def load(self, name: str, item: tuple[str, Any]) -> None:
        """Hold the scheme packed by :func:`_payload` under ``name``. A registry copy is on disk only while
        the scheme is built: the scheme's tracer and fingerprinter read the registry once, into memory, so the
        files (owner key included) are deleted before any trial runs, and a worker killed mid-run leaves none
        behind."""
        from securemark.evaluation.schemes import SharedScheme
        from securemark.registry import Registry

        old = self.schemes.pop(name, None)  # never a stale scheme under this name, should this load fail
        if old is not None:
            old.close()
        kind, payload = item
        if kind != "registry":
            self.schemes[name] = payload
            return
        folder = Path(tempfile.mkdtemp(prefix="securemark-trials-"))
        try:
            assert self.setting is not None, "share the setting first"
            self.schemes[name] = SharedScheme(Registry.from_files(folder / "registry", payload), self.setting.base)
        except Exception as exc:  # nobody waits on a load: its trials report why it failed
            self.failed[name] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def run(self, name: str, keys: list[TrialKey]) -> list[dict[str, Any]]:
        from securemark.evaluation.trials import trial

        if name not in self.schemes:
            raise RunFailed(f"scheme {name} could not be loaded on this actor: {self.failed.get(name, 'not sent')}")
        assert self.setting is not None and self.cfg is not None, "share the setting first"
        return [trial(self.schemes[name], key, self.setting, self.cfg) for key in keys]

    def close(self) -> None:
        for scheme in self.schemes.values():
            scheme.close()
        self.schemes.clear()


def _payload(scheme: Scheme) -> tuple[str, Any]:
    from securemark.evaluation.schemes import SharedScheme

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


class RayRunner:
    """:class:`securemark.evaluation.trials.Runner` on ``actors`` and the driver itself.

    ``submit`` queues a scheme's trials in chunks and returns; each actor holds at most ``DEPTH`` chunks, so it
    always has the next one while the driver is busy building a scheme. Once every scheme is submitted,
    ``wait`` makes the driver a worker too: it runs queued chunks itself between collecting the actors'
    records, and refills each actor as it finishes. (The driver has everything imported and built already; on a
    2-core machine one actor plus the driver beat two actors, whose start costs about as much as the trials
    they would run.)"""

    def __init__(self, actors: list[Any], cfg: EvalConfig) -> None:
        self.actors, self.cfg = actors, cfg
        self.setting: Setting | None = None
        self.queue: deque[tuple[Scheme, list[TrialKey]]] = deque()
        self.running: dict[Any, int] = {}  # object ref -> actor index
        self.held = [0] * len(actors)  # chunks in flight per actor

    def share(self, setting: Setting) -> None:
        self.setting = setting
        shared = [ray.put(setting), ray.put(self.cfg)]  # through the object store once for all actors
        for actor in self.actors:
            actor.share.remote(*shared)

    def submit(self, scheme: Scheme, keys: list[TrialKey], done: Done) -> None:
        payload = ray.put(_payload(scheme))
        for actor in self.actors:
            actor.load.remote(scheme.name, payload)  # an actor runs its calls in order: loaded before its trials
        self.queue.extend((scheme, keys[i : i + TRIALS_PER_TASK]) for i in range(0, len(keys), TRIALS_PER_TASK))
        self._fill()
        self._collect(done, block=False)

    def wait(self, done: Done) -> None:
        from securemark.evaluation.trials import trial

        while self.queue or self.running:
            self._collect(done, block=not self.queue)
            if self.queue:  # the actors take chunks from the front, the driver from the back
                scheme, chunk = self.queue.pop()
                assert self.setting is not None, "share the setting first"
                for key in chunk:
                    done(trial(scheme, key, self.setting, self.cfg))

    def _fill(self) -> None:
        for i, actor in enumerate(self.actors):
            while self.queue and self.held[i] < DEPTH:
                scheme, chunk = self.queue.popleft()
                self.running[actor.run.remote(scheme.name, chunk)] = i
                self.held[i] += 1

    def _collect(self, done: Done, block: bool) -> None:
        """Hand finished chunks' records to ``done`` (waiting for one when ``block``) and refill the actors."""
        if not self.running:
            return
        n, timeout = (1, None) if block else (len(self.running), 0)
        ready, _ = ray.wait(list(self.running), num_returns=n, timeout=timeout)
        for ref in ready:
            self.held[self.running.pop(ref)] -= 1
            try:
                records = ray.get(ref)
            except RayTaskError as exc:  # one line, not Ray's framed remote traceback
                raise RunFailed(f"a trial failed on a Ray actor: {exc.cause!r}") from None
            except RayActorError as exc:
                raise RunFailed(f"a Ray actor died running trials: {exc}") from None
            for record in records:
                done(record)
        self._fill()


_prestarted: dict[str, tuple[bool, list[Any]]] = {}  # address -> (this process started Ray, actors)


def prestart(address: str) -> None:
    """Join Ray at ``address`` and start the actors now, before the caller imports torch and loads the data:
    they start (import torch) meanwhile, and :func:`ray_runner` at the same address takes them over. Actors a
    run never takes over end with this process (they are not detached)."""
    if address not in _prestarted:
        started = connect(address)
        _prestarted[address] = (started, _start_actors())


def release_prestarted() -> None:
    """End what :func:`prestart` started (before a base model is trained: training runs Ray itself)."""
    for started, actors in _prestarted.values():
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()
    _prestarted.clear()


def _start_actors() -> list[Any]:
    """One actor per free CPU but one: the driver is the other worker. None when at most one CPU is free (an
    actor that cannot be placed would hold trials forever); the driver then runs every trial itself."""
    cpus = int(ray.available_resources().get("CPU", 0))  # a shared cluster: what is free now
    return [TrialActor.remote() for _ in range(max(0, cpus - 1))]


@contextmanager
def ray_runner(address: str, cfg: EvalConfig) -> Iterator[RayRunner]:
    """Ray joined (or started) and the actors starting (or taken over from :func:`prestart`); the caller
    shares the setting, then submits."""
    import torch

    started, actors = _prestarted.pop(address, (None, []))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the driver works beside the actors: torch's spinning intra-op threads would fight them
    try:
        if started is None:
            started = connect(address)
            actors = _start_actors()
        yield RayRunner(actors, cfg)
    finally:
        for a in actors:  # schemes live in actor memory only: nothing on disk to wait for
            ray.kill(a)
        torch.set_num_threads(threads)
        if started:
            ray.shutdown()
