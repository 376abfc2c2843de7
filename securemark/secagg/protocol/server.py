"""The server stages of a round, over its state ``ServerRound``: take masked inputs (checked whole before any is
kept), fix the survivors S, route each holder its sealed shares, check revealed shares against their
commitments, and rebuild the seeds that turn the masked sum over S into the plain sum."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from securemark.prg import add_keystream
from securemark.secagg import shamir
from securemark.secagg.protocol.client import _ENTRY, NONCE_BYTES, MaskedInput
from securemark.secagg.protocol.config import B_LABEL, RoundConfig
from securemark.secagg.protocol.derive import COMMIT_BYTES, _self_mask_key, commitment
from securemark.secagg.protocol.errors import BadOwner, ProtocolViolation, StageError, TooFewSurvivors


def _check_sender(known: Collection[int], sender: int, what: str) -> None:
    if sender not in known:
        raise ProtocolViolation(f"{what} from unknown or unexpected client {sender!r}")


@dataclass
class ServerRound:
    cfg: RoundConfig
    masked_sum: np.ndarray | None = field(default=None, repr=False)  # running sum of masked inputs only
    inputs: set[int] = field(default_factory=set)  # the clients whose input arrived; S once closed
    waiting: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # inputs of groups not yet whole
    routed: dict[int, dict[int, bytes]] = field(default_factory=dict, repr=False)  # holder -> owner -> ciphertext
    commits: dict[int, bytes] = field(default_factory=dict, repr=False)  # owner -> commitments
    shares: dict[tuple[int, int], dict[int, bytes]] = field(default_factory=dict, repr=False)  # (owner,label)->h->
    answered: set[int] = field(default_factory=set)
    closed: bool = False
    rejected: list[str] = field(default_factory=list)  # shares that failed their commitment, with the holder
    complaints: dict[int, set[int]] = field(default_factory=dict)  # owner -> holders that could not open its shares


def server_receive_masked(st: ServerRound, sender: int, m: MaskedInput) -> None:
    """A train reply: checked completely before anything is kept, so a malformed one changes nothing."""
    cfg = st.cfg
    if st.closed:
        raise StageError(f"masked input from {sender} after the survivors were fixed (late: not counted)")
    _check_sender(cfg.neighbours, sender, "masked input")
    if sender in st.inputs:
        raise ProtocolViolation(f"duplicate masked input from client {sender}")
    y = m.y
    if not isinstance(y, np.ndarray) or y.dtype != cfg.dtype or y.shape != (cfg.size,):
        got = f"{getattr(y, 'dtype', type(y).__name__)} {getattr(y, 'shape', '')}"
        raise ProtocolViolation(f"masked input from {sender} must be {cfg.dtype.__name__} ({cfg.size},), got {got}")
    holders, labels = cfg.holders(sender), cfg.labels(sender)
    size = NONCE_BYTES + 12 + len(labels) * _ENTRY + 16
    if set(m.ciphertexts) != set(holders) or any(
        not isinstance(c, bytes) or len(c) != size for c in m.ciphertexts.values()
    ):
        raise ProtocolViolation(f"client {sender} must send one {size}-byte ciphertext per holder {list(holders)}")
    if not isinstance(m.commitments, bytes) or len(m.commitments) != len(holders) * len(labels) * COMMIT_BYTES:
        raise ProtocolViolation(f"client {sender} sent commitments of the wrong size")
    st.inputs.add(sender)
    st.commits[sender] = m.commitments
    for h, ct in m.ciphertexts.items():
        st.routed.setdefault(h, {})[sender] = ct
    st.waiting[sender] = y
    group = cfg.group_of(sender)
    if set(group) <= st.inputs:  # a whole group joins the sum; a group never whole stays out of it
        for j in group:
            if st.masked_sum is None:
                st.masked_sum = st.waiting.pop(j).copy()
            else:
                st.masked_sum += st.waiting.pop(j)


def server_close_inputs(st: ServerRound) -> tuple[int, ...]:
    """Fix S, the clients of the groups whose every input arrived (later inputs are refused; a client whose
    group is not whole counts as dropped); below the threshold the round fails loudly."""
    whole = {i for i in st.inputs if i not in st.waiting}
    if len(whole) < st.cfg.threshold:
        part = f" ({len(st.inputs) - len(whole)} more of groups not whole)" if st.waiting else ""
        raise TooFewSurvivors(f"{len(whole)} masked inputs arrived{part}, threshold is {st.cfg.threshold}")
    st.closed, st.inputs = True, whole
    st.waiting.clear()
    return tuple(sorted(st.inputs))


def server_shares_for(st: ServerRound, holder: int) -> dict[int, bytes]:
    """The unmask request of ``holder``: ciphertexts addressed to it by survivors."""
    return {o: ct for o, ct in st.routed.get(holder, {}).items() if o in st.inputs}


def server_receive_unmask(
    st: ServerRound, sender: int, reveals: Mapping[tuple[int, int], bytes], bad: Collection[int] = ()
) -> None:
    """An unmask reply. A share that fails its commitment is dropped and recorded; the rest are kept. ``bad``:
    owners whose ciphertexts this holder could not open (recorded: an owner that cannot be rebuilt and has
    complaints is named in the error)."""
    cfg = st.cfg
    if not st.closed:
        raise StageError(f"unmask reply from {sender} before the survivors were fixed")
    _check_sender(st.inputs, sender, "unmask reply")
    if sender in st.answered:
        raise ProtocolViolation(f"duplicate unmask reply from client {sender}")
    for owner, label in reveals:
        if owner not in st.inputs or sender not in cfg.holders(owner) or label not in cfg.labels(owner):
            raise ProtocolViolation(f"client {sender} revealed a share ({owner}, {label}) it cannot hold")
        if label != B_LABEL and label in st.inputs:
            raise ProtocolViolation(f"client {sender} revealed the pair seed of two survivors ({owner}, {label})")
    st.answered.add(sender)
    for owner in bad:
        if owner in st.inputs:
            st.complaints.setdefault(owner, set()).add(sender)
    for (owner, label), share in reveals.items():
        pos = cfg.holders(owner).index(sender) * len(cfg.labels(owner)) + cfg.labels(owner).index(label)
        expected = st.commits[owner][pos * COMMIT_BYTES : (pos + 1) * COMMIT_BYTES]
        if not isinstance(share, bytes) or commitment(cfg, owner, label, sender, share) != expected:
            st.rejected.append(f"share ({owner}, {label}) from client {sender} fails its commitment")
            st.complaints.setdefault(owner, set()).add(sender)  # the owner's commitment, or this holder, is bad
            continue
        st.shares.setdefault((owner, label), {})[sender] = share


def server_sum(st: ServerRound) -> np.ndarray:
    """The sum over S: survivors' self masks and their pair masks with dropped neighbours removed."""
    cfg = st.cfg
    if not st.closed or st.masked_sum is None:
        raise StageError("the survivors are not fixed yet")
    total = st.masked_sum.copy()
    for i in sorted(st.inputs):
        if len(st.shares.get((i, B_LABEL), {})) < cfg.threshold and len(st.complaints.get(i, ())) >= cfg.threshold:
            # t holders (more than half of its holders) could not open them, or sent shares its own commitments
            # refuse: fewer than t cannot frame it
            raise BadOwner(i, f"{len(st.complaints[i])} holders could not open the shares of client {i} or match "
                              "them to its commitments")  # fmt: skip
        seed = _rebuild(i, st.shares.get((i, B_LABEL), {}), cfg.threshold, f"self-mask seed of client {i}")
        add_keystream(_self_mask_key(cfg, seed, i), total, subtract=True)
        for j in sorted(set(cfg.neighbours[i]) - st.inputs):  # i added sign(i, j) PRG(p_ij); take it out
            p = _rebuild(i, st.shares.get((i, j), {}), cfg.threshold, f"pair seed of clients {i} and {j}")
            add_keystream(p, total, subtract=i < j)
    return total


def _rebuild(owner: int, shares: Mapping[int, bytes], threshold: int, what: str) -> bytes:
    if len(shares) < threshold:
        raise TooFewSurvivors(f"cannot rebuild the {what}: {len(shares)} good shares arrived, threshold {threshold}")
    try:
        return shamir.combine(shares, threshold)
    except shamir.ShareError as exc:  # every share matched the owner's own commitment: the owner dealt them badly
        raise BadOwner(owner, f"cannot rebuild the {what}: {exc} (client {owner} shared inconsistent values)") from None
