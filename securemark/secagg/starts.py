"""The models a node trained from, so that it never masks two updates computed from one starting point.

A server that sends a node the same model twice (a replayed round) under two masking rounds whose survivors
differ by that node, and subtracts the two sums, reads the node's update: bit for bit when training repeats
(a review did it through the real mod, and read the node's example count exactly too). So a node keeps, for
every round in which it masked an update and then revealed shares to unmask a sum, a sketch of the model it
trained from and the norm of the update it sent, and before training refuses a model that lies within ``NEAR`` times
that update of any of them:

    refuse  if  || S(w_new) - S(w_r) ||  <=  NEAR * || Δ_r ||   for some earlier round r

A round is recorded when the node reveals, not when it masks: a round that fails before its unmask stage
(too few inputs arrived) leaves the model unchanged, and its nodes train from it again (their inputs were never
summed with their help). A round that fails after nodes revealed cannot be told from a server that lies about
its failure, so the server moves the model on before it asks again (``flower.aggregate``: a random step of half
the last round's movement).

An exact replay (distance 0) is refused whatever the update. ``NEAR`` = 0.02 sits seven times under the least
that honest federated averaging moved a node's model between two of its rounds, relative to its update, in
``securemark bench starts`` (0.16, sketched 0.16, for 20 clients a round with two classes each;
docs/explanations/masking.md has the table): more clients a round move the mean less, so the margin is wide.

S is a count sketch of ``K`` buckets under a key only the node holds: each coordinate goes to one bucket with
a sign, both from a ChaCha20 keystream. S is linear, so S(a) - S(b) = S(a - b), and E ||S v||² = ||v||² with
a relative spread of about sqrt(2 / K) (9% for K = 256); not knowing the key, a server cannot aim a change at
the sketch's blind spots. What a distance cannot see: a change that training ignores or undoes (a constant
added to every bias of a softmax layer, the weights of a dead unit, hidden units permuted or rescaled through a
ReLU) moves the model as far as the server likes while the update repeats, and a server that sends one batch as
large as the node's data makes training deterministic whatever the node's batch order. The sketch stops replays
and small perturbations, not a determined server; the session's fixed groups (``secagg.groups``) bound what
the sums reveal when every node gets the same model (only whole groups are ever summed). A model holding NaN
or infinite values is refused (it has no distance).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from securemark.prg import hkdf, keystream_into
from securemark.secagg.protocol.errors import ProtocolViolation

K = 256  # sketch buckets (a power of two)
NEAR = 0.02  # refuse a model within NEAR x an earlier round's update of that round's model


class Replay(ProtocolViolation):
    """The model sent to train from is (nearly) one this node already trained from and masked an update of."""


@dataclass
class Starts:
    """The sketches of the models this node trained from (one row per round it revealed shares in) and of its
    updates; ``pending``: the round masked and not yet unmasked."""

    key: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    rounds: list[int] = field(default_factory=list)
    models: np.ndarray = field(default_factory=lambda: np.zeros((0, K)), repr=False)
    updates: list[float] = field(default_factory=list)  # || update || of each round
    pending: tuple[int, np.ndarray, float] | None = None

    def sketch(self, x: np.ndarray) -> np.ndarray:
        """S(x) for a flat float vector x: bucket and sign of coordinate j from the keystream's j-th word."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if not np.isfinite(x).all():
            raise Replay("the model or update holds NaN or infinite values: no distance to check it by, refused")
        words = keystream_into(hkdf(self.key, f"securemark/starts/v1|{x.size}".encode()), np.empty(x.size, np.uint32))
        signed = np.where(words >> np.uint32(31), -x, x)
        return np.bincount(words & np.uint32(K - 1), weights=signed, minlength=K)

    def check(self, model: np.ndarray, round_no: int) -> None:
        """Raise Replay when the sketch ``model`` lies within NEAR x an earlier round's update of its model."""
        if not self.rounds:
            return
        dist = np.linalg.norm(self.models - model, axis=1)
        near = ~(dist > NEAR * np.asarray(self.updates))  # a NaN distance refuses too
        if near.any():
            r = int(np.argmax(near))
            raise Replay(  # no distance or norm in the reason: the server reads it (an update's norm)
                f"the model sent for round {round_no} is within {NEAR:g} of an update of the one this node trained "
                f"from in round {self.rounds[r]}: a replayed round (an update computed twice from one model lets two "
                "sums tell it apart), refused"
            )

    def masked(self, model: np.ndarray, update: float, round_no: int) -> None:
        """A masked round, pending until this node reveals shares for it: its model's sketch, its update's norm."""
        self.pending = (int(round_no), model, float(update))

    def revealed(self, round_no: int) -> None:
        """This node revealed shares for ``round_no``: its pending model is recorded for good."""
        if self.pending is None or self.pending[0] != round_no:
            return
        r, model, update = self.pending
        self.rounds.append(r)
        self.models = np.vstack([self.models, model.reshape(1, K)])
        self.updates.append(update)
        self.pending = None
