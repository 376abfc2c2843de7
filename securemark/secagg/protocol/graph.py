"""The round's neighbour graph and threshold, as the server draws them: complete (SecAgg) or a random k-regular
Harary ring (SecAgg+), with a threshold that is a strict majority of each holder set. Pure functions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def complete_graph(clients: Sequence[int]) -> dict[int, tuple[int, ...]]:
    """SecAgg: everyone is everyone's neighbour."""
    return {i: tuple(j for j in clients if j != i) for i in clients}


def sparse_degree(n: int) -> int:
    """An even degree k = O(log n) (about 2 log2 n), capped by the complete graph."""
    k = 2 * math.ceil(math.log2(max(n, 2)))
    return min(k + k % 2, n - 1 if (n - 1) % 2 == 0 else n - 2) if n > 2 else n - 1


def harary_graph(clients: Sequence[int], k: int, rng: np.random.Generator) -> dict[int, tuple[int, ...]]:
    """SecAgg+: a random k-regular graph (a Harary ring over a random order; k even).

    The graph is public: the server draws it and sends each client the round's graph.
    """
    n = len(clients)
    if k % 2 or not 2 <= k < n:
        raise ValueError(f"degree k must be even with 2 <= k < n = {n}, got {k}")
    ring = [clients[i] for i in rng.permutation(n)]
    peers: dict[int, set[int]] = {i: set() for i in clients}
    for pos, i in enumerate(ring):
        for d in range(1, k // 2 + 1):
            j = ring[(pos + d) % n]
            peers[i].add(j)
            peers[j].add(i)
    return {i: tuple(sorted(p)) for i, p in peers.items()}


def neighbour_graph(
    clients: Sequence[int], kind: str, rng: np.random.Generator, groups: Sequence[Sequence[int]] = ()
) -> tuple[dict[int, tuple[int, ...]], int]:
    """The round's graph and threshold, a strict majority of each holder set (neighbourhood + self).

    ``complete`` is SecAgg; ``sparse`` is SecAgg+'s random k-regular graph, which for 4 clients or fewer
    would be no sparser than complete in any useful sense, so they get the complete graph. ``groups`` (the
    session's fixed groups, ``secagg.groups``) are made cliques of a sparse graph, so that no set of survivors
    falls apart inside a group; the threshold is then a strict majority of the largest holder set, and a graph
    whose smallest holder set cannot reach it is complete instead.
    """
    if kind not in ("complete", "sparse"):
        raise ValueError(f"graph must be 'complete' or 'sparse', got {kind!r}")
    if kind == "sparse" and len(clients) > 4:
        k = sparse_degree(len(clients))
        peers = {i: set(p) for i, p in harary_graph(clients, k, rng).items()}
        for g in groups:
            for i in g:
                peers[i] |= set(g) - {i}
        sizes = [len(p) + 1 for p in peers.values()]
        if max(sizes) // 2 + 1 <= min(sizes):
            return {i: tuple(sorted(p)) for i, p in peers.items()}, max(sizes) // 2 + 1
    return complete_graph(clients), len(clients) // 2 + 1
