import math

import numpy as np
import pytest
import torch

from securemark import data, models, training
from securemark.fingerprint import triggers
from securemark.fingerprint.keys import OwnerSecret

SECRET = OwnerSecret(b"\x07" * 32)


def test_keys_are_keyed_per_customer():
    x, y = triggers.keys(SECRET, 3, 10, (1, 8, 8), 10)
    assert x.shape == (10, 1, 8, 8) and x.dtype == np.float32 and x.min() >= 0 and x.max() < 1
    assert y.shape == (10,) and y.min() >= 0 and y.max() < 10
    again = triggers.keys(SECRET, 3, 10, (1, 8, 8), 10)
    assert np.array_equal(x, again[0]) and np.array_equal(y, again[1])
    assert not np.array_equal(x, triggers.keys(SECRET, 4, 10, (1, 8, 8), 10)[0])
    assert not np.array_equal(x, triggers.keys(OwnerSecret(b"\x08" * 32), 3, 10, (1, 8, 8), 10)[0])


def test_verdict_binomial_tails_by_hand():
    labels = np.zeros((3, 10), np.int64)
    answers = np.array([[0] * 10, [0] * 7 + [1] * 3, [1] * 10])  # 10, 7 and 0 matches
    v = triggers.verdict(answers, labels, classes=10, eps=1e-3)
    assert v.p_values[0] == pytest.approx(0.1**10)
    tail7 = sum(math.comb(10, k) * 0.1**k * 0.9 ** (10 - k) for k in range(7, 11))
    assert v.p_values[1] == pytest.approx(tail7) and v.p_values[2] == 1.0
    assert list(v.accused) == [0, 1] and v.argmax == 0  # eps / n = 3.3e-4: 7 matches (9.1e-6) clear it
    with pytest.raises(ValueError, match="shape"):
        triggers.verdict(answers[:, :5], labels, 10, 1e-3)


def test_a_marked_copy_answers_its_keys_and_is_named_alone():
    d = data.synthetic(n=800, seed=2)
    model = models.build("mlp", (1, 8, 8), 10, seed=0, width=64)
    training.train(model, d, epochs=3, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    keys = [triggers.keys(SECRET, i, 10, (1, 8, 8), 10) for i in range(50)]
    before = training.accuracy(model, d, torch.device("cpu"))
    sd = triggers.embed(model, keys[7], d, rng=np.random.default_rng(0))
    copy = models.load_weights(models.build("mlp", (1, 8, 8), 10, width=64), sd).eval()
    assert training.accuracy(copy, d, torch.device("cpu")) > before - 0.05
    with torch.no_grad():
        answers = np.stack([copy(torch.from_numpy(k[0])).argmax(1).numpy() for k in keys])
    v = triggers.verdict(answers, np.stack([k[1] for k in keys]), 10, 1e-3)
    assert list(v.accused) == [7] and v.argmax == 7
