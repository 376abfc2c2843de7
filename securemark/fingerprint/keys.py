"""The owner secret: 32 bytes from os.urandom in a file of its own (mode 0600); everything secret derives
from it through HKDF with a purpose label, so nothing else secret needs storing or sending."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from securemark.errors import SecureMarkError
from securemark.prg import KEY_BYTES, hkdf

_LABEL = b"securemark/v1/"


class SecretFileError(SecureMarkError, RuntimeError):
    """The owner secret file is missing, malformed or readable by others."""


@dataclass(frozen=True)
class OwnerSecret:
    key: bytes = field(repr=False)  # never printed: repr shows only that a key is present

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise SecretFileError(f"owner secret must be {KEY_BYTES} bytes, got {len(self.key)}")

    @classmethod
    def generate(cls) -> OwnerSecret:
        return cls(os.urandom(KEY_BYTES))

    def derive(self, purpose: str) -> bytes:
        """A 256-bit key for one purpose, e.g. ``projection/M=1234`` or ``code-row/17``."""
        return hkdf(self.key, _LABEL + purpose.encode())

    def save(self, path: Path) -> None:
        """Write the key to a new file created with mode 0600 (never overwrites)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(self.key)

    @classmethod
    def load(cls, path: Path) -> OwnerSecret:
        try:
            st = path.stat()
            data = path.read_bytes()
        except FileNotFoundError:
            raise SecretFileError(f"owner secret file {path} is missing") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretFileError(
                f"owner secret file {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):o});"
                " run: chmod 600 " + str(path)
            )
        if len(data) != KEY_BYTES:
            raise SecretFileError(f"owner secret file {path} holds {len(data)} bytes, expected {KEY_BYTES}")
        return cls(data)
