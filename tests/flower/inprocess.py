"""A Grid that delivers messages to the real ClientApp in this process: deterministic, no Ray.

Used to check protocol behaviour (dropouts, failed rounds) exactly; the Ray path has its own test.
"""

from __future__ import annotations

from types import SimpleNamespace

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from securemark.flower.client_app import app as client_app


class InProcessGrid:
    def __init__(self, clients: int, run_id: int = 4242) -> None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, 0  # as run_simulation does
        self.run = SimpleNamespace(run_id=run_id)  # the Federation reads run.run_id only
        self.contexts = {
            1000 + k: Context(run_id, 1000 + k, {"partition-id": k, "num-partitions": clients}, RecordDict(), {})
            for k in range(clients)
        }
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            TaskIdentity.node_id = node
            try:
                replies.append(client_app(msg, self.contexts[node]))
            finally:
                TaskIdentity.node_id = 0
        return replies
