import numpy as np
import pytest

from securemark.prg import hkdf, keystream, uniforms


def test_chacha20_rfc7539_all_zero_vector():
    # RFC 7539 section 2.3.2 family: key = 0^32, nonce = 0, counter = 0 gives 76 b8 e0 ad a0 f1 3d 90 ...
    assert bytes(keystream(bytes(32), 8)).hex() == "76b8e0ada0f13d90"


def test_keystream_is_chunk_independent():
    key = hkdf(b"k" * 32, b"test")
    big = keystream(key, (1 << 22) + 17)
    assert bytes(big[:100]) == bytes(keystream(key, 100))
    assert bytes(big[-17:]) != bytes(17)


def test_uniforms_are_in_unit_interval_and_uniform():
    u = uniforms(bytes(range(32)), 100_000)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.005


def test_bad_key_length():
    with pytest.raises(ValueError, match="32 bytes"):
        keystream(b"short", 4)
    assert np.asarray(keystream(bytes(32), 0)).size == 0
