"""The malicious-server threat (secagg.protocol.signing): a server that swaps keys, makes members up, shows nodes
different survivor lists or configurations, asks for both share kinds of one node, or replays a round."""

import dataclasses
import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from securemark.secagg import protocol as P
from securemark.secagg.driver import Session, run_round
from securemark.secagg.roster import Roster

SIZE = 6


def x_of(i):
    return np.full(SIZE, 1000 * i, dtype=np.uint64)


def signers_for(n):
    return max(n // 2 + 1, math.ceil(2 * n / 3))


def session_of(n, name="mal", signers=None):
    """A session of n nodes; ``signers``: the roster members of an earlier session (another run, same roster)."""
    ids = list(range(1, n + 1))
    s = Session(name, signers=signers) if signers else Session.signing(name, ids)
    for i in ids:
        s.join(i)
    return s


def config(s, round_no=1, encoding=b"", signers=0, train=bytes(32)):
    ids = tuple(sorted(s.nodes))
    t = len(ids) // 2 + 1
    return P.RoundConfig(s.name, round_no, P.complete_graph(ids), t, SIZE, 64, encoding, (),
                         *s.signed(ids, t, train, signers))  # fmt: skip


def mask_all(s, cfgs, srv):
    """Every node masks under the configuration it was told (``cfgs``: client -> config)."""
    for i, cfg in cfgs.items():
        keys, adverts = s.server.for_client(cfg, i), s.server.adverts_for(cfg, i)
        P.server_receive_masked(srv, i, P.client_masked_input(s.nodes[i], cfg, keys, x_of(i), 1, s.signers[i], adverts))
    return P.server_close_inputs(srv)


def unmask(s, cfg, srv, i, survivors, signatures):
    keys, shares = s.server.for_client(cfg, i), P.server_shares_for(srv, i)
    shares = {o: ct for o, ct in shares.items() if o in survivors}  # the shares of the list's owners
    return P.client_unmask(s.nodes[i], cfg, keys, survivors, shares, s.signers[i], signatures)


# --- honest rounds ---------------------------------------------------------------------------------------------
def test_a_signed_round_sums_exactly_with_drops_before_and_after_signing():
    n = 12
    s = session_of(n)
    cfg = config(s)  # signers: 8 of 12
    drop = {"masked": {3}, "sign": {5}, "unmask": {7}}  # 5 signed nothing yet is summed: its input arrived
    res = run_round(s, cfg, {i: x_of(i) for i in s.nodes}, drop)
    assert 5 in res.survivors and 3 not in res.survivors
    np.testing.assert_array_equal(res.total, sum(x_of(i) for i in s.nodes if i != 3))


def test_a_signed_round_takes_the_complete_graph_and_two_thirds_of_its_clients_signatures():
    """A server choosing a sparse graph could give a node one neighbour that works with it (an attack review
    read a node through one colluder and a threshold of 2); one choosing a bare majority of signatures let one
    colluder pass two survivor lists."""
    s = session_of(21)
    ids = tuple(range(1, 22))
    graph, t = P.neighbour_graph(ids, "sparse", np.random.default_rng(0))
    with pytest.raises(ValueError, match="complete graph"):
        P.RoundConfig(s.name, 1, graph, t, SIZE, 64, b"", (), *s.signed(ids, t))
    with pytest.raises(ValueError, match=r"signers 11 must lie in \[14, 21\]"):
        config(s, signers=11)
    assert config(s).signers == 14


def test_too_few_signatures_end_the_round_before_anything_is_revealed():
    s = session_of(6)
    cfg = config(s)  # signers: 4 of 6
    with pytest.raises(P.TooFewSurvivors):
        run_round(s, cfg, {i: x_of(i) for i in s.nodes}, {"sign": {1, 2, 3}})
    assert all(s.nodes[i].open_round == 1 for i in s.nodes)  # nobody unmasked


# --- keys ------------------------------------------------------------------------------------------------------
def _swap(keys, j, which):
    c, sk = keys[j]
    fake = P.public_bytes(X25519PrivateKey.generate())
    return {**keys, j: (fake, sk) if which == "c" else (c, fake)}


@pytest.mark.parametrize("which", ["c", "s"])
def test_a_swapped_public_key_is_refused_before_the_node_masks(which):
    s = session_of(5)
    cfg = config(s)
    keys, adverts = _swap(s.server.for_client(cfg, 1), 2, which), s.server.adverts_for(cfg, 1)
    with pytest.raises(P.SignatureError, match="other session keys"):  # the round names the true key
        P.client_masked_input(s.nodes[1], cfg, keys, x_of(1), 1, s.signers[1], adverts)
    lie = dataclasses.replace(cfg, keys=tuple((i, *keys[i]) if i == 2 else (i, c, k) for i, c, k in cfg.keys))
    with pytest.raises(P.SignatureError, match=r"keys of client 2 .* not signed"):  # the round names the swap too
        P.client_masked_input(s.nodes[1], lie, keys, x_of(1), 1, s.signers[1], adverts)
    assert s.nodes[1].open_round is None  # nothing masked, nothing shared


def test_an_advert_of_another_session_or_client_is_refused():
    s, other = session_of(5), session_of(5, "other")
    cfg = config(s)
    for stale in (other.server.adverts_for(cfg, 1), {2: s.server.adverts[3][1], **{j: s.server.adverts[j][1]
                                                                                   for j in (3, 4, 5)}}):  # fmt: skip
        keys = {**s.server.for_client(cfg, 1)}
        if stale is other.server.adverts_for(cfg, 1):
            keys = other.server.for_client(cfg, 1)  # another session's keys with their own signatures
        with pytest.raises(P.SignatureError):
            P.client_masked_input(s.nodes[1], cfg, keys, x_of(1), 1, s.signers[1], stale)


def test_members_are_distinct_and_from_the_nodes_own_roster():
    s = session_of(5)
    cfg = config(s)
    with pytest.raises(ValueError, match="distinct"):
        dataclasses.replace(cfg, members=((1, "m1"), (2, "m1"), (3, "m3"), (4, "m4"), (5, "m5")))
    made_up = dataclasses.replace(cfg, members=((1, "m1"), (2, "m2"), (3, "m3"), (4, "m4"), (5, "eve")))
    with pytest.raises(P.SignatureError, match="not in this node's roster"):
        P.check_round(s.nodes[1], made_up, 1, s.signers[1])
    renamed = dataclasses.replace(cfg, members=((1, "m2"), (2, "m1"), (3, "m3"), (4, "m4"), (5, "m5")))
    with pytest.raises(P.SignatureError, match="names it 'm2'"):
        P.check_round(s.nodes[1], renamed, 1, s.signers[1])
    with pytest.raises(P.ProtocolViolation, match="signs as 'm2'"):  # the server refuses one member twice
        s.server.register(1, *P.NodeKeys(s.name, 1).public(), ("m2", bytes(64)))


def test_a_signing_node_refuses_an_unsigned_round_and_an_unsigned_node_a_signed_one():
    s = session_of(5)
    plain = P.RoundConfig(s.name, 1, P.complete_graph(tuple(range(1, 6))), 3, SIZE)
    with pytest.raises(P.SignatureError, match="without signatures"):
        P.check_round(s.nodes[1], plain, 1, s.signers[1])
    with pytest.raises(P.StageError, match="no signing key"):
        P.check_round(s.nodes[1], config(s), 1, None)


def test_a_round_under_another_roster_is_refused():
    s = session_of(5)
    rotated = Roster({**s.signers[2].roster.members, "m9": bytes(range(32))})
    with pytest.raises(P.SignatureError, match="another roster"):
        P.check_round(s.nodes[1], dataclasses.replace(config(s), roster=rotated.digest), 1, s.signers[1])


def test_signatures_of_another_run_never_count():
    """Run 2 reuses run 1's session name, ids and roster; its nodes hold fresh session keys, which the round
    names, so run 1's signatures (Ed25519 signs alike twice) verify against nothing in run 2."""
    run1 = session_of(5, "same")
    cfg1 = config(run1)
    srv1 = P.ServerRound(cfg1)
    survivors = mask_all(run1, {i: cfg1 for i in run1.nodes}, srv1)
    old = {i: P.sign_survivors(run1.nodes[i], cfg1, run1.signers[i], survivors) for i in run1.nodes}
    run2 = session_of(5, "same", signers=run1.signers)
    cfg2 = config(run2)
    assert cfg2.digest != cfg1.digest
    srv2 = P.ServerRound(cfg2)
    survivors2 = mask_all(run2, {i: cfg2 for i in run2.nodes}, srv2)
    for i in run2.nodes:
        P.sign_survivors(run2.nodes[i], cfg2, run2.signers[i], survivors2)
        with pytest.raises(P.SignatureError, match="0 valid signatures"):
            unmask(run2, cfg2, srv2, i, survivors2, old)
    with pytest.raises(P.SignatureError, match="other session keys"):  # run 1's configuration sent in run 2
        P.client_masked_input(run2.nodes[1], dataclasses.replace(cfg1, round=2), run2.server.for_client(cfg1, 1),
                              x_of(1), 1, run2.signers[1], run2.server.adverts_for(cfg1, 1))  # fmt: skip


def test_a_node_signs_and_unmasks_only_for_the_configuration_it_masked_under():
    s = session_of(5)
    cfg = config(s)
    survivors = mask_all(s, {i: cfg for i in s.nodes}, P.ServerRound(cfg))
    other = config(s, encoding=b"B" * 32)
    with pytest.raises(P.StageError, match="configuration"):
        P.sign_survivors(s.nodes[1], other, s.signers[1], survivors)
    with pytest.raises(P.StageError, match="configuration"):
        P.client_unmask(s.nodes[1], other, s.server.for_client(other, 1), survivors, {}, s.signers[1], {})


# --- survivor lists --------------------------------------------------------------------------------------------
def test_a_node_signs_one_survivor_list_a_round():
    s = session_of(5)
    cfg = config(s)
    survivors = mask_all(s, {i: cfg for i in s.nodes}, P.ServerRound(cfg))
    sig = P.sign_survivors(s.nodes[1], cfg, s.signers[1], survivors)
    assert P.sign_survivors(s.nodes[1], cfg, s.signers[1], survivors) is not None  # the same list again: fine
    assert isinstance(sig, bytes) and len(sig) == 64
    with pytest.raises(P.SignatureError, match="signed survivors"):
        P.sign_survivors(s.nodes[1], cfg, s.signers[1], [1, 2, 3, 4])


def _split_attack(n, lists, corrupt):
    """A server that shows each node one of ``lists`` (node -> its list) and signs both lists itself with the
    keys of ``corrupt`` members; then asks every node to unmask with each list and every signature of it.
    Returns the lists some node revealed shares for."""
    s = session_of(n)
    cfg = config(s)
    srv = P.ServerRound(cfg)
    survivors = mask_all(s, {i: cfg for i in s.nodes}, srv)
    assert list(survivors) == list(range(1, n + 1))
    sigs: dict[tuple, dict[int, bytes]] = {}
    for i in s.nodes:
        if i in corrupt:
            for lst in set(lists.values()):  # a member working with the server signs anything
                sigs.setdefault(lst, {})[i] = s.signers[i].sign(P.survivors_statement(cfg, lst))
        else:
            try:
                sigs.setdefault(lists[i], {})[i] = P.sign_survivors(s.nodes[i], cfg, s.signers[i], lists[i])
            except P.ProtocolViolation:  # a list that omits the node itself: it signs nothing
                assert i not in lists[i]
    opened = set()
    for i in s.nodes:
        if i in corrupt:
            continue
        for lst in set(lists.values()):
            keys = s.nodes[i]
            saved = (keys.open_round, keys.signed)
            try:
                unmask(s, cfg, srv, i, list(lst), sigs.get(lst, {}))
                opened.add(lst)
            except P.SecAggError:
                pass
            keys.open_round, keys.signed = saved  # try the other list too (a node answers one unmask: worst case)
    return opened


def test_both_share_kinds_of_one_node_never_go_out():
    """Node 5 in the list half the nodes see (its b_5 shares), dropped in the other's (its pair seeds): neither
    list gathers the signatures a node needs, so nobody reveals either kind."""
    n = 6
    full, without = tuple(range(1, 7)), tuple(range(1, 6))
    lists = {i: full if i <= 3 else without for i in range(1, 7)}
    assert _split_attack(n, lists, corrupt=set()) == set()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(4, 9), data=st.data())
def test_two_lists_both_pass_only_with_2m_minus_n_members_working_with_the_server(n, data):
    """The bound the docstring states, both ways: with c < 2m - n corrupt members no split of the honest
    nodes lets two lists through; with c = 2m - n some split does."""
    m = signers_for(n)
    c = data.draw(st.integers(0, max(0, 2 * m - n - 1)))
    corrupt = set(data.draw(st.permutations(range(1, n + 1)))[:c])
    a, b = tuple(range(1, n + 1)), tuple(range(1, n))  # node n dropped in b
    side = {i: data.draw(st.booleans()) for i in range(1, n + 1)}
    lists = {i: a if side[i] else b for i in range(1, n + 1)}
    for i in corrupt:
        lists[i] = a
    assert len(_split_attack(n, lists, corrupt)) <= 1


def test_the_bound_is_exact_2m_minus_n_corrupt_members_expose_an_honest_node():
    """n = 7, m = 5: with 3 members working with the server, honest node 7 is in list a (shown to 4 and 7, whose
    holders then reveal its b_7 shares) and dropped from list b (shown to 5 and 6, who reveal its pair seeds)."""
    n = 7
    assert signers_for(n) == 5
    corrupt = {1, 2, 3}
    a, b = tuple(range(1, 8)), tuple(range(1, 7))
    lists = {1: a, 2: a, 3: a, 4: a, 7: a, 5: b, 6: b}
    assert _split_attack(n, lists, corrupt) == {a, b}


# --- configurations --------------------------------------------------------------------------------------------
def test_a_node_told_other_parameters_refuses_and_its_input_stays_padded():
    """Node 5 gets another encoding (other ranges, bits or weight cap: ``encoding`` is their digest). It signs
    another configuration, finds no quorum of its own and reveals nothing; the others reveal for theirs, but
    node 5's shares were sealed under its configuration, so its self-mask is never rebuilt."""
    s = session_of(5)
    cfg, other = config(s, encoding=b"A" * 32), config(s, encoding=b"B" * 32)
    srv = P.ServerRound(cfg)
    survivors = mask_all(s, {i: other if i == 5 else cfg for i in s.nodes}, srv)
    sigs = {i: P.sign_survivors(s.nodes[i], other if i == 5 else cfg, s.signers[i], survivors) for i in s.nodes}
    with pytest.raises(P.SignatureError, match="1 valid signatures"):
        unmask(s, other, srv, 5, survivors, sigs)
    for i in range(1, 5):
        reveals, bad = unmask(s, cfg, srv, i, survivors, sigs)
        assert bad == [5]  # node 5's shares do not open under this configuration
        assert all(owner != 5 for owner, _ in reveals)
        P.server_receive_unmask(srv, i, reveals, bad)
    with pytest.raises(P.BadOwner):
        P.server_sum(srv)


def test_with_the_nodes_split_evenly_between_two_configurations_every_node_refuses():
    s = session_of(6)
    a, b = config(s, encoding=b"A" * 32), config(s, encoding=b"B" * 32)
    told = {i: a if i <= 3 else b for i in s.nodes}
    srv = P.ServerRound(a)
    survivors = mask_all(s, told, srv)
    sigs = {i: P.sign_survivors(s.nodes[i], told[i], s.signers[i], survivors) for i in s.nodes}
    for i in s.nodes:
        with pytest.raises(P.SignatureError, match="3 valid signatures"):
            unmask(s, told[i], srv, i, survivors, sigs)


# --- replays ---------------------------------------------------------------------------------------------------
def test_a_replayed_round_is_refused_at_every_stage():
    s = session_of(5)
    cfg1 = config(s, 1)
    srv1 = P.ServerRound(cfg1)
    survivors = mask_all(s, {i: cfg1 for i in s.nodes}, srv1)
    sigs1 = {i: P.sign_survivors(s.nodes[i], cfg1, s.signers[i], survivors) for i in s.nodes}
    for i in s.nodes:
        P.server_receive_unmask(srv1, i, *unmask(s, cfg1, srv1, i, survivors, sigs1))
    P.server_sum(srv1)
    with pytest.raises(P.StageError, match="not after"):  # round 1's train request again
        mask_all(s, {1: cfg1}, P.ServerRound(cfg1))
    cfg2 = config(s, 2)
    srv2 = P.ServerRound(cfg2)
    survivors2 = mask_all(s, {i: cfg2 for i in s.nodes}, srv2)
    with pytest.raises(P.StageError):  # round 1's signature request again
        P.sign_survivors(s.nodes[1], cfg1, s.signers[1], survivors)
    for i in s.nodes:
        P.sign_survivors(s.nodes[i], cfg2, s.signers[i], survivors2)
    with pytest.raises(P.SignatureError, match="0 valid signatures"):  # round 1's signatures, replayed
        unmask(s, cfg2, srv2, 1, survivors2, sigs1)
