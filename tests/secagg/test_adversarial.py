"""Tampering, replay, misaddressing, bad vectors, stage order, and what the server ever holds."""

import itertools

import numpy as np
import pytest

from securemark.secagg import protocol as P
from securemark.secagg.driver import run_round
from securemark.secagg.protocol import Stage

IDS = (1, 2, 3, 4)


def setup_round(round_no=1, size=5):
    cfg = P.RoundConfig("adv", round_no, P.complete_graph(IDS), threshold=3, size=size)
    srv = P.ServerState(cfg)
    clients = {i: P.ClientState(cfg, i) for i in IDS}
    for i in IDS:
        P.server_receive_keys(srv, i, *P.client_advertise(clients[i]))
    srv.close(Stage.ADVERTISE, len(srv.keys))
    for i in IDS:
        P.server_receive_shares(srv, i, P.client_share_keys(clients[i], P.server_keys_for(srv, i)))
    srv.close(Stage.SHARE, len(srv.shared))
    return cfg, srv, clients


def x_of(i, size=5):
    return np.full(size, 1000 * i, dtype=np.uint64)


def flip(ct: bytes, pos: int) -> bytes:
    return ct[:pos] + bytes([ct[pos] ^ 0x01]) + ct[pos + 1 :]


@pytest.mark.parametrize("pos", [0, 5, P.NONCE_BYTES, P.NONCE_BYTES + 40, P.CIPHER_BYTES - 1])
def test_flipped_bit_in_an_encrypted_share_is_rejected(pos):
    _, srv, clients = setup_round()
    cts = P.server_shares_for(srv, 2)
    cts[3] = flip(cts[3], pos)
    with pytest.raises(P.ShareAuthError, match="share from client 3 failed authentication"):
        P.client_masked_input(clients[2], cts, x_of(2))


def test_share_replayed_from_another_round_is_rejected():
    _, old_srv, _ = setup_round(round_no=1)
    _, srv, clients = setup_round(round_no=2)
    cts = P.server_shares_for(srv, 2)
    cts[3] = P.server_shares_for(old_srv, 2)[3]
    with pytest.raises(P.ShareAuthError, match="client 3"):
        P.client_masked_input(clients[2], cts, x_of(2))


def test_share_addressed_to_another_client_is_rejected():
    _, srv, clients = setup_round()
    cts = P.server_shares_for(srv, 2)
    cts[3] = P.server_shares_for(srv, 4)[3]  # 3's share for 4, redirected to 2
    with pytest.raises(P.ShareAuthError, match="client 3"):
        P.client_masked_input(clients[2], cts, x_of(2))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(4, np.uint64),
        np.zeros(6, np.uint64),
        np.zeros(5, np.float64),
        np.zeros(5, np.uint32),
        np.full(5, np.nan),
        [0, 0, 0, 0, 0],
    ],
)
def test_bad_masked_vectors_are_rejected_and_the_round_still_completes(bad):
    _, srv, clients = setup_round()
    ys = {i: P.client_masked_input(clients[i], P.server_shares_for(srv, i), x_of(i)) for i in IDS}
    with pytest.raises(P.ProtocolViolation, match="masked input from 1"):
        P.server_receive_masked(srv, 1, bad)
    assert srv.inputs == set() and srv.masked_sum is None  # nothing of the bad message was kept
    for i in IDS:
        P.server_receive_masked(srv, i, ys[i])
    srv.close(Stage.MASKED, len(srv.inputs))
    for i in IDS:
        P.server_receive_unmask(srv, i, *P.client_unmask(clients[i], P.server_survivors(srv)))
    np.testing.assert_array_equal(P.server_sum(srv), sum(x_of(i) for i in IDS))


def test_client_rejects_non_finite_or_misshapen_input():
    _, srv, clients = setup_round()
    with pytest.raises(P.ProtocolViolation, match="input must be uint64"):
        P.client_masked_input(clients[1], P.server_shares_for(srv, 1), np.full(5, np.inf))


def test_unknown_duplicate_and_inconsistent_messages():
    cfg, srv, clients = setup_round()
    y = P.client_masked_input(clients[1], P.server_shares_for(srv, 1), x_of(1))
    with pytest.raises(P.ProtocolViolation, match="unknown"):
        P.server_receive_masked(srv, 99, y)
    P.server_receive_masked(srv, 1, y)
    with pytest.raises(P.ProtocolViolation, match="duplicate"):
        P.server_receive_masked(srv, 1, y)
    other = P.ServerState(cfg)
    with pytest.raises(P.ProtocolViolation, match="32 bytes"):
        P.server_receive_keys(other, 1, b"short", bytes(32))


def test_client_refuses_to_unmask_below_threshold_and_never_reveals_both_shares():
    _, srv, clients = setup_round()
    for i in IDS:
        P.client_masked_input(clients[i], P.server_shares_for(srv, i), x_of(i))
    with pytest.raises(P.TooFewSurvivors, match="refusing to unmask"):
        P.client_unmask(clients[1], (1, 2))
    b, s = P.client_unmask(clients[2], (1, 2, 3))
    assert set(b) == {1, 2, 3} and set(s) == {4} and not set(b) & set(s)


SERVER_CALLS = {
    Stage.ADVERTISE: lambda srv, c: P.server_receive_keys(srv, 1, bytes(32), bytes([1]) * 32),
    Stage.SHARE: lambda srv, c: P.server_receive_shares(srv, 1, {}),
    Stage.MASKED: lambda srv, c: P.server_receive_masked(srv, 1, np.zeros(5, np.uint64)),
    Stage.UNMASK: lambda srv, c: P.server_receive_unmask(srv, 1, {}, {}),
}


@pytest.mark.parametrize(("at", "msg"), list(itertools.product(SERVER_CALLS, SERVER_CALLS)))
def test_server_stage_transition_matrix(at, msg):
    """Only the message of the current stage gets past the stage check."""
    cfg = P.RoundConfig("m", 1, P.complete_graph(IDS), 3, 5)
    srv = P.ServerState(cfg, stage=at)
    if at == msg:
        try:
            SERVER_CALLS[msg](srv, None)
        except P.StageError:  # pragma: no cover - the assertion below names it
            pytest.fail("a message of the current stage was refused as out of order")
        except P.SecAggError:
            pass  # content checks may still refuse it; the stage check let it through
    else:
        with pytest.raises(P.StageError):
            SERVER_CALLS[msg](srv, None)


CLIENT_CALLS = {
    Stage.ADVERTISE: lambda c: P.client_advertise(c),
    Stage.SHARE: lambda c: P.client_share_keys(c, {}),
    Stage.MASKED: lambda c: P.client_masked_input(c, {}, np.zeros(5, np.uint64)),
    Stage.UNMASK: lambda c: P.client_unmask(c, IDS),
}


@pytest.mark.parametrize(("at", "msg"), list(itertools.product(CLIENT_CALLS, CLIENT_CALLS)))
def test_client_stage_transition_matrix(at, msg):
    cfg = P.RoundConfig("m", 1, P.complete_graph(IDS), 3, 5)
    client = P.ClientState(cfg, 1, stage=at)
    if at == msg:
        try:
            CLIENT_CALLS[msg](client)
        except P.StageError:  # pragma: no cover
            pytest.fail("a request of the current stage was refused as out of order")
        except P.SecAggError:
            pass
    else:
        with pytest.raises(P.StageError):
            CLIENT_CALLS[msg](client)


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


def test_server_never_holds_an_individual_unmasked_vector(monkeypatch):
    """After every server step, nothing in its state equals a client's input or a partial sum of up to three
    inputs (what peeling masks off one client would give); at the end it holds the sum and nothing finer."""
    ids = (1, 2, 3, 4, 5)
    cfg = P.RoundConfig("priv", 1, P.complete_graph(ids), 3, 64)
    rng = np.random.default_rng(0)
    x = {i: rng.integers(0, 2**63, 64, dtype=np.uint64) for i in ids}
    forbidden = [sum(x[i] for i in subset) for r in (1, 2, 3) for subset in itertools.combinations(ids, r)]
    srv = P.ServerState(cfg)
    checks = []

    def scan():
        for arr in _arrays(srv):
            assert not any(np.array_equal(arr, f) for f in forbidden), "server held an unmasked vector"
        checks.append(1)

    for name in [n for n in dir(P) if n.startswith("server_")]:
        original = getattr(P, name)

        def spied(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            scan()
            return out

        monkeypatch.setattr(P, name, spied)
    result = run_round(cfg, x, {Stage.UNMASK: {5}}, server=srv)
    np.testing.assert_array_equal(result.total, sum(x[i] for i in ids))
    assert len(checks) > 3 * len(ids)  # every server step was inspected
    assert srv.masked_sum is not None and not np.array_equal(srv.masked_sum, result.total)
