"""``securemark bench starts``: how far honest federated averaging moves a node's model between its rounds,
against the update the node sent, which is what a node's replay check (``securemark.secagg.starts``) compares.

For each federation (partition scheme x clients sampled a round), a real FedAvg run in process on the offline
MNIST-5k digits (the quickstart CNN); every time a client trains, the distance from the model it got to every
model it trained from before, divided by the norm of its update from that earlier model, exactly and through a
node's sketch (a ``Starts`` record with its own key). A node refuses a model whose ratio to some earlier one is at most
``NEAR``: the table's least ratio is the margin an honest run keeps, and the sketch's error is how far the
sketched ratio strays from the exact one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from securemark import training
from securemark.bench.trace_rounds import Weights, train_rounds
from securemark.secagg.starts import NEAR, Starts


def federation(
    scheme: str, clients: int, per_round: int, rounds: int, model: str, lr: float, seed: int
) -> dict[str, Any]:
    """One run's ratios (least, 1st percentile, median), exact and sketched, and its final accuracy."""
    earlier: dict[int, list[tuple[np.ndarray, float, np.ndarray]]] = {}
    exact: list[float] = []
    sketched: list[float] = []
    node = Starts()

    def seen(c: int, start: Weights, trained: Weights) -> None:
        names = training.float_names(start)
        s, t = training.flatten(start, names), training.flatten(trained, names)
        s_sk = node.sketch(s)
        for prev, norm, prev_sk in earlier.get(c, []):
            exact.append(float(np.linalg.norm(s - prev)) / norm)
            sketched.append(float(np.linalg.norm(s_sk - prev_sk)) / norm)
        earlier.setdefault(c, []).append((s, float(np.linalg.norm(t - s)), s_sk))

    _, accuracy = train_rounds(model, 0, rounds, clients, per_round, seed, scheme=scheme, lr=lr, seen=seen)
    e, k = np.array(exact), np.array(sketched)
    return {
        "partition": scheme, "clients": clients, "per_round": per_round, "accuracy": round(accuracy, 4),
        "pairs": int(e.size), "least_ratio": float(e.min()), "p1_ratio": float(np.percentile(e, 1)),
        "median_ratio": float(np.median(e)), "least_sketched_ratio": float(k.min()),
        "sketch_error_p99": float(np.percentile(np.abs(k / e - 1), 99)),
    }  # fmt: skip


def bench_starts(
    schemes: tuple[str, ...] = ("iid", "dirichlet", "pathological"), per_round: tuple[int, ...] = (10, 20),
    rounds: int = 15, lr: float = 0.05, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Every federation of ``schemes`` x ``per_round`` (each client sampled every round: clients = per_round,
    the closest two of a node's models come)."""
    runs = [federation(s, n, n, rounds, "cnn", lr, seed) for s in schemes for n in per_round]
    return {"near": NEAR, "rounds": rounds, "model": "cnn", "lr": lr,
            "least_ratio": min(r["least_ratio"] for r in runs), "runs": runs}  # fmt: skip
