"""A Grid that delivers messages to a real ClientApp in this process: deterministic, no Ray.

Used to check protocol behaviour (dropouts, failed rounds, hostile nodes) exactly; the Ray path has its own test.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import InMemoryGrid

from securemark.flower.client_app import app as shipped_client_app


class InProcessGrid(InMemoryGrid):
    """Flower's simulation grid (an InMemoryGrid, as a simulation's ServerApp gets: its nodes are the engine's
    own) without its LinkState: messages go straight to the ClientApp. ``Deployed`` wraps one to stand for a
    SuperLink's grid."""

    def __init__(  # no InMemoryGrid.__init__: there is no LinkState to talk to
        self, clients: int, app=shipped_client_app, run_id: int = 4242, partitions=None, keys=None, run_config=None
    ) -> None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, 0  # as run_simulation does
        self._run_ns = SimpleNamespace(run_id=run_id)  # SecureMark reads run.run_id only
        self.app = app
        partitions = list(range(clients)) if partitions is None else partitions
        self.contexts = {
            1000 + k: Context(
                run_id, 1000 + k, {"partition-id": p, "num-partitions": clients}, RecordDict(), run_config or {}
            )
            for k, p in enumerate(partitions)
        }
        self.keys = keys or {}  # node id -> (registered public key, name): what a SuperLink with node auth reports
        self.sent: list[Message] = []
        self.replies: dict[str, Message] = {}
        self.answers: dict[str, Message] = {}  # every reply, kept after it is pulled

    @property
    def run(self):
        return self._run_ns

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def get_nodes(self):
        keys = {n: self.keys.get(n, (b"", "")) for n in self.get_node_ids()}
        return [SimpleNamespace(node_id=n, public_key=key, name=name) for n, (key, name) in keys.items()]

    def push_messages(self, messages):
        """Runs the ClientApp on each message at once; the replies wait for pull_messages."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"  # as Flower's grids do on push
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            TaskIdentity.node_id = node
            try:
                self.replies[msg.metadata.message_id] = self.app(msg, self.contexts[node])
            except Exception as exc:  # as Flower does: the ClientApp's exception becomes an error reply
                error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}")
                self.replies[msg.metadata.message_id] = Message(error, reply_to=msg)
            finally:
                TaskIdentity.node_id = 0
            self.answers[msg.metadata.message_id] = self.replies[msg.metadata.message_id]
            ids.append(msg.metadata.message_id)
        return ids

    def replied(self, stage: str) -> list[Message]:
        """The replies the ClientApp gave to the messages of ``stage`` sent so far (pulled or not)."""
        return [self.answers[m.metadata.message_id] for m in self.sent
                if str(m.content["securemark"]["stage"]) == stage]  # fmt: skip

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


class Deployed:
    """An InProcessGrid standing for a SuperLink's grid (not a simulation's): every call goes to it."""

    def __init__(self, grid: InProcessGrid) -> None:
        self.inner = grid

    def __getattr__(self, name):
        return getattr(self.inner, name)


def flatten(arrays: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    """The arrays ``names``, in that order, as one float64 vector: the reference the tests compare updates with."""
    if not names:
        return np.zeros(0)
    return np.concatenate([np.asarray(arrays[n], dtype=np.float64).reshape(-1) for n in names])


def quantization_steps(msg: Message, sizes: list[int]) -> np.ndarray:
    """The quantization step of every value of an update, from the ranges a masked train message sent (one
    per floating tensor, sizes in the update's order): stochastic rounding moves a value by less than it."""
    head = msg.content["securemark"]
    ranges, levels = np.array(list(head["ranges"]), dtype=np.float64), (1 << int(head["bits"])) - 1
    assert len(ranges) == len(sizes)
    return np.repeat(2 * ranges / levels, sizes)
