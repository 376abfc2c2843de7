"""Key derivation and keystreams, all from `cryptography`.

One place for HKDF-SHA256 and the ChaCha20 keystream, shared by the fingerprint (secret projection, code
rows) and masked aggregation (masks). Every derived key is bound to a purpose by its HKDF ``info``.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
_ZERO_NONCE = bytes(16)  # ChaCha20 in `cryptography`: 4-byte little-endian counter then 12-byte nonce
_CHUNK = 1 << 22  # 4 MiB: keystream is produced in chunks so big requests do not double memory


def hkdf(secret: bytes, info: bytes, length: int = KEY_BYTES, salt: bytes | None = None) -> bytes:
    """HKDF-SHA256 of ``secret`` bound to ``info``."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def keystream_into(key: bytes, out: np.ndarray, *, nonce: bytes = _ZERO_NONCE) -> np.ndarray:
    """Fill ``out`` (any contiguous array) with ChaCha20 keystream bytes under ``key``; returns ``out``."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"ChaCha20 key must be {KEY_BYTES} bytes, got {len(key)}")
    buf = out.reshape(-1).view(np.uint8)
    enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    zeros = bytes(min(_CHUNK, buf.size))
    for start in range(0, buf.size, _CHUNK):
        stop = min(start + _CHUNK, buf.size)
        # encrypting zeros yields the raw keystream; update_into writes straight into our buffer
        enc.update_into(zeros[: stop - start], memoryview(buf[start:stop]))  # type: ignore[arg-type]
    return out


def add_keystream(key: bytes, acc: np.ndarray, *, subtract: bool = False, chunk_bytes: int = 1 << 16) -> None:
    """acc += keystream (or -=), word by word mod 2^bits, in place, for an unsigned integer array ``acc``.

    The keystream is made in small chunks that stay in cache and are added at once, so masking runs near the
    raw cipher rate instead of writing a whole mask to memory and reading it back.
    """
    if len(key) != KEY_BYTES:
        raise ValueError(f"ChaCha20 key must be {KEY_BYTES} bytes, got {len(key)}")
    if acc.dtype.kind != "u" or not acc.flags.c_contiguous:
        raise ValueError("acc must be a contiguous unsigned integer array")
    flat = acc.reshape(-1)
    words = max(1, chunk_bytes // flat.itemsize)
    buf = np.empty(words, dtype=flat.dtype)
    raw = memoryview(buf.view(np.uint8))  # type: ignore[arg-type]
    zeros = memoryview(bytes(words * flat.itemsize))  # slicing a memoryview copies nothing
    enc = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()
    op = np.subtract if subtract else np.add
    for start in range(0, flat.size, words):
        n = min(words, flat.size - start)
        enc.update_into(zeros[: n * flat.itemsize], raw[: n * flat.itemsize])
        part = flat[start : start + n]
        op(part, buf[:n], out=part)


def keystream(key: bytes, count: int, dtype: np.typing.DTypeLike = np.uint8) -> np.ndarray:
    """``count`` values of ``dtype`` drawn from the ChaCha20 keystream under ``key``."""
    return keystream_into(key, np.empty(count, dtype=dtype))


def uniforms(key: bytes, count: int) -> np.ndarray:
    """``count`` float64 values uniform on [0, 1), 53 random bits each, from the keystream."""
    words = keystream(key, count, np.uint64)
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
