"""The black-box cells end to end on a small setup: every kind of suspect traced, every innocent counted."""

import numpy as np
import pytest

from securemark import data, models
from securemark.bench.blackbox import train_base
from securemark.evaluation.blackbox import Setup, Tail, run, students_of


@pytest.fixture(scope="module")
def setup():
    pool, held = data.load("synthetic", 0).split(0.3, 0)
    model = train_base(pool, 0, epochs=3)
    record = {"name": "synthetic", "seed": 0, "test_fraction": 0.3, "files": ""}
    return Setup(model, models.spec_of("cnn", (1, 8, 8), 10), pool, held, record)


def test_cells_fidelity_and_the_innocent_tail_add_up(setup):
    out = run(setup, customers=60, trials=1, copies=3, colluders=(2,), students=[("mlp", 4.0, False)],
              epochs=1, queries=600, triggers=2, tail=1, length=256, max_colluders=3, noise=(0.0, 50.0))  # fmt: skip
    cells = {c["name"]: c for c in out["cells"]}
    assert set(cells) == {
        "intact, HTTP, 2000 queries", "mlp student, soft T=4, control (unmarked teacher)", "mlp student, soft T=4, c=2",
        "tail: independently trained model", "tail: intact copy", "tail: cnn student of one copy, soft T in [1, 4]",
        "intact + logit noise, std 0", "intact + logit noise, std 50",
    }  # fmt: skip
    quiet, loud = cells["intact + logit noise, std 0"], cells["intact + logit noise, std 50"]
    assert quiet["catch"] == 1.0 and quiet["student_accuracy"] > loud["student_accuracy"] + 0.2  # users pay for it
    assert cells["intact, HTTP, 2000 queries"]["catch"] == 1.0 and cells["tail: intact copy"]["catch"] == 1.0
    assert all(c["innocents_accused"] == 0 for c in cells.values())
    tail = out["innocent_tail"]
    # intact copy 59, two noisy ones 59 each, control 60, c=2 student 58; tail: independent model 60, intact copy
    # 59, student 59
    assert tail["scores"] == 59 + 2 * 59 + 60 + 58 + 60 + 59 + 59
    assert sum(n for _, n in tail["by_suspect"].values()) == tail["scores"]
    assert tail["over_threshold"] == 0 and 0 < tail["max_over_threshold"] < 1
    assert out["fidelity"]["copies"] == 3 and out["fidelity"]["agreement_min"] > 0.9
    assert {r["name"] for r in out["trigger_baseline"]} >= {"trigger-set: intact copy"}


def test_tail_bookkeeping_worked_by_hand():
    t = Tail()
    t.add("copy", np.array([1.0, 3.0, 9.0]), 4.0, np.array([True, True, False]))
    t.add("model", np.array([5.0, 2.0]), 4.0, np.array([True, True]))
    assert (t.scores, t.over_threshold, t.max_over_threshold) == (4, 1, 1.25)
    assert t.by_suspect == {"copy": [1, 2], "model": [1, 2]}


def test_students_of_lists_each_cell_once():
    assert students_of(("cnn", "mlp"), (1.0, 4.0), True) == [
        ("cnn", 1.0, False), ("cnn", 4.0, False), ("mlp", 1.0, False), ("mlp", 4.0, False),
        ("cnn", 1.0, True), ("mlp", 1.0, True),
    ]  # fmt: skip
