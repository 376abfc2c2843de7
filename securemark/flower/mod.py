"""``securemark_mod``: the client side of securemark, around a Flower app's unchanged ``@app.train()``.

    app = ClientApp(mods=[securemark_mod])  # it must be the FIRST mod

Every securemark message is a Flower ``train`` message carrying a ``securemark`` record that names its stage
(see ``wire``). The mod answers hello (identity, and once per session long-term keys), sign and unmask itself.
On the train stage it hands the user's function exactly what the inner strategy sent (its ArrayRecord, here the
customer's fingerprinted copy, and its ConfigRecord), checks the reply against FedAvg's contract, turns the
returned arrays into the update relative to the copy it received (so the customer's fingerprint never reaches
the global model), encodes it with the example count as weight, masks it, and replies with the masked update
and the user's other metrics: never the plain update, never the example count in clear. Messages without a
``securemark`` record (a plain Flower server, evaluate and query messages) pass through untouched, except a
train request the node must refuse (below, and on a node that masks in this run).

Floors a node sets in its node config (``flower-supernode --node-config "..."``): ``securemark-require-masking
= true`` refuses, before any training, every train request that would send its update unmasked (a plain Flower
train message, a securemark round without masking, a server that skipped the keyed hello); evaluate and query
messages pass (they return metrics, never an update). ``securemark-min-group = G`` (G > 1 implies the first)
refuses every round in which this node's group has fewer than G nodes (``secagg.groups``: what that bounds, and
what not). ``securemark-roster`` with ``securemark-signing-key`` (``signers``) makes the node sign and check
every round, refusing unsigned ones (``secagg.protocol.signing``: a server that lies).

Over a run the node keeps what a server could replay: the session it was keyed for (a hello of another session,
or under another id, is refused: a new session would regroup the nodes) and a sketch of every model it trained
from in a round it revealed shares in (``secagg.starts``): such a model, or one near it, is refused before
training. A node that restarts forgets both.

Why first: a mod listed before it would see (and could change) the masked reply; ``fixedclipping_mod`` or
``localdp_mod`` there would corrupt the sum. The reply carries the CRC-32 of the masked vector (a checksum of a
one-time-padded vector: it tells the server nothing new), so the server names a reply changed after this mod.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from securemark.flower import wire
from securemark.flower.contract import COUNT_KEY, ContractError, contract, only, quantization, whole_number
from securemark.flower.signers import ROSTER, SIGNING_KEY, STATE_DIR, node_signer, once, simulated_signer
from securemark.secagg import protocol as P
from securemark.secagg.quantize import QuantizationError, encode
from securemark.secagg.roster import Roster, RosterError
from securemark.secagg.starts import Starts

Next = Callable[[Message, Context], Message]


REQUIRE_MASKING = "securemark-require-masking"  # node config: train requests that are not masked are refused
MIN_GROUP = "securemark-min-group"  # node config: rounds whose group for this node is smaller are refused
_REFUSE = (ContractError, P.SecAggError, QuantizationError, KeyError, TypeError, ValueError, OverflowError, OSError)


def securemark_mod(msg: Message, context: Context, call_next: Next) -> Message:
    """Flower Mod: answer securemark's stages; wrap the train stage around the app's own train function.
    A malformed message or a reply breaking the contract gets an error reply naming why; an exception raised
    by the app's own train function propagates as Flower reports any app's exception. A node whose config
    names a roster and signing key (``signers``) signs and checks every round (the malicious threat)."""
    return _signed_by(node_signer, msg, context, call_next)


class SimulatedSigners:
    """``securemark_mod`` simulating the malicious threat: a node signs with its partition's key (``signers``)."""

    def __init__(self, roster: Roster, keys: dict[int, str]) -> None:
        self.roster, self.keys = roster, keys

    def __call__(self, msg: Message, context: Context, call_next: Next) -> Message:
        return _signed_by(lambda c: simulated_signer(self.roster, self.keys, c), msg, context, call_next)


def _signed_by(
    signer_of: Callable[[Context], P.Signer | None], msg: Message, context: Context, call_next: Next
) -> Message:
    try:  # an unusable roster or key refuses every train message, securemark's or not (it fails closed)
        signer = signer_of(context)
    except RosterError as exc:
        return _refuse(msg, exc) if is_train(msg) else call_next(msg, context)
    return _mod(msg, context, call_next, signer)


def _mod(msg: Message, context: Context, call_next: Next, signer: P.Signer | None) -> Message:
    if not msg.has_content() or wire.SM not in msg.content:
        if is_train(msg):
            try:
                _plain_allowed(context, signer)
            except ContractError as exc:
                return _refuse(msg, exc)
        return call_next(msg, context)
    try:
        stage = str(msg.content[wire.SM]["stage"])
        if stage != wire.TRAIN:
            if stage not in _HANDLERS:
                raise ContractError(f"unknown securemark stage {stage!r}")
            return _HANDLERS[stage](msg, context, signer)
        user_msg, sent, start = _before_train(msg, context, signer)
    except _REFUSE as exc:
        return _refuse(msg, exc)
    reply = call_next(user_msg, context)
    if reply.has_error():
        return reply
    try:
        return _after_train(msg, context, sent, start, reply, signer)
    except _REFUSE as exc:
        return _refuse(msg, exc)


def is_train(msg: Message) -> bool:
    """A message a ClientApp answers with a train function: "train", and "train.ACTION" for any action
    (Flower runs ``@app.train()`` for "train.default" too)."""
    return str(msg.metadata.message_type).split(".")[0] == wire.MESSAGE_TYPE


def _refuse(msg: Message, exc: Exception) -> Message:
    reason = f"securemark_mod refused the {msg.metadata.message_type} message: {type(exc).__name__}: {exc}"
    return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, reason), reply_to=msg)


def _reply(msg: Message, stage: str, context: Context, **records: ConfigRecord | ArrayRecord | MetricRecord) -> Message:
    """A reply with the SM record (stage + this node's identity claim) and the given records."""
    head = ConfigRecord({"stage": stage, **claim(context)})
    if wire.SM in records:
        head.update(records.pop(wire.SM))
    return Message(RecordDict({wire.SM: head, **records}), reply_to=msg)


def claim(context: Context) -> dict[str, int]:
    """The identity this node claims (its partition-id, when its node config has one; or its registered key)."""
    pid = context.node_config.get("partition-id")
    return {} if pid is None else {"partition-id": int(pid)}


# --- masking stages ------------------------------------------------------------------------------------------
def _hello(msg: Message, context: Context, signer: P.Signer | None) -> Message:
    """The node's identity claim; with a SESSION record, fresh long-term keys for that session (kept in the
    node's state; the public halves in the reply, signed by a node with a roster), replacing any older ones."""
    if wire.SESSION not in msg.content:
        return _reply(msg, wire.HELLO, context)
    head = msg.content[wire.SESSION]
    session, node_id = str(head["session"]), int(head["client_id"])
    if not re.fullmatch(r"[0-9a-f]{16,64}", session) or not 1 <= node_id < 1 << 31:
        raise ContractError("a session needs a hex name (16-64) and a client id in [1, 2^31)")
    keys = P.NodeKeys(session, node_id)
    if wire.KEYS in context.state:  # re-keyed: the same session and id; its rounds, groups and cap kept
        old = wire.keys_from(context.state[wire.KEYS])
        if (old.session, old.id) != (session, node_id):
            why = f"a hello for client {node_id} of session {session} is refused (it would regroup the nodes)"
            raise P.StageError(f"this node is client {old.id} of session {old.session} in this run; {why}")
        keys.last_round, keys.groups, keys.cap = old.last_round, old.groups, old.cap
    context.state[wire.KEYS] = wire.keys_record(keys)
    for key in (wire.ROUND, wire.PEERS):
        context.state.pop(key, None)
    c_pk, s_pk = keys.public()
    payload = ConfigRecord({"c_pk": c_pk, "s_pk": s_pk})
    if signer is not None:
        payload["member"] = signer.member
        payload["advert"] = signer.sign(P.advert(signer.roster.digest, session, node_id, c_pk, s_pk))
    return _reply(msg, wire.HELLO, context, **{wire.PAYLOAD: payload})


def _sign(msg: Message, context: Context, signer: P.Signer | None) -> Message:
    """The malicious threat: this node's signature of the survivors and its round, once (``protocol.signing``)."""
    keys = _keys(context)
    if signer is None or wire.ROUND not in context.state:
        raise P.StageError("a signature of survivors from a node that masked no round of the malicious threat")
    cfg, _ = wire.round_config_from(context.state[wire.ROUND])
    payload = msg.content[wire.PAYLOAD]
    if int(payload["round"]) != cfg.round:
        raise P.StageError(f"survivors of round {int(payload['round'])}, but this node masked round {cfg.round}")
    survivors = [int(i) for i in payload["survivors"]]
    signature = P.sign_survivors(keys, cfg, signer, survivors)  # checked, then recorded on disk: no two lists,
    statement = hashlib.sha256(P.survivors_statement(cfg, sorted(set(survivors)))).digest()  # even at once
    once(context, signer, cfg.session, cfg.round, "sign", statement)
    context.state[wire.KEYS] = wire.keys_record(keys)  # the list it signed: it signs no other this round
    return _reply(msg, wire.SIGN, context, **{wire.PAYLOAD: ConfigRecord({"signature": signature})})


def _unmask(msg: Message, context: Context, signer: P.Signer | None) -> Message:
    keys = _keys(context)
    if wire.ROUND not in context.state:
        raise P.StageError("no masked input of this session waiting to be unmasked on this node")
    cfg, _ = wire.round_config_from(context.state[wire.ROUND])  # what this node masked for, not what unmask says
    peer_keys = wire.key_map_from(context.state[wire.PEERS])
    payload = msg.content[wire.PAYLOAD]
    survivors = [int(i) for i in payload["survivors"]]
    if int(payload["round"]) != cfg.round:
        raise P.StageError(f"unmask of round {int(payload['round'])}, but this node masked round {cfg.round}")
    signatures = wire.bytes_map_from(msg.content[wire.SIGNATURES]) if wire.SIGNATURES in msg.content else {}
    if signer is not None:  # on disk: one unmask a round, even for two requests at once
        once(context, signer, cfg.session, cfg.round, "unmask")
    try:
        shares = wire.bytes_map_from(msg.content[wire.SHARES])
        reveals, bad = P.client_unmask(keys, cfg, peer_keys, survivors, shares, signer, signatures)
    finally:  # one unmask per round, even a refused one
        context.state[wire.KEYS] = wire.keys_record(keys)
        del context.state[wire.ROUND], context.state[wire.PEERS]
    starts = _starts(context)  # this node helps unmask a sum holding its input: its model is recorded for good
    starts.revealed(cfg.round)
    context.state[wire.STARTS] = wire.starts_record(starts)
    return _reply(msg, wire.UNMASK, context, **{wire.PAYLOAD: wire.reveals_record(reveals, bad)})


_HANDLERS: dict[str, Callable[[Message, Context, P.Signer | None], Message]] = {
    wire.HELLO: _hello,
    wire.SIGN: _sign,
    wire.UNMASK: _unmask,
}


def _starts(context: Context) -> Starts:
    """The sketches of the models this node trained from in this run (a new, keyed record the first time)."""
    return wire.starts_from(context.state[wire.STARTS]) if wire.STARTS in context.state else Starts()


def _keys(context: Context) -> P.NodeKeys:
    if wire.KEYS not in context.state:
        raise P.StageError("no keys of this session on this node (a restarted node: it needs a new hello)")
    return wire.keys_from(context.state[wire.KEYS])


# --- the train stage -----------------------------------------------------------------------------------------
Start = tuple[Starts, np.ndarray]  # the node's record of the models it trained from, and this one's sketch


def _before_train(
    msg: Message, context: Context, signer: P.Signer | None
) -> tuple[Message, dict[str, np.ndarray], Start | None]:
    """The message the app's train function gets (exactly what the inner strategy sent), the arrays sent, read
    before the app runs (an app may change the received record in place), and under masking their sketch."""
    user_content = RecordDict({k: v for k, v in msg.content.items() if not k.startswith(wire.SM)})
    sent = wire.arrays_of(only(user_content.array_records, "the train message", "ArrayRecord"))
    if wire.SECAGG not in msg.content:  # everything checkable is checked before spending time on training
        _plain_allowed(context, signer)
    else:
        keys = _keys(context)
        cfg, client_id = wire.round_config_from(msg.content[wire.SECAGG])
        if client_id != keys.id:
            raise P.StageError(f"train message for client {client_id}; this node is client {keys.id}")
        P.check_round(keys, cfg, min_group(context), signer)
        if keys.cap not in (None, int(msg.content[wire.SM]["max-weight"])):  # sums of min(count, cap) tell counts
            raise P.ProtocolViolation(f"this session's weight cap was {keys.cap}; one that changes is refused")
        if cfg.malicious and wire.train_digest(user_content, str(msg.content[wire.SM]["weight-key"])) != cfg.train:
            raise P.SignatureError("the round's signed configuration names another training configuration than "
                                   "the one sent to this node; refused")  # fmt: skip
        starts = _starts(context)
        start = starts.sketch(wire.flat(sent))  # a model holding NaN or infinities is refused here
        starts.check(start, cfg.round)
        return Message(content=user_content, metadata=copy.copy(msg.metadata)), sent, (starts, start)
    return Message(content=user_content, metadata=copy.copy(msg.metadata)), sent, None


def _after_train(
    msg: Message,
    context: Context,
    sent: dict[str, np.ndarray],
    start: Start | None,
    reply: Message,
    signer: P.Signer | None,
) -> Message:
    """The update relative to ``sent``: masked (masked rounds) or plain with its weight (baseline)."""
    head = msg.content[wire.SM]
    delta, weight, metrics_key, metrics = contract(sent, reply.content, str(head["weight-key"]))
    if wire.SECAGG not in msg.content or start is None:
        records = {wire.SM: ConfigRecord({"weight": weight}), wire.UPDATE: wire.array_record(delta)}
        return _reply(msg, wire.TRAIN, context, **records, **{metrics_key: metrics})
    keys = _keys(context)
    # no whole number leaves in clear, whatever weight-key a server names (it could name another and read the
    # count among the rest); fractions pass, and correct/n can tell n: docs/explanations/masking.md says so
    metrics = MetricRecord({k: v for k, v in metrics.items() if k != COUNT_KEY and not whole_number(v)})
    # capped, never refused (a refusal would let a server binary-search the count); one cap a session (_before_train)
    weight, keys.cap = min(weight, int(head["max-weight"])), int(head["max-weight"])
    qcfg = quantization(head, [int(np.size(sent[n])) for n in wire.float_keys(sent)])
    cfg, _ = wire.round_config_from(msg.content[wire.SECAGG])
    if cfg.size != qcfg.size + qcfg.extra or cfg.modulus_bits != qcfg.modulus_bits:
        raise ContractError("the round's vector size or modulus does not fit this update")
    if cfg.encoding != qcfg.digest():  # the binding that makes per-node ranges useless to a lying server
        raise P.ProtocolViolation("the round's keys are bound to another quantization than the one sent to this node")
    peer_keys = wire.key_map_from(msg.content[wire.PAYLOAD])
    rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))  # stochastic rounding
    adverts = wire.adverts_from(msg.content[wire.PAYLOAD])
    x = encode(delta, weight, qcfg, rng)
    masked = P.client_masked_input(keys, cfg, peer_keys, x, min_group(context), signer, adverts)
    starts, model = start  # the model trained from: never again once this node reveals shares for the round
    starts.masked(model, float(np.linalg.norm(delta)), cfg.round)
    context.state[wire.STARTS] = wire.starts_record(starts)
    context.state[wire.KEYS] = wire.keys_record(keys)
    context.state[wire.ROUND] = wire.round_config_record(cfg, keys.id)
    context.state[wire.PEERS] = ConfigRecord(dict(msg.content[wire.PAYLOAD]))
    records = {
        wire.SM: ConfigRecord({"crc32": wire.checksum(masked.y)}),
        wire.UPDATE: wire.array_record(masked.y),
        wire.PAYLOAD: wire.masked_record(masked),
    }
    return _reply(msg, wire.TRAIN, context, **records, **{metrics_key: metrics})


def _plain_allowed(context: Context, signer: P.Signer | None) -> None:
    """Refuse a train request whose update would leave unmasked: on a node that masks in this run (a downgrade),
    or on a node whose config requires masking or names a roster (a value other than true or false is refused
    too: the floor fails closed)."""
    if wire.KEYS in context.state:
        raise ContractError("a plain train request to a node that masks its updates in this run: refused")
    if signer is not None:
        raise ContractError("this node signs its masked rounds (a roster in its config): a plain train request is "
                            "refused")  # fmt: skip
    known = (REQUIRE_MASKING, MIN_GROUP, ROSTER, SIGNING_KEY, STATE_DIR)
    unknown = [k for k in context.node_config if _floor_like(k) and k not in known]
    if unknown:  # a misspelt floor would turn the floor off without a word
        raise ContractError(f"unknown node config key {unknown[0]!r} (the floor is {REQUIRE_MASKING!r}): refused")
    required = context.node_config.get(REQUIRE_MASKING, False)
    if required in (True, 1, "true"):
        raise ContractError(f"this node requires masked aggregation ({REQUIRE_MASKING}): a plain train request, or "
                            "a server that never set up this node's keys, is refused")  # fmt: skip
    if required not in (False, 0, "false"):
        raise ContractError(f"node config {REQUIRE_MASKING} must be true or false, got {required!r}: refused")
    if min_group(context) > 1:
        raise ContractError(f"this node requires groups of {min_group(context)} ({MIN_GROUP}), so masked aggregation:"
                            " a plain train request is refused")  # fmt: skip


def min_group(context: Context) -> int:
    """The node's ``securemark-min-group`` (1 when unset); anything but a whole number >= 1 is refused."""
    value = context.node_config.get(MIN_GROUP, 1)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ContractError(f"node config {MIN_GROUP} must be a whole number >= 1, got {value!r}: refused")
    return value


def _floor_like(key: str) -> bool:
    """A node-config key that reads as securemark's or as a masking floor, whatever its case and separators
    (``SecureMark_Require_Masking``, ``require-masking``, ``masking-required``, ``require-secagg``)."""
    letters = re.sub(r"[^a-z]", "", str(key).lower())
    return any(w in letters for w in ("securemark", "securmark", "requiremask", "requiresmask", "maskingrequired",
                                      "requiresecagg", "secaggrequired"))  # fmt: skip
