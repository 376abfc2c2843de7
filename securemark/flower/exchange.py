"""Talking to nodes through a Flower Grid with deadlines: push messages as they are made, poll for replies,
stop at the deadline or a grace period after enough good replies; a frozen view of the connected nodes for an
inner strategy to sample from; a clock for a round's stages.

Nothing here knows about customers, keys or fingerprints: :mod:`securemark.flower.nodes` filters the replies.
"""

from __future__ import annotations

import math
import numbers
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from rich.console import Console
from rich.markup import escape

from securemark.errors import RoundFailed, SecureMarkError

Need = int | Callable[[set[int]], bool] | None  # good replies enough to wait only the grace: a count, or a test


def exchange(grid: Grid, msgs: Iterable[Message], timeout: float, grace: float, need: Need = None) -> list[Message]:
    """Grid.send_and_receive with deadlines: every reply, or once ``need`` good replies are in (a count, or a
    test of the nodes they came from) at most ``grace`` seconds more (a dead node costs the grace, not the
    timeout), and never past ``timeout``.

    Messages are pushed one at a time as ``msgs`` yields them: a message made while the first ones are on their
    way goes out when made. Between polls it sleeps 2% of the time waited so far (at least 1 ms, at most 50 ms)
    instead of a fixed 0.1 s (simulation) or 3 s (deployment): a reply is seen at most 2% of the wait or 50 ms
    after it came, at 20 pulls a second while waiting long. (Sleeping 1.25x longer each time, capped at 50 ms,
    saw replies up to 50 ms late: in a 0.5 s round of 10 nodes, replies arrived in bursts 50 ms apart, and the
    unmask exchange's few tens of milliseconds waited for one more poll.)"""
    pending: set[str] = set()
    for msg in msgs:
        pending.update(grid.push_messages([msg]))
    replies: list[Message] = []
    start = time.monotonic()
    end, good = start + timeout, set()
    while pending and time.monotonic() < end:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        good |= {m.metadata.src_node_id for m in got if not m.has_error()}
        if need is not None and (need(good) if callable(need) else len(good) >= need):
            end = min(end, time.monotonic() + grace)
        if pending:
            time.sleep(poll_wait(time.monotonic() - start))
    return replies


def poll_wait(waited: float) -> float:
    """Seconds to sleep before the next poll after ``waited`` seconds: 2% of it, in [1 ms, 50 ms]."""
    return min(max(0.02 * waited, 0.001), 0.05)


def accept(console: Console, node: int, parse_and_apply: Callable[..., Any], *args: Any) -> Any:
    """Parse and apply one node's reply; a reply that is malformed or breaks the protocol (a SecureMarkError:
    the parsers read a node's records under ``wire.malformed``) is rejected (None), the node counts as
    dropped, and the run goes on. Anything else is a bug of ours and ends the run with its traceback."""
    try:
        return parse_and_apply(*args)
    except SecureMarkError as exc:  # a hostile or broken node must never end the run
        console.print(f"  [yellow]rejected node {node}: {type(exc).__name__}: {shown(exc)}[/]")
        return None


def shown(text: object) -> str:
    """Text a node chose (an error reason, a claim, an exception about its reply) as a console shows it: rich
    markup inert and control characters written out (``\x1b``), so a node can neither end the run with a bad
    tag nor move the operator's cursor; None (an error without a reason) reads "(no reason)"."""
    raw = "(no reason)" if text is None else str(text)
    return escape("".join(c if unicodedata.category(c) != "Cc" else f"\\x{ord(c):02x}" for c in raw))


@contextmanager
def enough_nodes(inner: Strategy, grid: Grid, wait: float, minimum: str, console: Console) -> Iterator[Grid]:
    """The grid as the inner strategy may see it while it samples: the nodes connected now, frozen.

    Flower's FedAvg family waits forever until ``min_available_nodes`` (and its per-stage minimum) are
    connected: one SuperNode that dies mid-run would hang every later round, and so would a node leaving
    between a count and the sampling. So wait for them at most ``wait`` seconds (the first round of a run
    or a resumed run: the ``start`` timeout, nodes may still be starting; later: ``secagg.grace``), then
    hand the inner strategy a view of the grid whose node list does not change while it samples, with its
    minimums lowered for this call only when fewer are connected; fail the round (RoundFailed) when fewer than
    2 are."""
    names = [n for n in ("min_available_nodes", minimum) if isinstance(getattr(inner, n, None), numbers.Real)]
    want = max([math.ceil(getattr(inner, n)) for n in names], default=0)  # finite: check_inner
    end = time.monotonic() + wait
    while len(nodes := list(grid.get_node_ids())) < want and time.monotonic() < end:
        time.sleep(0.5)
    view = NodesNow(grid, nodes)
    if len(nodes) >= want:
        yield view  # type: ignore[misc]
        return
    if len(nodes) < 2:
        raise RoundFailed(f"{len(nodes)} node(s) connected, the strategy asks for {want}")
    console.print(f"  [yellow]{len(nodes)} of the {want} nodes the strategy asks for are connected: sampling those[/]")
    saved = {n: getattr(inner, n) for n in names}
    try:
        for n in names:
            setattr(inner, n, min(saved[n], len(nodes)))
        yield view  # type: ignore[misc]
    finally:
        for n, v in saved.items():
            setattr(inner, n, v)


class NodesNow:
    """A grid whose node list is frozen at what was connected when it was made (everything else is the grid's):
    what the inner strategy samples from."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class StageClock:
    """Seconds per stage of a round (metrics.json's ``stage_seconds``)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(now - self._last, 4)
        self._last = now
