"""What travels in Flower messages: stages, record keys, and (de)serialization of protocol state and models.

Message keys are constants in one place. A client's protocol state lives in its node ``context.state``
between messages (a node's messages may be served by different processes), never in a message to the server.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from securemark.secagg import protocol as P
from securemark.secagg.starts import K, Starts

# Every securemark message travels as a Flower ``train`` message: a ClientApp routes a message only to a
# function it registered, and the user's app registers ``@app.train()``; securemark_mod, wrapped around it,
# answers every stage but TRAIN itself. The stage is named in the SM record.
MESSAGE_TYPE = "train"
HELLO = "hello"  # who is this node (its claimed partition-id), and, under masking, its long-term public keys
TRAIN = "train"  # the customer's copy (+ round config, neighbours' keys) in; the (masked) update + shares out
SIGN = "sign"  # (malicious threat) survivors in; this node's signature of them and the round's configuration out
UNMASK = "unmask"  # survivors (+ their signatures) + shares addressed to this node in; the shares the sum needs out
STAGES = (HELLO, TRAIN, SIGN, UNMASK)

# record keys (prefixed: they sit beside the user's own records in the same message)
SM = "securemark"  # ConfigRecord: "stage", and a stage's small values
SESSION = "securemark.session"  # ConfigRecord: the session a hello sets keys up for, and the node's id in it
SECAGG = "securemark.secagg"  # ConfigRecord: the round's masking configuration
PAYLOAD = "securemark.payload"  # ConfigRecord: keys, shares, survivors
UPDATE = "securemark.update"  # ArrayRecord: the (masked) update of one client
SHARES = "securemark.shares"  # ConfigRecord: encrypted shares addressed to one node (unmask request)
SIGNATURES = "securemark.signatures"  # ConfigRecord: the survivors' signatures (unmask request, malicious threat)
# in context.state: long-term keys; the round masked and not yet unmasked, and its neighbours' public keys
KEYS, ROUND, PEERS = "securemark.keys", "securemark.round", "securemark.peers"
STARTS = "securemark.starts"  # the sketches of the models this node trained from (``secagg.starts``), all run


@contextmanager
def malformed(what: str) -> Iterator[None]:
    """Reading a peer's records: a missing key, a wrong type or an undecodable value there is the peer's fault,
    a ProtocolViolation (the reply is refused, the node counts as dropped); put only the reading inside, so a
    bug in what is done with the values still ends the run."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, AttributeError, EOFError) as exc:
        # AttributeError: a record of another kind than the one read (a ConfigRecord where an ArrayRecord
        # belongs); EOFError: an array whose bytes are empty
        raise P.ProtocolViolation(f"malformed {what}: {type(exc).__name__}: {exc}") from None


def with_arrays(content: RecordDict, arrays: ArrayRecord) -> RecordDict:
    """A fresh copy of an inner strategy's message content (FedAvg shares one object across messages) with its
    ArrayRecord replaced: how a customer's copy takes the global model's place."""
    out = RecordDict()
    for key, rec in content.items():
        if isinstance(rec, ArrayRecord):
            out[key] = arrays
        else:
            out[key] = type(rec)(dict(rec))
    return out


def train_digest(content: RecordDict, weight_key: str) -> bytes:
    """32 bytes naming the training configuration a train message carries: its ConfigRecords but securemark's,
    and the metric the node weighs its update by. Under the malicious threat it is part of the round's signed
    configuration, so a server that sends some nodes another one (a learning rate of 0 to all but one node,
    another metric as the weight) gets masks that never cancel."""
    items = sorted((k, sorted(dict(r).items())) for k, r in content.config_records.items() if not k.startswith(SM))
    return hashlib.sha256(b"securemark/train/v2|" + repr((weight_key, items)).encode()).digest()


def checksum(y: np.ndarray) -> int:
    """CRC-32 of a masked vector's bytes: securemark_mod attaches it, the server checks it, so a mod placed
    after securemark_mod that changes the update is named instead of read as a wrong sum. A check against
    mistakes, not a MAC (whoever changes the vector can recompute it): 0.6 ms for 4 MB against SHA-256's 2.2."""
    return zlib.crc32(memoryview(np.ascontiguousarray(y)).cast("B"))


def round_config_record(cfg: P.RoundConfig, client_id: int) -> ConfigRecord:
    ids = list(cfg.clients)
    return ConfigRecord(
        {
            "session": cfg.session,
            "round": cfg.round,
            "threshold": cfg.threshold,
            "size": cfg.size,
            "modulus_bits": cfg.modulus_bits,
            "encoding": cfg.encoding,
            "client_id": client_id,
            "ids": ids,
            "degrees": [len(cfg.neighbours[i]) for i in ids],
            "neighbours": [j for i in ids for j in cfg.neighbours[i]] or [0],
            "groups": [cfg.group_of(i)[0] for i in ids],  # each client's group, named by its first member
            "roster": cfg.roster,
            "members": [m for _, m in cfg.members] or [""],  # in the order of ids (malicious threat)
            "signers": cfg.signers,
            "c_pks": [c for _, c, _ in cfg.keys] or [b""],  # every client's session keys, in the order of ids
            "s_pks": [k for _, _, k in cfg.keys] or [b""],
            "train": cfg.train,
        }
    )


def round_config_from(rec: ConfigRecord) -> tuple[P.RoundConfig, int]:
    ids, degrees, flat = list(rec["ids"]), list(rec["degrees"]), list(rec["neighbours"])
    if sum(int(d) for d in degrees) > len(flat):
        raise ValueError("the round's neighbour lists are shorter than their degrees")
    neighbours, pos = {}, 0
    for i, d in zip(ids, degrees, strict=True):
        neighbours[int(i)] = tuple(int(j) for j in flat[pos : pos + int(d)])
        pos += int(d)
    named: dict[int, list[int]] = {}
    for i, first in zip(ids, list(rec["groups"]), strict=True):
        named.setdefault(int(first), []).append(int(i))
    if any(first not in members for first, members in named.items()):
        raise ValueError("a group must be named by one of its members")
    groups = tuple(sorted(tuple(sorted(g)) for g in named.values())) if len(named) < len(ids) else ()
    cfg = P.RoundConfig(
        str(rec["session"]),
        int(rec["round"]),
        neighbours,
        int(rec["threshold"]),
        int(rec["size"]),
        int(rec["modulus_bits"]),
        rec["encoding"],
        groups,
        rec.get("roster", b""),
        _members(ids, rec),
        int(rec.get("signers", 0)),
        _session_keys(ids, rec),
        rec.get("train", b""),
    )
    return cfg, int(rec["client_id"])


def _session_keys(ids: list, rec: ConfigRecord) -> tuple[tuple[int, bytes, bytes], ...]:
    c_pks, s_pks = list(rec.get("c_pks", [b""])), list(rec.get("s_pks", [b""]))
    if c_pks == [b""]:
        return ()
    return tuple((int(i), bytes(c), bytes(k)) for i, c, k in zip(ids, c_pks, s_pks, strict=True))


def _members(ids: list, rec: ConfigRecord) -> tuple[tuple[int, str], ...]:
    names = [str(m) for m in rec.get("members", [""])]
    if names == [""]:
        return ()
    return tuple(zip((int(i) for i in ids), names, strict=True))


def keys_record(keys: P.NodeKeys) -> ConfigRecord:
    return ConfigRecord(
        {
            "session": keys.session,
            "id": keys.id,
            "c_key": P.private_bytes(keys.c_key),
            "s_key": P.private_bytes(keys.s_key),
            "last_round": keys.last_round,
            "open_round": -1 if keys.open_round is None else keys.open_round,
            "grouped": list(keys.groups) or [0],  # every client whose group this node saw, then each one's group
            "groups": [keys.groups[j][0] for j in keys.groups] or [0],
            "signed": [keys.signed[0], *keys.signed[1]] if keys.signed else [-1],  # round, then its survivors
            "masked": keys.masked or b"",
            "cap": -1 if keys.cap is None else keys.cap,
        }
    )


def keys_from(rec: ConfigRecord) -> P.NodeKeys:
    open_round = int(rec["open_round"])
    return P.NodeKeys(
        str(rec["session"]),
        int(rec["id"]),
        c_key=X25519PrivateKey.from_private_bytes(bytes(rec["c_key"])),
        s_key=X25519PrivateKey.from_private_bytes(bytes(rec["s_key"])),
        last_round=int(rec["last_round"]),
        open_round=None if open_round < 0 else open_round,
        groups=_groups_from(rec),
        signed=_signed_from(rec),
        masked=bytes(rec.get("masked", b"")) or None,
        cap=None if int(rec.get("cap", -1)) < 0 else int(rec["cap"]),
    )


def _signed_from(rec: ConfigRecord) -> tuple[int, tuple[int, ...]] | None:
    signed = [int(v) for v in rec.get("signed", [-1])]
    return None if signed[0] < 0 else (signed[0], tuple(signed[1:]))


def starts_record(st: Starts) -> ConfigRecord:
    rec = ConfigRecord({"key": st.key, "models": st.models.astype(np.float64).tobytes()})
    if st.rounds:
        rec["rounds"], rec["updates"] = list(st.rounds), list(st.updates)
    if st.pending is not None:
        r, model, update = st.pending
        rec["pending_round"], rec["pending_model"], rec["pending_update"] = r, model.tobytes(), update
    return rec


def starts_from(rec: ConfigRecord) -> Starts:
    models = np.frombuffer(bytes(rec["models"]), np.float64).reshape(-1, K).copy()
    rounds, updates = [int(r) for r in rec.get("rounds", [])], [float(u) for u in rec.get("updates", [])]
    if not len(rounds) == len(updates) == len(models):
        raise ValueError("the node's record of its starting models is inconsistent")
    pending = None
    if "pending_round" in rec:
        model = np.frombuffer(bytes(rec["pending_model"]), np.float64).copy()
        pending = (int(rec["pending_round"]), model, float(rec["pending_update"]))
    return Starts(bytes(rec["key"]), rounds, models, updates, pending)


def flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The floating arrays of a model, flat float64 in ``float_keys`` order."""
    return np.concatenate([np.asarray(arrays[n], np.float64).reshape(-1) for n in float_keys(arrays)] or [np.zeros(0)])


def _groups_from(rec: ConfigRecord) -> dict[int, tuple[int, ...]]:
    """client -> its group, from the members' list and each one's group name (its first member)."""
    named: dict[int, list[int]] = {}
    for j, first in zip(list(rec.get("grouped", [0])), list(rec.get("groups", [0])), strict=True):
        if int(j):
            named.setdefault(int(first), []).append(int(j))
    return {j: tuple(sorted(g)) for g in named.values() for j in g}


def masked_record(m: P.MaskedInput) -> ConfigRecord:
    rec = bytes_map(m.ciphertexts)
    rec["commitments"] = m.commitments
    return rec


def masked_from(y: np.ndarray, rec: ConfigRecord) -> P.MaskedInput:
    return P.MaskedInput(y, bytes_map_from(rec), rec["commitments"])  # type: ignore[arg-type]


def reveals_record(reveals: dict[tuple[int, int], bytes], bad: list[int]) -> ConfigRecord:
    keys = sorted(reveals)
    return ConfigRecord(
        {
            "owners": [o for o, _ in keys] or [0],
            "labels": [lb for _, lb in keys] or [0],
            "shares": [reveals[k] for k in keys] or [b""],
            "count": len(keys),
            "bad": bad or [0],
        }
    )


def reveals_from(rec: ConfigRecord) -> tuple[dict[tuple[int, int], bytes], list[int]]:
    out = {}
    for o, lb, sh in zip(*_counted(rec, "owners", "labels", "shares"), strict=True):
        if not isinstance(sh, bytes) or (int(o), int(lb)) in out:
            raise ValueError("the unmask reply holds a non-bytes or repeated share")
        out[int(o), int(lb)] = sh
    return out, [int(b) for b in rec["bad"] if int(b)]


def bytes_map(mapping: dict[int, bytes]) -> ConfigRecord:
    """{peer id: bytes} as a record (ids and values in matching lists)."""
    ids = sorted(mapping)
    return ConfigRecord({"ids": ids or [0], "values": [mapping[i] for i in ids] or [b""], "count": len(ids)})


def _counted(rec: ConfigRecord, *fields: str) -> list[list]:
    """The parallel lists ``fields`` of a record, cut to its ``count`` (empty lists travel as one filler
    entry); refused when a list is shorter than the count or the lists differ in length."""
    count = int(rec["count"])
    lists = [list(rec[f]) for f in fields]
    if not 0 <= count <= len(lists[0]) or any(len(x) != len(lists[0]) for x in lists):
        raise ValueError(f"a record's lists {fields} disagree with its count")
    return [x[:count] for x in lists]


def bytes_map_from(rec: ConfigRecord) -> dict[int, bytes]:
    ids, values = _counted(rec, "ids", "values")
    if len(set(ids)) != len(ids):
        raise ValueError("a bytes map repeats an id")
    if not all(isinstance(v, bytes) for v in values):
        raise TypeError("a bytes map holds non-bytes values")
    return {int(i): v for i, v in zip(ids, values, strict=True)}


def key_map(keys: dict[int, tuple[bytes, bytes]], adverts: dict[int, bytes] | None = None) -> ConfigRecord:
    """{peer id: (c_pk, s_pk)} as one record, with each peer's signature of its keys (malicious threat)."""
    ids = sorted(keys)
    rec = ConfigRecord(
        {
            "ids": ids or [0],
            "c_pk": [keys[i][0] for i in ids] or [b""],
            "s_pk": [keys[i][1] for i in ids] or [b""],
            "count": len(ids),
        }
    )
    if adverts:
        rec["adverts"] = [adverts.get(i, b"") for i in ids] or [b""]
    return rec


def key_map_from(rec: ConfigRecord) -> dict[int, tuple[bytes, bytes]]:
    ids, c_pk, s_pk = _counted(rec, "ids", "c_pk", "s_pk")
    if len(set(ids)) != len(ids):
        raise ValueError("a key map repeats an id")
    if not all(isinstance(k, bytes) for k in c_pk + s_pk):
        raise TypeError("a key map holds non-bytes keys")
    return {int(i): (c, s) for i, c, s in zip(ids, c_pk, s_pk, strict=True)}


def adverts_from(rec: ConfigRecord) -> dict[int, bytes]:
    """The peers' signatures of their keys a key map carries (empty when it carries none)."""
    if "adverts" not in rec:
        return {}
    ids, sigs = _counted(rec, "ids", "adverts")
    if not all(isinstance(v, bytes) for v in sigs):
        raise TypeError("a key map holds non-bytes signatures")
    return {int(i): v for i, v in zip(ids, sigs, strict=True)}


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


def difference(after: dict[str, np.ndarray], before: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    """The arrays ``names`` of ``after`` minus those of ``before``, flattened in that order, in float64, written
    straight into one vector: one 8 MB
    array per 1M weights instead of five (the mod runs it on every update)."""
    out = np.empty(sum(int(np.size(before[n])) for n in names), dtype=np.float64)
    pos = 0
    for n in names:
        size = int(np.size(before[n]))
        np.subtract(np.ravel(after[n]), np.ravel(before[n]), out=out[pos : pos + size], dtype=np.float64)
        pos += size
    return out
