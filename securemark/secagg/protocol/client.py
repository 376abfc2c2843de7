"""The client stages of a round, run on a node with its own keys: mask the input and seal the shares of the
round's secrets (train), then reveal the shares the survivors' sum needs (unmask). Also the message the train
stage sends, ``MaskedInput``, and the layout of its sealed shares, which the server checks by size."""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from securemark.prg import add_keystream
from securemark.secagg import shamir
from securemark.secagg.protocol.config import B_LABEL, RoundConfig
from securemark.secagg.protocol.derive import _pair_seed, _self_mask_key, _share_key, commitment
from securemark.secagg.protocol.errors import (
    GroupTooSmall,
    ProtocolViolation,
    ShareAuthError,
    StageError,
    TooFewSurvivors,
)
from securemark.secagg.protocol.keys import KEY_BYTES, NodeKeys
from securemark.secagg.protocol.signing import Signer, check_adverts, check_member, check_survivors

NONCE_BYTES = 12
_ENTRY = 4 + shamir.SHARE_BYTES  # label + share inside a ciphertext


def _check_peer_keys(cfg: RoundConfig, me: int, peer_keys: Mapping[int, tuple[bytes, bytes]]) -> None:
    if set(peer_keys) != set(cfg.neighbours[me]):
        raise ProtocolViolation(f"client {me} needs the public keys of exactly its neighbours")
    for j, (c_pk, s_pk) in peer_keys.items():
        if len(c_pk) != KEY_BYTES or len(s_pk) != KEY_BYTES:
            raise ProtocolViolation(f"public keys of client {j} must be {KEY_BYTES} bytes each")


@dataclass
class MaskedInput:
    y: np.ndarray
    ciphertexts: dict[int, bytes]  # holder -> its shares of this owner's round secrets (the owner's own included)
    commitments: bytes  # |H(i)| x |labels| commitments, holders and labels in ``RoundConfig`` order


def check_round(keys: NodeKeys, cfg: RoundConfig, min_group: int = 1, signer: Signer | None = None) -> None:
    """What a node checks of a round before it trains for it: its session, a later round, a safe threshold,
    and the session's groups: every client's group as this node saw it before in the session (a server that
    regroups could difference sums over different groups down to one client), its own of ``min_group`` or more.
    A node with a ``signer`` takes only rounds of the malicious threat under its roster, and none without one."""
    i = keys.id
    if signer is not None:
        check_member(cfg, signer, i)
    elif cfg.malicious:
        raise StageError(f"client {i}: the round needs signatures (secagg.threat = malicious) and this node has no "
                         "signing key and roster")  # fmt: skip
    if cfg.session != keys.session or i not in cfg.neighbours:
        raise StageError(f"client {i}: round config of another session, or not naming this client")
    if cfg.round <= keys.last_round:
        raise StageError(f"client {i}: round {cfg.round} is not after round {keys.last_round}; masking refused")
    cfg.check_safe_threshold(i)
    for j in cfg.clients:
        seen, now = keys.groups.get(j), cfg.group_of(j)
        if seen is not None and seen != now:
            raise ProtocolViolation(f"client {i}: client {j}'s group was {list(seen)} earlier in this session, "
                                    f"now {list(now)}; groups are fixed for a session: refused")  # fmt: skip
    if len(cfg.group_of(i)) < min_group:
        raise GroupTooSmall(f"client {i}: its group has {len(cfg.group_of(i))} client(s); this node requires "
                                f"{min_group} or more: refused")  # fmt: skip


def client_masked_input(
    keys: NodeKeys,
    cfg: RoundConfig,
    peer_keys: Mapping[int, tuple[bytes, bytes]],
    x: np.ndarray,
    min_group: int = 1,
    signer: Signer | None = None,
    adverts: Mapping[int, bytes] | None = None,
) -> MaskedInput:
    """The train step: mask ``x`` and share this round's secrets; at most once per (session, round). Under the
    malicious threat every neighbour's keys must come with its member's signature (``adverts``)."""
    i = keys.id
    check_round(keys, cfg, min_group, signer)
    _check_peer_keys(cfg, i, peer_keys)
    if signer is not None:
        check_adverts(cfg, signer, peer_keys, adverts or {}, keys)
    x = np.asarray(x)
    if x.dtype != cfg.dtype or x.shape != (cfg.size,):
        raise ProtocolViolation(f"input must be {cfg.dtype.__name__} of shape ({cfg.size},), got {x.dtype} {x.shape}")
    seed = os.urandom(KEY_BYTES)
    pairs = {j: _pair_seed(cfg, keys.s_key, peer_keys[j][1], i, j) for j in sorted(cfg.neighbours[i])}
    y = x.copy()
    add_keystream(_self_mask_key(cfg, seed, i), y)  # unsigned arithmetic wraps: exactly mod 2^k
    for j, p in pairs.items():
        add_keystream(p, y, subtract=i > j)
    holders, labels = cfg.holders(i), cfg.labels(i)
    secrets = {B_LABEL: seed, **pairs}
    shares = {label: shamir.split(secrets[label], holders, cfg.threshold) for label in labels}
    peer_c = {**{j: k[0] for j, k in peer_keys.items()}, i: keys.public()[0]}
    cts, commits = {}, []
    for h in holders:
        entries = b"".join(struct.pack(">I", lb) + shares[lb][h] for lb in labels)
        plain = struct.pack(">III", i, h, len(labels)) + entries
        nonce = os.urandom(NONCE_BYTES)
        aead = ChaCha20Poly1305(_share_key(cfg, keys.c_key, peer_c[h], i, h))
        cts[h] = nonce + aead.encrypt(nonce, plain, cfg.context("share-ad", i, h))
        commits += [commitment(cfg, i, lb, h, shares[lb][h]) for lb in labels]
    keys.last_round, keys.open_round, keys.signed, keys.masked = cfg.round, cfg.round, None, cfg.digest
    keys.groups.update({j: cfg.group_of(j) for j in cfg.clients})
    return MaskedInput(y, cts, b"".join(commits))


def client_unmask(
    keys: NodeKeys,
    cfg: RoundConfig,
    peer_keys: Mapping[int, tuple[bytes, bytes]],
    survivors: Sequence[int],
    ciphertexts: Mapping[int, bytes],
    signer: Signer | None = None,
    signatures: Mapping[int, bytes] | None = None,
) -> tuple[dict[tuple[int, int], bytes], list[int]]:
    """The unmask step, once per round: ({(owner, label): share} for what the survivors' sum needs, the owners
    whose shares failed authentication). A bad ciphertext costs only its owner's shares from this node. Under
    the malicious threat only for the survivors this node signed, with ``cfg.signers`` signatures of them."""
    i = keys.id
    if keys.open_round != cfg.round or cfg.session != keys.session or keys.masked != cfg.digest:
        raise StageError(f"client {i}: no masked input of this round {cfg.round} and configuration to unmask")
    if cfg.malicious:
        if signer is None:
            raise StageError(f"client {i}: a round of the malicious threat is unmasked only with a signer")
        check_survivors(keys, cfg, signer, survivors, signatures or {})
    alive = set(survivors)
    if len(alive) != len(survivors) or not alive <= set(cfg.neighbours):
        raise ProtocolViolation(f"client {i}: the survivor list names unknown or repeated clients")
    if i not in alive:
        raise ProtocolViolation(f"client {i}: the survivor list omits this client; refusing to reveal anything")
    if len(alive) < cfg.threshold:
        raise TooFewSurvivors(f"client {i}: {len(alive)} inputs arrived, threshold {cfg.threshold}: refusing")
    if not cfg.whole_groups(alive):
        split = next(cfg.group_of(j) for j in sorted(alive) if not set(cfg.group_of(j)) <= alive)
        raise ProtocolViolation(f"client {i}: the survivor list holds part of the group {list(split)}; only whole "
                                "groups are summed: refusing to reveal anything")  # fmt: skip
    _check_peer_keys(cfg, i, peer_keys)
    peer_c = {**{j: k[0] for j, k in peer_keys.items()}, i: keys.public()[0]}
    keys.open_round = None  # one unmask per round, whatever happens next
    for owner in ciphertexts:
        if owner not in peer_c or owner not in alive:
            raise ProtocolViolation(f"client {i}: got shares of client {owner}, not a surviving neighbour or itself")
        cfg.check_safe_threshold(owner)
        if len(alive & set(cfg.holders(owner))) < cfg.threshold:
            raise TooFewSurvivors(f"client {i}: fewer than {cfg.threshold} holders of client {owner} survived")
    out: dict[tuple[int, int], bytes] = {}
    bad = []
    for owner, ct in sorted(ciphertexts.items()):
        try:
            shares = _open(cfg, keys, peer_c[owner], owner, ct)
        except ShareAuthError:
            bad.append(owner)
            continue
        for label, share in shares.items():
            if label == B_LABEL or label not in alive:  # b of a survivor; a pair seed with a dropped neighbour
                out[owner, label] = share
    return out, bad


def _open(cfg: RoundConfig, keys: NodeKeys, owner_c: bytes, owner: int, ct: bytes) -> dict[int, bytes]:
    i = keys.id
    if not isinstance(ct, bytes) or len(ct) < NONCE_BYTES + 12:
        raise ShareAuthError(f"client {i}: the shares of client {owner} are malformed")
    aead = ChaCha20Poly1305(_share_key(cfg, keys.c_key, owner_c, owner, i))
    try:
        plain = aead.decrypt(ct[:NONCE_BYTES], ct[NONCE_BYTES:], cfg.context("share-ad", owner, i))
    except InvalidTag:
        raise ShareAuthError(
            f"client {i}: the shares of client {owner} failed authentication (tampered, replayed or misaddressed)"
        ) from None
    labels = cfg.labels(owner)
    if plain[:12] != struct.pack(">III", owner, i, len(labels)) or len(plain) != 12 + len(labels) * _ENTRY:
        raise ShareAuthError(f"client {i}: the shares of client {owner} name another sender, receiver or layout")
    out = {}
    for n, label in enumerate(labels):
        entry = plain[12 + n * _ENTRY : 12 + (n + 1) * _ENTRY]
        if struct.unpack(">I", entry[:4])[0] != label:
            raise ShareAuthError(f"client {i}: the shares of client {owner} are not of this round's secrets")
        out[label] = entry[4:]
    return out
