"""What travels in Flower messages: stages, record keys, and (de)serialization of protocol state and models.

Message keys are constants in one place. A client's protocol state lives in its node ``context.state``
between messages (a node's messages may be served by different processes), never in a message to the server.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord

from securemark.secagg import protocol as P
from securemark.secagg.shamir import SHARE_BYTES

# Every securemark message travels as a Flower ``train`` message: a ClientApp routes a message only to a
# function it registered, and the user's app registers ``@app.train()``; securemark_mod, wrapped around it,
# answers every stage but TRAIN itself. The stage is named in the SM record.
MESSAGE_TYPE = "train"
HELLO = "hello"  # which customer is this node (its claimed partition-id, when identities are claimed)
ADVERTISE = "advertise"  # fresh key pair of this round
SHARE_KEYS = "share_keys"  # encrypted shares for the neighbours
TRAIN = "train"  # the customer's copy (+ its encrypted shares) in, the (masked) update out
UNMASK = "unmask"
STAGES = (HELLO, ADVERTISE, SHARE_KEYS, TRAIN, UNMASK)

# record keys (prefixed: they sit beside the user's own records in the same message)
SM = "securemark"  # ConfigRecord: "stage", and a stage's small values
SECAGG = "securemark.secagg"  # ConfigRecord: the round's masking configuration
PAYLOAD = "securemark.payload"  # ConfigRecord: keys, shares, survivors
UPDATE = "securemark.update"  # ArrayRecord: the (masked) update of one client
B_SHARES, S_SHARES = "securemark.b", "securemark.s"  # unmask reply
STATE = "securemark.secagg"  # in context.state


def round_config_record(cfg: P.RoundConfig, client_id: int) -> ConfigRecord:
    ids = list(cfg.clients)
    return ConfigRecord(
        {
            "run_id": cfg.run_id,
            "round": cfg.round,
            "threshold": cfg.threshold,
            "size": cfg.size,
            "modulus_bits": cfg.modulus_bits,
            "client_id": client_id,
            "ids": ids,
            "degrees": [len(cfg.neighbours[i]) for i in ids],
            "neighbours": [j for i in ids for j in cfg.neighbours[i]] or [0],
        }
    )


def round_config_from(rec: ConfigRecord) -> tuple[P.RoundConfig, int]:
    ids, degrees, flat = list(rec["ids"]), list(rec["degrees"]), list(rec["neighbours"])
    neighbours, pos = {}, 0
    for i, d in zip(ids, degrees, strict=True):
        neighbours[int(i)] = tuple(int(j) for j in flat[pos : pos + d])
        pos += d
    cfg = P.RoundConfig(
        str(rec["run_id"]),
        int(rec["round"]),
        neighbours,
        int(rec["threshold"]),
        int(rec["size"]),
        int(rec["modulus_bits"]),
    )
    return cfg, int(rec["client_id"])


def client_state_record(st: P.ClientState) -> ConfigRecord:
    rec = round_config_record(st.cfg, st.id)
    peers, held = sorted(st.peer_keys), sorted(st.held)
    rec.update(
        {
            "stage": int(st.stage),
            "c_key": P.private_bytes(st.c_key),
            "s_key": P.private_bytes(st.s_key),
            "seed": st.seed,
            "peers": peers or [0],
            "peer_c": b"".join(st.peer_keys[j][0] for j in peers),
            "peer_s": b"".join(st.peer_keys[j][1] for j in peers),
            "held": held or [0],
            "held_b": b"".join(st.held[j][0] for j in held),
            "held_s": b"".join(st.held[j][1] for j in held),
            "sharers": list(st.sharers) or [0],
        }
    )
    return rec


def client_state_from(rec: ConfigRecord) -> P.ClientState:
    cfg, client_id = round_config_from(rec)
    st = P.ClientState(
        cfg,
        client_id,
        stage=P.Stage(int(rec["stage"])),
        c_key=X25519PrivateKey.from_private_bytes(rec["c_key"]),
        s_key=X25519PrivateKey.from_private_bytes(rec["s_key"]),
        seed=bytes(rec["seed"]),
    )
    k = P.KEY_BYTES
    peer_c, peer_s = bytes(rec["peer_c"]), bytes(rec["peer_s"])
    for n, j in enumerate(p for p in rec["peers"] if p):
        st.peer_keys[int(j)] = (peer_c[n * k : (n + 1) * k], peer_s[n * k : (n + 1) * k])
    held_b, held_s = bytes(rec["held_b"]), bytes(rec["held_s"])
    for n, j in enumerate(h for h in rec["held"] if h):
        st.held[int(j)] = (
            held_b[n * SHARE_BYTES : (n + 1) * SHARE_BYTES],
            held_s[n * SHARE_BYTES : (n + 1) * SHARE_BYTES],
        )
    st.sharers = tuple(int(j) for j in rec["sharers"] if j)
    return st


def bytes_map(mapping: dict[int, bytes]) -> ConfigRecord:
    """{peer id: bytes} as a record (ids and values in matching lists)."""
    ids = sorted(mapping)
    return ConfigRecord({"ids": ids or [0], "values": [mapping[i] for i in ids] or [b""], "count": len(ids)})


def bytes_map_from(rec: ConfigRecord) -> dict[int, bytes]:
    count = int(rec["count"])
    ids, values = list(rec["ids"])[:count], list(rec["values"])[:count]
    if not all(isinstance(v, bytes) for v in values):
        raise TypeError("a bytes map holds non-bytes values")
    return {int(i): v for i, v in zip(ids, values, strict=True)}


def key_map(keys: dict[int, tuple[bytes, bytes]]) -> ConfigRecord:
    """{peer id: (c_pk, s_pk)} as one record."""
    ids = sorted(keys)
    return ConfigRecord(
        {
            "ids": ids or [0],
            "c_pk": [keys[i][0] for i in ids] or [b""],
            "s_pk": [keys[i][1] for i in ids] or [b""],
            "count": len(ids),
        }
    )


def key_map_from(rec: ConfigRecord) -> dict[int, tuple[bytes, bytes]]:
    count = int(rec["count"])
    ids, c_pk, s_pk = list(rec["ids"])[:count], list(rec["c_pk"])[:count], list(rec["s_pk"])[:count]
    return {int(i): (bytes(c), bytes(s)) for i, c, s in zip(ids, c_pk, s_pk, strict=True)}


def array_record(arr: np.ndarray) -> ArrayRecord:
    return ArrayRecord([arr])


def array_from(rec: ArrayRecord) -> np.ndarray:
    return rec.to_numpy_ndarrays()[0]


# --- a model as named numpy arrays (the mod needs no torch) ----------------------------------------------------
def arrays_of(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: rec[k].numpy() for k in rec}


def is_float(a: np.ndarray) -> bool:
    return bool(np.issubdtype(a.dtype, np.floating))


def float_keys(arrays: dict[str, np.ndarray]) -> list[str]:
    """The floating arrays, sorted: the update's layout (as ``training.float_names`` on a state_dict).
    Integer buffers (counters) are not averaged."""
    return sorted(k for k, a in arrays.items() if is_float(a))


def flatten(arrays: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    if not names:
        return np.zeros(0)
    return np.concatenate([np.asarray(arrays[n], dtype=np.float64).reshape(-1) for n in names])
