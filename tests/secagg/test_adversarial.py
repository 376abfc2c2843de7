"""Tampering, replay, misaddressing, bad keys and vectors, lying servers, and what the server ever holds."""

import itertools

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from securemark.secagg import protocol as P
from securemark.secagg.driver import Session, run_round

IDS = (1, 2, 3, 4, 5)
LOW_ORDER = [bytes(32), (1).to_bytes(32, "little"), ((1 << 255) - 19 - 1).to_bytes(32, "little")]


def x_of(i, size=5):
    return np.full(size, 1000 * i, dtype=np.uint64)


def masked_round(round_no=1, session=None, threshold=3):
    """Every client of IDS masked its input; the server holds the replies, survivors not fixed."""
    session = session or Session("adv")
    cfg = P.RoundConfig("adv", round_no, P.complete_graph(IDS), threshold=threshold, size=5)
    for i in IDS:
        if i not in session.nodes:
            session.join(i)
    srv = P.ServerRound(cfg)
    replies = {i: P.client_masked_input(session.nodes[i], cfg, session.server.for_client(cfg, i), x_of(i)) for i in IDS}
    return session, cfg, srv, replies


def unmask(session, cfg, srv, i, survivors, cts=None):
    cts = P.server_shares_for(srv, i) if cts is None else cts
    return P.client_unmask(session.nodes[i], cfg, session.server.for_client(cfg, i), survivors, cts)


def finish(session, cfg, srv, replies, tamper=None):
    for i, m in replies.items():
        P.server_receive_masked(srv, i, m)
    survivors = P.server_close_inputs(srv)
    for i in survivors:
        cts = P.server_shares_for(srv, i)
        if tamper:
            cts = tamper(i, cts)
        P.server_receive_unmask(srv, i, *unmask(session, cfg, srv, i, survivors, cts))
    return P.server_sum(srv)


def flip(ct: bytes, pos: int) -> bytes:
    return ct[:pos] + bytes([ct[pos] ^ 0x01]) + ct[pos + 1 :]


@pytest.mark.parametrize("pos", [0, 5, P.NONCE_BYTES, P.NONCE_BYTES + 40, -1])
def test_a_flipped_bit_costs_one_holders_shares_not_the_round(pos):
    session, cfg, srv, replies = masked_round()

    def tamper(holder, cts):
        return {o: flip(ct, pos) if (holder, o) == (2, 3) else ct for o, ct in cts.items()}

    np.testing.assert_array_equal(finish(session, cfg, srv, replies, tamper), sum(x_of(i) for i in IDS))
    assert srv.complaints == {3: {2}}


def test_shares_replayed_from_another_round_or_redirected_are_not_opened():
    session, _cfg1, srv1, replies1 = masked_round(1)
    _, cfg2, srv2, replies2 = masked_round(2, session)
    for srv, replies in ((srv1, replies1), (srv2, replies2)):
        for i, m in replies.items():
            P.server_receive_masked(srv, i, m)
    survivors = P.server_close_inputs(srv2)
    P.server_close_inputs(srv1)
    cts = P.server_shares_for(srv2, 2)
    cts[3] = P.server_shares_for(srv1, 2)[3]  # round 1's shares, replayed in round 2
    cts[4] = P.server_shares_for(srv2, 5)[4]  # 4's shares for 5, redirected to 2
    reveals, bad = unmask(session, cfg2, srv2, 2, survivors, cts)
    assert sorted(bad) == [3, 4] and {o for o, _ in reveals} == {1, 2, 5}


def test_an_owner_sending_garbage_ciphertexts_fails_the_round_and_is_named():
    session, cfg, srv, replies = masked_round()
    m = replies[4]
    replies[4] = P.MaskedInput(m.y, {h: bytes(len(ct)) for h, ct in m.ciphertexts.items()}, m.commitments)
    with pytest.raises(P.BadOwner) as err:
        finish(session, cfg, srv, replies)
    assert err.value.client == 4 and "client 4" in str(err.value)


def test_a_tampered_revealed_share_is_caught_by_its_commitment_and_costs_one_share():
    session, cfg, srv, replies = masked_round()
    for i, m in replies.items():
        P.server_receive_masked(srv, i, m)
    survivors = P.server_close_inputs(srv)
    for i in survivors:
        reveals, bad = unmask(session, cfg, srv, i, survivors)
        if i == 2:
            reveals = {k: flip(v, 30) for k, v in reveals.items()}
        P.server_receive_unmask(srv, i, reveals, bad)
    np.testing.assert_array_equal(P.server_sum(srv), sum(x_of(i) for i in IDS))
    assert len(srv.rejected) == 5 and all("from client 2" in r for r in srv.rejected)


@pytest.mark.parametrize(
    "bad",
    [np.zeros(4, np.uint64), np.zeros(6, np.uint64), np.zeros(5, np.float64), np.zeros(5, np.uint32), [0] * 5],
)
def test_bad_masked_vectors_are_rejected_and_nothing_is_kept(bad):
    session, cfg, srv, replies = masked_round()
    m = replies[1]
    with pytest.raises(P.ProtocolViolation, match="masked input from 1"):
        P.server_receive_masked(srv, 1, P.MaskedInput(bad, m.ciphertexts, m.commitments))
    for broken in (
        P.MaskedInput(m.y, {**m.ciphertexts, 9: b"x"}, m.commitments),
        P.MaskedInput(m.y, {h: ct[:-1] for h, ct in m.ciphertexts.items()}, m.commitments),
        P.MaskedInput(m.y, m.ciphertexts, m.commitments[:-1]),
        P.MaskedInput(m.y, m.ciphertexts, "not bytes"),
    ):
        with pytest.raises(P.ProtocolViolation, match="client 1"):
            P.server_receive_masked(srv, 1, broken)
    assert srv.inputs == set() and srv.masked_sum is None and not srv.routed  # nothing of the bad messages kept
    np.testing.assert_array_equal(finish(session, cfg, srv, replies), sum(x_of(i) for i in IDS))


@pytest.mark.parametrize("key", LOW_ORDER)
def test_low_order_duplicate_and_malformed_keys_are_refused_at_setup(key):
    srv = P.SessionKeys("keys")
    good = P.NodeKeys("keys", 1).public()
    with pytest.raises(P.ProtocolViolation, match="low-order"):
        srv.register(2, key, good[1])
    with pytest.raises(P.ProtocolViolation, match="low-order"):
        srv.register(2, good[0], key)
    srv.register(1, *good)
    with pytest.raises(P.ProtocolViolation, match="another client"):
        srv.register(2, good[0], P.NodeKeys("keys", 2).public()[1])
    with pytest.raises(P.ProtocolViolation, match="same key twice"):
        srv.register(3, good[0], good[0])
    for malformed in (b"short", "a string", None, bytes(33)):
        with pytest.raises(P.ProtocolViolation, match="32 bytes"):
            srv.register(3, malformed, good[1])
    assert set(srv.keys) == {1}


def test_a_client_refuses_an_unsafe_threshold_a_repeated_round_and_a_second_unmask():
    session = Session("adv")
    with pytest.raises(P.ProtocolViolation, match="unsafe"):
        masked_round(1, session, threshold=2)  # 2 of 5 holders: a lying server could rebuild both kinds of seed
    session, cfg, srv, replies = masked_round(2, session)
    with pytest.raises(P.StageError, match="not after round 2"):
        P.client_masked_input(session.nodes[1], cfg, session.server.for_client(cfg, 1), x_of(1))
    old = P.RoundConfig("adv", 1, cfg.neighbours, 3, 5)
    with pytest.raises(P.StageError, match="not after"):
        P.client_masked_input(session.nodes[1], old, session.server.for_client(cfg, 1), x_of(1))
    for i, m in replies.items():
        P.server_receive_masked(srv, i, m)
    survivors = P.server_close_inputs(srv)
    with pytest.raises(P.ProtocolViolation, match="omits this client"):
        unmask(session, cfg, srv, 1, (2, 3, 4, 5))
    with pytest.raises(P.TooFewSurvivors, match="refusing"):
        unmask(session, cfg, srv, 2, (1, 2))
    unmask(session, cfg, srv, 3, survivors)
    with pytest.raises(P.StageError, match="no masked input"):
        unmask(session, cfg, srv, 3, (3, 4, 5))  # a second list, to collect other shares: refused


def test_server_refuses_late_duplicate_and_out_of_order_messages():
    session, cfg, srv, replies = masked_round()
    with pytest.raises(P.ProtocolViolation, match="unknown"):
        P.server_receive_masked(srv, 99, replies[1])
    with pytest.raises(P.StageError, match="before the survivors"):
        P.server_receive_unmask(srv, 1, {})
    for i in (1, 2, 3, 4):
        P.server_receive_masked(srv, i, replies[i])
    with pytest.raises(P.ProtocolViolation, match="duplicate"):
        P.server_receive_masked(srv, 1, replies[1])
    survivors = P.server_close_inputs(srv)
    with pytest.raises(P.StageError, match="late"):
        P.server_receive_masked(srv, 5, replies[5])
    reveals, bad = unmask(session, cfg, srv, 1, survivors)
    with pytest.raises(P.ProtocolViolation, match="pair seed of two survivors"):
        P.server_receive_unmask(srv, 2, {(1, 3): bytes(66)})
    P.server_receive_unmask(srv, 1, reveals, bad)
    with pytest.raises(P.ProtocolViolation, match="duplicate"):
        P.server_receive_unmask(srv, 1, reveals, bad)


def test_a_late_arrival_stays_masked_by_its_self_mask():
    """Client 5's input arrives after the survivors are fixed: the server learns every pair seed of 5 with the
    survivors, but no share of b_5 is ever revealed, so y_5 minus everything revealed is still not x_5."""
    session, cfg, srv, replies = masked_round()
    late = replies.pop(5)
    total = finish(session, cfg, srv, replies)
    np.testing.assert_array_equal(total, sum(x_of(i) for i in (1, 2, 3, 4)))
    assert not any(owner == 5 for owner, _ in srv.shares)
    peeled = late.y.copy()
    for i in (1, 2, 3, 4):
        p = P.shamir.combine(srv.shares[i, 5], cfg.threshold)
        P.add_keystream(p, peeled, subtract=True)  # 5 > i: 5 subtracted PRG(p_i5); undo what the server can
    assert not np.array_equal(peeled, x_of(5))


def _reveal_sets(session, cfg, srv, target):
    """For each holder h and each survivor list a server could tell it, the (owner, label) pairs it reveals."""
    options = {}
    for h in IDS:
        others = [j for j in IDS if j not in (h, target)]
        lists = [
            tuple(sorted({h, target, *extra}))
            for n in range(len(others) + 1)
            for extra in itertools.combinations(others, n)
        ]
        options[h] = []
        for survivors in lists:
            session.nodes[h].open_round = cfg.round  # replay the same node in another possible world
            cts = {o: ct for o, ct in P.server_shares_for(srv, h).items() if o in survivors}
            try:
                reveals, _ = unmask(session, cfg, srv, h, survivors, cts)
            except P.SecAggError:
                continue
            options[h].append(set(reveals))
    return options


def test_a_server_telling_each_client_a_different_survivor_list_cannot_isolate_an_input():
    """Complete graph, 5 clients, t = 3: over every combination of survivor lists told to the 5 holders
    (each list naming the target; a holder refuses lists it must refuse), the server never collects t shares
    of b_1 and of every pair seed of client 1 (from 1's sharing or its peer's)."""
    session, cfg, srv, replies = masked_round()
    for i, m in replies.items():
        P.server_receive_masked(srv, i, m)
    P.server_close_inputs(srv)
    target, t = 1, cfg.threshold
    options = _reveal_sets(session, cfg, srv, target)
    assert all(options[h] for h in IDS)
    combos = 0
    for choice in itertools.product(*(options[h] for h in IDS)):
        combos += 1
        count: dict[tuple[int, int], int] = {}
        for revealed in choice:
            for key in revealed:
                count[key] = count.get(key, 0) + 1
        if count.get((target, P.B_LABEL), 0) < t:
            continue
        isolated = all(max(count.get((target, k), 0), count.get((k, target), 0)) >= t for k in IDS if k != target)
        assert not isolated, "a lying server collected every mask of one client"
    assert combos > 1000


def _arrays(obj, seen=None):
    """Every numpy array reachable from obj's attributes and containers."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays(v, seen)
    elif isinstance(obj, list | tuple | set):
        for v in obj:
            yield from _arrays(v, seen)
    elif hasattr(obj, "__dict__"):
        yield from _arrays(vars(obj), seen)


def test_server_never_holds_an_individual_unmasked_vector_across_rounds(monkeypatch):
    """After every server step of three rounds (one with a dropout before masking, one at unmask), nothing in
    its state equals a client's input or a partial sum of up to three inputs; it ends with the sum only."""
    session = Session("priv")
    rng = np.random.default_rng(0)
    checks = []
    for r, drop in enumerate(({"unmask": {5}}, {"masked": {2}}, {}), start=1):
        cfg = P.RoundConfig("priv", r, P.complete_graph(IDS), 3, 64)
        x = {i: rng.integers(0, 2**63, 64, dtype=np.uint64) for i in IDS}
        sent = [i for i in IDS if i not in drop.get("masked", ())]
        forbidden = [sum(x[i] for i in subset) for n in (1, 2, 3) for subset in itertools.combinations(sent, n)]
        srv = P.ServerRound(cfg)

        def scan(srv=srv, forbidden=forbidden):
            for arr in _arrays(srv):
                assert not any(np.array_equal(arr, f) for f in forbidden), "server held an unmasked vector"
            checks.append(1)

        with monkeypatch.context() as m:
            for name in [n for n in dir(P) if n.startswith("server_")]:
                original = getattr(P, name)

                def spied(*args, _original=original, _scan=scan, **kwargs):
                    out = _original(*args, **kwargs)
                    _scan()
                    return out

                m.setattr(P, name, spied)
            result = run_round(session, cfg, x, drop, server=srv)
        np.testing.assert_array_equal(result.total, sum(x[i] for i in sent))
        assert srv.masked_sum is not None and not np.array_equal(srv.masked_sum, result.total)
    assert len(checks) > 3 * 2 * len(IDS)  # every server step of every round was inspected


def test_a_node_key_is_never_in_what_it_sends():
    session, _cfg, _srv, replies = masked_round()
    secrets = [P.private_bytes(k) for n in session.nodes.values() for k in (n.c_key, n.s_key)]
    for m in replies.values():
        wire = m.y.tobytes() + m.commitments + b"".join(m.ciphertexts.values())
        assert not any(s in wire for s in secrets)
    assert isinstance(session.nodes[1].c_key, X25519PrivateKey)


def test_an_owner_dealing_inconsistent_shares_is_named_and_fewer_than_t_complaints_frame_nobody():
    session, cfg, srv, replies = masked_round()
    holders = cfg.holders(4)
    # owner 4 re-deals its b-share for holder 5 from another polynomial, and commits to it: a consistent lie
    m = replies[4]
    for i, r in replies.items():
        P.server_receive_masked(srv, i, r if i != 4 else m)
    survivors = P.server_close_inputs(srv)
    for i in survivors:
        reveals, bad = unmask(session, cfg, srv, i, survivors)
        if i == 1:
            bad = [2, 3]  # a false complaint about honest owners 2 and 3: one holder is fewer than t
        P.server_receive_unmask(srv, i, reveals, bad)
    forged = P.shamir.split(bytes(32), holders, cfg.threshold)[5]
    srv.shares[4, P.B_LABEL] = {h: forged if h in (1, 5) else s for h, s in srv.shares[4, P.B_LABEL].items()}
    with pytest.raises(P.BadOwner) as err:
        P.server_sum(srv)
    assert err.value.client == 4 and srv.complaints == {2: {1}, 3: {1}}


def test_non_canonical_key_encodings_are_refused():
    srv = P.SessionKeys("keys")
    c, s = P.NodeKeys("keys", 1).public()
    srv.register(1, c, s)
    with pytest.raises(P.ProtocolViolation, match="canonical"):
        srv.register(2, c[:31] + bytes([c[31] | 0x80]), P.NodeKeys("keys", 2).public()[1])
    with pytest.raises(P.ProtocolViolation, match="canonical"):
        srv.register(2, b"\xff" * 32, P.NodeKeys("keys", 2).public()[1])


def test_an_owner_whose_shares_its_own_commitments_refuse_is_named_not_the_holders():
    """Client 3 commits to random values: every holder's share of it fails, the round cannot rebuild its
    self-mask, and the owner is named (BadOwner), so the server refuses it instead of failing every round."""
    session, cfg, srv, replies = masked_round()
    m = replies[3]
    replies[3] = P.MaskedInput(m.y, m.ciphertexts, bytes(len(m.commitments)))
    with pytest.raises(P.BadOwner) as named:
        finish(session, cfg, srv, replies)
    assert named.value.client == 3
