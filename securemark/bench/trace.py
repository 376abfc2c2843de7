"""``securemark bench trace``: seconds to score one suspect against N customers' Tardos codes (the codebook
generated in blocks, laid out packed, then scored ``repeats`` times against a coalition's averaged rows)."""

from __future__ import annotations

import time

import numpy as np

from securemark.codes import pack_bits, tardos
from securemark.errors import InputError
from securemark.tracing.bound import Law, centred
from securemark.tracing.scores import PackedCodebook, accuse, tardos_scores


def bench_trace(users: int, length: int, max_colluders: int, repeats: int, seed: int) -> dict[str, object]:
    if users < max_colluders:
        raise InputError(f"a coalition of {max_colluders} needs at least as many users, got {users}")
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    bias = tardos.arcsine_bias(rng.random(length), max_colluders)
    packed = np.empty((users, (length + 7) // 8), dtype=np.uint8)
    for s in range(0, users, 50_000):  # genuine Tardos rows, generated in blocks
        u = rng.random((min(50_000, users - s), length), dtype=np.float32)
        packed[s : s + len(u)] = pack_bits(tardos.draw_rows(bias.astype(np.float32), u))
    t1 = time.perf_counter()
    book = PackedCodebook.from_packed_rows(packed, length)
    t2 = time.perf_counter()
    coalition = rng.choice(users, size=max_colluders, replace=False)
    rows = np.unpackbits(packed[coalition], axis=1, count=length).astype(np.float64)
    raw = (2 * rows - 1).mean(0)
    times = []
    for _ in range(repeats):
        s0 = time.perf_counter()
        y = centred(raw, bias, max_colluders)  # part of every trace's cost, as in Scorer.accuse
        acc = accuse(tardos_scores(book, y, bias), Law.of(y, bias), 1e-3)
        times.append(time.perf_counter() - s0)
    return {
        "users": users,
        "length": length,
        "generate_seconds": round(t1 - t0, 3),
        "layout_seconds": round(t2 - t1, 3),
        "score_seconds_median": round(float(np.median(times)), 4),
        "score_seconds_min": round(min(times), 4),
        "repeats": repeats,
        "accused_colluders": int(np.isin(acc.accused, coalition).sum()),
        "accused_innocents": int((~np.isin(acc.accused, coalition)).sum()),
        "codebook_mib": round(book.columns.nbytes / 2**20, 1),
    }
