import numpy as np
import pytest
import torch

from securemark import attacks


def sd(values):
    return {
        "w": torch.tensor(values, dtype=torch.float32).reshape(2, 2),
        "b": torch.tensor([1.0, 2.0]),
        "n": torch.tensor(3),
    }


def test_collusion_methods_hand_worked():
    copies = [sd([1, 2, 3, 4]), sd([3, 2, 1, 0]), sd([5, 8, 2, 2])]
    rng = np.random.default_rng(0)
    avg, rec = attacks.collude(copies, "average", rng)
    np.testing.assert_allclose(avg["w"].reshape(-1), [3, 4, 2, 2])
    assert rec == {"attack": "collude", "method": "average", "copies": 3}
    med, _ = attacks.collude(copies, "median", rng)
    np.testing.assert_allclose(med["w"].reshape(-1), [3, 2, 2, 2])
    inter, _ = attacks.collude(copies, "interleave", rng)
    stack = torch.stack([c["w"] for c in copies])
    assert ((stack == inter["w"]).any(0)).all()
    ext, _ = attacks.collude(copies, "extreme", rng)
    assert ((ext["w"] == stack.min(0).values) | (ext["w"] == stack.max(0).values)).all()
    assert avg["n"].item() == 3 and avg["n"].dtype == torch.int64
    erased, _ = attacks.collude(copies, "erase", rng)  # w: 1|3|5, 2|2|8, 3|1|2, 4|0|2; b: all agree
    np.testing.assert_allclose(erased["w"].reshape(-1), [0, 0, 0, 0])
    np.testing.assert_allclose(attacks.collude(copies[:2], "erase", rng)[0]["w"].reshape(-1), [0, 2, 0, 0])
    assert torch.equal(erased["b"], torch.tensor([1.0, 2.0]))


def test_collusion_refuses_mismatched_or_single_copies():
    with pytest.raises(ValueError, match="at least 2"):
        attacks.collude([sd([1, 2, 3, 4])], "average", np.random.default_rng(0))
    other = sd([1, 2, 3, 4])
    other["w"] = torch.zeros(4)
    with pytest.raises(ValueError, match="copy 1"):
        attacks.collude([sd([1, 2, 3, 4]), other], "average", np.random.default_rng(0))


def test_prune_zeroes_the_smallest_weights_only():
    out, rec = attacks.prune(sd([0.1, -4, 0.2, 3]), 0.5)
    np.testing.assert_allclose(out["w"].reshape(-1), [0, -4, 0, 3])
    assert rec["zeroed"] == 2 and rec["of"] == 4
    assert torch.equal(out["b"], torch.tensor([1.0, 2.0]))  # biases are not weights here


def test_quantize_int8_error_is_within_half_a_step():
    t = torch.randn(64, 64)
    out, _ = attacks.quantize({"w": t}, 8)
    step = t.abs().max() / 127
    assert (out["w"] - t).abs().max() <= step / 2 + 1e-7
    assert len(torch.unique(attacks.quantize({"w": t}, 4)[0]["w"])) <= 15


def test_noise_has_the_requested_std():
    out, _ = attacks.add_noise({"w": torch.zeros(200, 200)}, 0.1, np.random.default_rng(0))
    assert abs(out["w"].std().item() - 0.1) < 0.002


def test_finetune_lowers_the_loss_on_the_attackers_data_and_leaves_the_input_untouched():
    from securemark import data, models, training

    own = data.synthetic(n=300, seed=1)
    model = models.build("mlp", (1, 8, 8), 10, seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    before = training.accuracy_of(model, start, own)
    tuned, rec = attacks.finetune(start, model, own, epochs=3, lr=0.05, fraction=0.5, rng=np.random.default_rng(0))
    assert rec["attack"] == "finetune" and rec["examples"] == 150 and rec["epochs"] == 3
    assert training.accuracy_of(model, tuned, own) > before + 0.3
    fresh = models.build("mlp", (1, 8, 8), 10, seed=0).state_dict()
    assert all(torch.equal(start[k], fresh[k]) for k in start)  # the copy handed in is not modified
    same, _ = attacks.finetune(start, model, own, epochs=0, rng=np.random.default_rng(0))
    assert all(torch.equal(same[k], start[k]) for k in start)
    with pytest.raises(ValueError, match="fraction"):
        attacks.finetune(start, model, own, fraction=0.0, rng=np.random.default_rng(0))


def test_new_collusion_methods_hand_worked():
    copies = [sd([1, 2, 3, 4]), sd([3, 2, 1, 0])]
    rng = np.random.default_rng(0)
    ext, rec = attacks.collude(copies, "extrapolate", rng, alpha=0.5)
    np.testing.assert_allclose(ext["w"].reshape(-1), [0, 2, 4, 6])  # a + 0.5 (a - b)
    assert rec["alpha"] == 0.5
    conv, rec = attacks.collude(copies, "convex", rng)
    lam = rec["weights"]
    assert abs(sum(lam) - 1) < 1e-3 and min(lam) >= 0
    expected = lam[0] * np.array([1, 2, 3, 4]) + lam[1] * np.array([3, 2, 1, 0])
    np.testing.assert_allclose(conv["w"].reshape(-1), expected, atol=1e-3)
    layer, _ = attacks.collude(copies, "layer-interleave", rng)
    assert any(torch.equal(layer["w"], c["w"]) for c in copies)  # a whole tensor from one colluder


def test_pipeline_parses_runs_and_records_every_step():
    from securemark import data, models
    from securemark.attacks.pipeline import Attacker, parse, run

    steps = parse("collude:median > finetune:epochs=1,fraction=0.5 > prune:ratio=0.5,scope=layer > quantize:bits=4")
    assert [s.name for s in steps] == ["collude", "finetune", "prune", "quantize"]
    assert steps[0].params == {"method": "median"} and steps[1].params == {"epochs": 1, "fraction": 0.5}
    own = data.synthetic(n=100, seed=2)
    attacker = Attacker(lambda: models.build("mlp", (1, 8, 8), 10), own, np.random.default_rng(0), length=64)
    copies = [{k: v + 0.01 * i for k, v in models.build("mlp", (1, 8, 8), 10).state_dict().items()} for i in range(3)]
    pirate, records = run(copies, steps, attacker)
    assert [r["attack"] for r in records] == ["collude", "finetune", "prune", "quantize"]
    assert records[1]["examples"] == 50 and records[2]["scope"] == "layer"
    assert float((pirate["net.1.weight"] == 0).float().mean()) >= 0.5
    _, records = run(copies[:1], parse("collude:average > noise:std=0.01"), attacker)
    assert records[0] == {"attack": "collude", "skipped": "a single copy"} and records[1]["std"] == 0.01
    with pytest.raises(ValueError, match="need a collude step"):
        run(copies, parse("prune:ratio=0.1"), attacker)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bogus", "unknown attack"),
        ("prune:ratio", "key=value"),
        ("prune:rate=0.1", "unknown parameter"),
        ("quantize:bits=eight", "must be int"),
        ("collude:blend", "method must be one of"),
        ("prune:ratio=0.1 > collude:average", "first step"),
        ("prune:ratio=0.1 >", "empty step"),
    ],
)
def test_pipeline_spec_errors_name_the_problem(spec, message):
    from securemark.attacks.pipeline import parse

    with pytest.raises(ValueError, match=message):
        parse(spec)


def test_overwrite_adds_a_fresh_fingerprint_at_the_budget_and_distill_copies_no_weight():
    from securemark import data, models, training
    from securemark.fingerprint.carrier import CarrierSpec

    model = models.build("mlp", (1, 8, 8), 10, seed=0)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out, rec = attacks.overwrite(base, 64, 0.05, np.random.default_rng(0))
    layout = CarrierSpec().layout(base)
    v, w = layout.read(base), layout.read(out)
    np.testing.assert_allclose(np.sqrt(np.mean((w - v) ** 2)) / np.sqrt(np.mean(v**2)), 0.05, rtol=1e-3)
    assert rec == {"attack": "overwrite", "length": 64, "budget": 0.05}

    own = data.synthetic(n=400, seed=3)
    training.train(model, own, epochs=5, generator=torch.Generator().manual_seed(0))
    teacher = {k: v.detach().clone() for k, v in model.state_dict().items()}
    build = lambda: models.build("mlp", (1, 8, 8), 10, seed=7)  # noqa: E731
    student, rec = attacks.distill(teacher, build(), build(), own, epochs=5, rng=np.random.default_rng(0))
    assert rec["attack"] == "distill" and rec["examples"] == 400
    assert not any(torch.equal(student[k], teacher[k]) for k in teacher)
    assert training.accuracy_of(build(), student, own) > 0.5  # learned from soft labels only (chance 0.1)
