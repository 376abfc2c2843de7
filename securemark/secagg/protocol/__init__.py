"""Masked aggregation over many rounds: keys once per session, two exchanges per round.

    session setup (once per node):  node -> server   long-term public keys (c: encrypts shares, s: agrees masks)
    every round t:   train   server -> node   round config + neighbours' public keys
                             node -> server   y_i, encrypted shares of its round secrets, share commitments
                     unmask  server -> node   survivors S + the encrypted shares addressed to this node
                             node -> server   the shares S needs
                     the server sums the y_i of S and removes what is left of the masks

Client i in round t of session ``sid`` (neighbours N(i), holders H(i) = N(i) + {i}, threshold t) sends

    y_i = x_i + PRG(b_i) + sum_{j in N(i)} sign(i, j) PRG(p_ij)   (mod 2^k),   sign = +1 if i < j else -1
    p_ij = HKDF(DH(s_i, s_j), sid | t | "pair" | min(i,j) | max(i,j))          b_i: fresh random, every round

and, in the same reply, Shamir shares (threshold t over H(i)) of b_i and of every p_ij, each holder's shares
AEAD-encrypted under HKDF(DH(c_i, c_h), sid | t | i | h), plus a 16-byte hash commitment of every share.
Pairwise masks of two survivors cancel. At unmask each survivor h in S reveals, for every owner i in S whose
shares it holds, the share of b_i and the shares of p_ij for the neighbours j of i outside S; the server checks
each share against its commitment (a bad share costs that share, not the round), rebuilds b_i and those p_ij
from any t good shares and removes them. Earlier designs (Bonawitz et al. 2017) make fresh keys every round
(four exchanges) and rebuild a dropped client's whole mask key; Flamingo (S&P 2023) keeps keys across rounds and
ships the shares with the masked input. Here the long-term private keys never leave the node, are never
shared, and no dropout pattern ever needs them: only round-bound seeds are revealed, so no key has to be rotated
after a dropout. A session is one server run (the server draws its id); a node that lost its keys is re-keyed.

What the server learns (honest-but-curious server: it follows the protocol and reports S truthfully):
- the sum over S and nothing finer when S is connected in the round graph (SecAgg+ sparse graphs: the sum of
  each connected component of S, as in Bell et al. 2020; the random graph is connected w.h.p.). For i in S every
  revealed value is b_i or p_ij with j outside S; the masks p_ik with k in N(i) & S stay secret, and a holder
  refuses unless t >= 2 of H(i) are in S, so i has a surviving neighbour;
- nothing about a client outside S, including one whose y arrives late: nobody ever reveals a share of b_j for
  j outside S, so y_j stays one-time padded by PRG(b_j), whatever pair seeds of j were revealed;
- nothing about another round: every seed is bound to (sid, round) by HKDF, b_i is fresh, and a node masks at
  most once per (sid, round) and answers at most one unmask per round, so no seed is ever used twice.
  Sums of different rounds still combine (two sums over survivors that differ by one client, from one model
  trained twice, give that client's input): ``securemark.secagg.starts`` (no update twice from one model) and
  ``securemark.secagg.groups`` (fixed groups, summed whole) bound what rounds reveal together; a round's
  groups are part of its configuration and bound into every key it derives.
A server that lies (different survivor lists to different nodes, a graph of its choosing, substituted public
keys) is outside this guarantee unless the round is of the malicious threat (``RoundConfig.roster``; ``signing``:
keys signed by roster members, survivors and configuration signed before anything is revealed, safe while fewer
than 2m - n of the n members work with the server). Without it nothing binds a node's public key to that node,
so such a server can give a client fake neighbours and unmask it. Nodes still refuse what would make lying
cheap: a threshold of at most half their holders, a survivor list that omits them, is shorter than t, or leaves
fewer than t of an owner's holders, a second unmask of a round, a plain train request once they mask in the run.
For the complete graph these rules alone stop the survivor-list lie: isolating x_i needs b_i and every p_ik, a
holder never reveals a share of its own pair seed with i and marks at most |H| - t others as dropped, and
(|H| - 1) t > |H| (|H| - t) whenever t > |H| / 2; but the nodes do not insist on the complete graph.
A client can always corrupt the sum with a wrong y (nothing here checks inputs); ``quantize.decode`` refuses sums
no honest clients could produce.

The modules, each one job: ``errors`` (what a refusal raises), ``keys`` (long-term keys, node and server side),
``config`` (one round's public configuration), ``graph`` (drawing the round's graph and threshold), ``derive``
(seeds, keys and commitments bound to the round), ``signing`` (what nodes sign under the malicious threat, and
the checks), ``client`` (the node's train and unmask stages) and ``server`` (the server's stages and the sum).
Callers use the names exported here.
"""

from __future__ import annotations

from securemark.prg import add_keystream
from securemark.secagg import shamir
from securemark.secagg.protocol.client import (
    NONCE_BYTES,
    MaskedInput,
    check_round,
    client_masked_input,
    client_unmask,
)
from securemark.secagg.protocol.config import B_LABEL, SIGNERS, RoundConfig, signers_needed
from securemark.secagg.protocol.derive import COMMIT_BYTES, commitment
from securemark.secagg.protocol.errors import (
    BadOwner,
    GroupTooSmall,
    ProtocolViolation,
    SecAggError,
    ShareAuthError,
    SignatureError,
    StageError,
    TooFewSurvivors,
)
from securemark.secagg.protocol.graph import complete_graph, harary_graph, neighbour_graph, sparse_degree
from securemark.secagg.protocol.keys import (
    KEY_BYTES,
    NodeKeys,
    SessionKeys,
    check_public_key,
    private_bytes,
    public_bytes,
)
from securemark.secagg.protocol.server import (
    ServerRound,
    server_close_inputs,
    server_receive_masked,
    server_receive_unmask,
    server_shares_for,
    server_sum,
)
from securemark.secagg.protocol.signing import (
    Signer,
    advert,
    check_adverts,
    check_survivors,
    sign_survivors,
    survivors_statement,
)

__all__ = [
    "B_LABEL",
    "COMMIT_BYTES",
    "KEY_BYTES",
    "NONCE_BYTES",
    "SIGNERS",
    "BadOwner",
    "GroupTooSmall",
    "MaskedInput",
    "NodeKeys",
    "ProtocolViolation",
    "RoundConfig",
    "SecAggError",
    "ServerRound",
    "SessionKeys",
    "ShareAuthError",
    "SignatureError",
    "Signer",
    "StageError",
    "TooFewSurvivors",
    "add_keystream",  # the keystream and the sharing the stages use: tests undo masks and forge shares with them
    "advert",
    "check_adverts",
    "check_public_key",
    "check_round",
    "check_survivors",
    "client_masked_input",
    "client_unmask",
    "commitment",
    "complete_graph",
    "harary_graph",
    "neighbour_graph",
    "private_bytes",
    "public_bytes",
    "server_close_inputs",
    "server_receive_masked",
    "server_receive_unmask",
    "server_shares_for",
    "server_sum",
    "shamir",
    "sign_survivors",
    "signers_needed",
    "sparse_degree",
    "survivors_statement",
]
