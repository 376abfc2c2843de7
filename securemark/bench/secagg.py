"""Benchmark of one masked-aggregation round against a plain weighted sum of the same vectors."""

from __future__ import annotations

import time

import numpy as np

from securemark.errors import InputError
from securemark.prg import add_keystream, keystream_into
from securemark.secagg import protocol as P
from securemark.secagg.driver import Session, run_round
from securemark.secagg.quantize import QuantConfig, decode, encode


def masking_rates(size: int, dtype: type[np.unsignedinteger], repeats: int = 5) -> tuple[float, float]:
    """(raw ChaCha20 keystream, client masking) in bytes per second on a vector of ``size`` words.

    Measured interleaved, best of ``repeats`` each, so both see the same machine load.
    """
    raw = np.empty(size, dtype=dtype)
    acc = np.zeros(size, dtype=dtype)
    best_raw = best_mask = float("inf")
    for r in range(repeats):
        key = bytes([r]) * 32
        t = time.perf_counter()
        keystream_into(key, raw)
        best_raw = min(best_raw, time.perf_counter() - t)
        t = time.perf_counter()
        add_keystream(key, acc)
        best_mask = min(best_mask, time.perf_counter() - t)
    return raw.nbytes / best_raw, acc.nbytes / best_mask


def bench_secagg(
    clients: int, params: int, dropout: float = 0.0, graph: str = "complete", seed: int = 0,
    threat: str = "semi-honest",
) -> dict:  # fmt: skip
    """One round in process; ``threat="malicious"``: keys signed by a roster's members and the survivor list
    signed (its own stage, ``client.sign``; the roster and the key adverts are made once a session, untimed)."""
    if clients < 3 or params < 1 or not 0 <= dropout < 1:
        raise InputError("need clients >= 3, params >= 1 and 0 <= dropout < 1")
    if threat not in ("semi-honest", "malicious"):
        raise InputError(f"threat must be semi-honest or malicious, got {threat!r}")
    rng = np.random.default_rng(seed)
    ids = tuple(range(1, clients + 1))
    updates = {i: 0.05 * rng.standard_normal(params) for i in ids}
    weights = {i: int(rng.integers(100, 1000)) for i in ids}
    qcfg = QuantConfig(clip=0.5, bits=16, max_weight=1024, max_clients=clients, size=params)
    if threat == "malicious" and graph != "complete":
        raise InputError("the malicious threat takes the complete graph")
    neighbours, threshold = P.neighbour_graph(ids, graph, rng)
    session = Session.signing("bench", list(ids)) if threat == "malicious" else Session("bench")
    for i in ids:  # once per session, not per round: not timed
        session.join(i)
    signed = session.signed(ids, threshold) if threat == "malicious" else ()
    size = params + qcfg.extra
    cfg = P.RoundConfig("bench", 1, neighbours, threshold, size, qcfg.modulus_bits, qcfg.digest(), (), *signed)
    dropped = set(rng.choice(ids, size=int(dropout * clients), replace=False).tolist())
    kept = [i for i in ids if i not in dropped]

    t = time.perf_counter()
    plain = sum(weights[i] * updates[i] for i in kept) / sum(weights[i] for i in kept)
    plain_seconds = time.perf_counter() - t

    t = time.perf_counter()
    qrng = np.random.default_rng(seed + 1)
    encoded = {i: encode(updates[i], weights[i], qcfg, qrng) for i in ids}
    encode_seconds = time.perf_counter() - t
    result = run_round(session, cfg, encoded, {"masked": dropped})
    t = time.perf_counter()
    dec = decode(result.total, qcfg, len(result.survivors))
    decode_seconds = time.perf_counter() - t

    prg, masking = masking_rates(cfg.size, cfg.dtype)
    quantized_sum = np.zeros(cfg.size, dtype=cfg.dtype)
    for i in result.survivors:
        quantized_sum += encoded[i]
    stage_seconds = {k: round(v, 4) for k, v in sorted(result.seconds.items())}
    masked_seconds = encode_seconds + sum(result.seconds.values()) + decode_seconds
    return {
        "clients": clients,
        "params": params,
        "graph": graph,
        "threat": threat,
        "threshold": threshold,
        "degree": len(neighbours[1]),
        "dropout": dropout,
        "dropped": len(dropped),
        "modulus_bits": cfg.modulus_bits,
        "plain_seconds": round(plain_seconds, 4),
        "masked_seconds": round(masked_seconds, 4),
        "ratio": round(masked_seconds / plain_seconds, 1),
        "exact": bool(np.array_equal(result.total, quantized_sum)),
        "max_abs_error": float(np.max(np.abs(dec.mean - plain))),
        "quantization_step": qcfg.step,
        "clipped": dec.clipped,
        "prg_bytes_per_second": prg,
        "mask_bytes_per_second": masking,
        "mask_to_prg": round(masking / prg, 3),
        "round_mask_bytes_per_second": result.mask_bytes / result.seconds["client.masked"],
        "encode_seconds": round(encode_seconds, 4),
        "decode_seconds": round(decode_seconds, 4),
        "stage_seconds": stage_seconds,
    }
