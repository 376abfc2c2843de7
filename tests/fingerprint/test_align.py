"""Alignment undoes function-preserving rewrites exactly, for the project's models and a Flower-style Net,
and the rewrites themselves leave the outputs unchanged on real data."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from securemark import data, models
from securemark.attacks import rewrite
from securemark.corpus.net import flower_net  # the model of Flower's PyTorch quickstart, written its way
from securemark.fingerprint.align import AlignmentError, UnitGroup, align, chain_groups, load_groups


def _digits() -> torch.Tensor:
    return data.load_digits().x[:256]


def _cases():
    x8 = _digits()  # real 8x8 digits
    x32 = F.interpolate(x8, size=32).repeat(1, 3, 1, 1)  # the same digits at CIFAR size, 3 channels
    return {
        "mlp": (models.build("mlp", (1, 8, 8), 10), x8),
        "cnn": (models.build("cnn", (1, 8, 8), 10), x8),
        "cifar-cnn": (models.build("cifar-cnn", (3, 32, 32), 10), x32),
        "flower-net": (flower_net(), x32),
    }


CASES = _cases()


def _outputs(model: nn.Module, sd: dict, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.func.functional_call(model, sd, (x,))


def _carrier_equal(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b if b[k].dim() >= 2)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("attack", ["permute", "rescale", "widen"])
def test_rewrites_keep_outputs_and_alignment_undoes_them(name, attack):
    model, x = CASES[name]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out, _ = getattr(rewrite, attack)(sd, np.random.default_rng(1))
    if not (name == "flower-net" and attack == "widen"):  # Net's x.view(-1, 400) fixes conv2's width
        torch.testing.assert_close(_outputs(model, out, x), _outputs(model, sd, x), atol=1e-5, rtol=1e-4)
    aligned, rep = align(out, sd)
    assert _carrier_equal(aligned, sd) < 1e-5
    assert rep.permuted > 0 if attack == "permute" else True
    assert rep.dropped + rep.merged > 0 if attack == "widen" else True
    torch.testing.assert_close(_outputs(model, aligned, x), _outputs(model, sd, x), atol=1e-5, rtol=1e-4)


def test_spike_at_dead_inputs_changes_nothing():
    model, x = CASES["mlp"]  # 8x8 digits have pixels that are 0 in every image: their weights are dead
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    dead = rewrite.dead_inputs(model, sd, x)
    out, rec = rewrite.spike(sd, np.random.default_rng(2), count=3, dead=dead)
    assert rec["dead"] and len(rec["spikes"]) == 3
    assert any(not torch.equal(out[k], sd[k]) for k in sd)
    torch.testing.assert_close(_outputs(model, out, x), _outputs(model, sd, x))


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from(["mlp", "cnn", "cifar-cnn"]))
def test_obfuscation_without_spikes_is_undone_exactly(seed, name):
    model, _ = CASES[name]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(seed)
    out, _ = rewrite.permute(*[rewrite.rescale(rewrite.widen(sd, rng)[0], rng)[0]], rng)
    aligned, _ = align(out, sd)
    assert _carrier_equal(aligned, sd) < 1e-5


def test_chain_groups_of_the_flower_net():
    groups = chain_groups(flower_net().state_dict())
    assert [g.name for g in groups] == ["conv1", "conv2", "fc1", "fc2"]
    flatten = groups[1].of("cols")[0]
    assert (flatten.tensor, flatten.block) == ("fc1.weight", 25)  # 16 channels x 5 x 5 positions


def test_unmappable_models_are_refused_with_the_reason(tmp_path):
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 6)
            self.b = nn.Linear(4, 3)

    with pytest.raises(AlignmentError, match="takes 4 inputs but 'a' gives 6"):
        chain_groups(Residual().state_dict())
    ln = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)).state_dict()
    with pytest.raises(AlignmentError, match="LayerNorm"):
        chain_groups(ln)
    base = models.build("mlp", (1, 8, 8), 10).state_dict()
    fewer_classes = dict(base)
    fewer_classes["net.3.weight"] = torch.zeros(9, 128)
    with pytest.raises(AlignmentError, match=r"'net.3.weight' has shape \[9, 128\], the base \[10, 128\]"):
        align(fewer_classes, base)
    integer = dict(base)
    integer["net.1.weight"] = base["net.1.weight"].round().to(torch.int64)
    with pytest.raises(AlignmentError, match=r"'net.1.weight' is torch.int64 in the suspect, torch.float32"):
        align(integer, base)
    (tmp_path / "g.json").write_text("[" + __import__("json").dumps(chain_groups(base)[0].to_json()) + "]")
    assert load_groups(tmp_path / "g.json") == chain_groups(base)
    (tmp_path / "bad.json").write_text('[{"name": "x", "members": [["w", "sideways", 0, 1]]}]')
    with pytest.raises(AlignmentError, match="role must be one of"):
        load_groups(tmp_path / "bad.json")


def test_explicit_groups_align_a_model_the_chain_cannot():
    """A user's spec for a residual block: both branches write into the same 6 units."""

    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(8, 6)
            self.skip = nn.Linear(8, 6)
            self.out = nn.Linear(6, 3)

    sd = Res().state_dict()
    group = UnitGroup.from_json({"name": "stream", "members": [
        ["inp.weight", "rows", 0, 1], ["inp.bias", "bias", 0, 1], ["skip.weight", "rows", 0, 1],
        ["skip.bias", "bias", 0, 1], ["out.weight", "cols", 1, 1]]})  # fmt: skip
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    shuffled = {k: v[:, perm] if k == "out.weight" else v if k == "out.bias" else v[perm] for k, v in sd.items()}
    aligned, rep = align(shuffled, sd, [group])
    assert rep.permuted > 0 and _carrier_equal(aligned, sd) == 0.0


def test_missing_units_read_as_zeros():
    base = models.build("mlp", (1, 8, 8), 10).state_dict()
    narrow = {"net.1.weight": base["net.1.weight"][:120], "net.1.bias": base["net.1.bias"][:120],
              "net.3.weight": base["net.3.weight"][:, :120], "net.3.bias": base["net.3.bias"]}  # fmt: skip
    aligned, rep = align(narrow, base)
    assert rep.missing == 8
    assert torch.equal(aligned["net.1.weight"][:120], base["net.1.weight"][:120])
    assert float(aligned["net.1.weight"][120:].abs().sum()) == 0.0


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.integers(6, 40), st.floats(0.25, 4.0))
def test_scale_fit_ignores_spikes_in_up_to_a_fifth_of_a_short_row(seed, size, scale):
    """The fit that undoes a rescaled unit: exact without spikes and with spikes of 5-500x in up to 20% of
    the entries (2 of a 10-entry output column was enough to break a least-squares first fit)."""
    from securemark.fingerprint.align import _robust_scale

    rng = np.random.default_rng(seed)
    b = rng.normal(size=size)
    s = scale * b
    assert _robust_scale(s, b) == pytest.approx(scale, rel=1e-9)
    hit = rng.choice(size, size=max(1, size // 5), replace=False)
    s[hit] += rng.choice([-1, 1], len(hit)) * np.exp(rng.uniform(np.log(5), np.log(500), len(hit))) * b.std()
    assert _robust_scale(s, b) == pytest.approx(scale, rel=1e-9)


def test_malformed_groups_and_tensors_are_alignment_errors():
    base = models.build("mlp", (1, 8, 8), 10).state_dict()
    for member in (["net.1.weight", "rows", 5, 1], ["net.1.weight", "rows", 0, 0], ["net.1.weight", "rows", -1, 1]):
        with pytest.raises(AlignmentError):
            groups = [UnitGroup.from_json({"name": "g", "members": [member, ["net.3.weight", "cols", 1, 1]]})]
            align(dict(base), base, groups)
    scalar_bias = dict(base)
    scalar_bias["net.1.bias"] = torch.tensor(0.5)
    with pytest.raises(AlignmentError, match="dimensions"):
        align(scalar_bias, base)
