"""The protocol's errors: one base class, and one subclass for each way a message or a round is refused."""

from __future__ import annotations

from securemark.errors import SecureMarkError


class SecAggError(SecureMarkError, RuntimeError):
    """Base of every protocol error; the message says what was rejected and why."""


class StageError(SecAggError):
    """A message for a round this party is not in (no keys, a replayed or repeated round, an unmask twice)."""


class ProtocolViolation(SecAggError):
    """A message from an unknown sender, a duplicate, or of the wrong size, dtype or content."""


class GroupTooSmall(ProtocolViolation):
    """The round's group for this node is smaller than the node's floor: it will not take part in this session."""


class ShareAuthError(SecAggError):
    """An encrypted share failed authentication: tampered, replayed from another round, or misaddressed."""


class TooFewSurvivors(SecAggError):
    """Fewer than the threshold answered: the sum cannot (and must not) be unmasked."""


class BadOwner(ProtocolViolation):
    """A survivor's shares could not be opened by its holders and its secrets cannot be rebuilt: that client
    sent garbage (the round fails; the caller should not admit it again)."""

    def __init__(self, client: int, why: str) -> None:
        super().__init__(why)
        self.client = client


class SignatureError(ProtocolViolation):
    """Under the malicious-server threat: a key, a roster member or a survivor list that its members' signatures
    do not vouch for (a server that swapped a key, made a member up, or showed nodes different survivors)."""
