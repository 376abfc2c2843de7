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
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def push_messages(self, messages):
        """Runs the ClientApp on each message at once; the replies wait for pull_messages."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"  # as Flower's grids do on push
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            TaskIdentity.node_id = node
            try:
                self.replies[msg.metadata.message_id] = client_app(msg, self.contexts[node])
            finally:
                TaskIdentity.node_id = 0
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]
