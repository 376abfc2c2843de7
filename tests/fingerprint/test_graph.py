"""Unit groups derived from a model's graph (fingerprint.graph): for every model of the corpus, written as its
public reference writes it, every rewrite the groups admit leaves the outputs unchanged on real data, and
alignment puts the rewritten weights back exactly; what the derivation cannot cover is refused by name."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from securemark import corpus, data
from securemark.attacks import rewrite as R
from securemark.fingerprint.align import align, chain_groups
from securemark.fingerprint.graph import derive
from securemark.fingerprint.groups import AlignmentError

NAMES = sorted(corpus.CORPUS)


@functools.cache
def _case(name: str) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor, list]:
    """A corpus model with BatchNorm statistics of real data (digits at 3x32x32), its state, inputs, groups."""
    torch.manual_seed(0)
    model = corpus.build(name)
    x = data.digits_rgb().x[:64]
    model.train()
    with torch.no_grad():
        model(x)  # running statistics of real images
    model.eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    return model, sd, x, derive(model, x[:1]).groups


def _outputs(name: str, sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    model = corpus.build(name)
    model.load_state_dict(sd)
    model.eval()
    with torch.no_grad():
        return model(x).double()


def _carrier_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b if b[k].dim() >= 2)


def _rewrite_all(sd: dict, groups: list, rng: np.random.Generator) -> dict:
    out, _ = R.rescale(sd, rng, groups=groups)
    out, _ = R.signflip(out, rng, groups=groups)
    out, _ = R.permute(out, rng, groups=groups)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_every_admitted_rewrite_keeps_the_outputs_and_is_undone(name):
    _, sd, x, groups = _case(name)
    out = _rewrite_all(sd, groups, np.random.default_rng(1))
    ref = _outputs(name, sd, x)
    assert _carrier_error(out, sd) > 1e-2  # the rewrite moved the carrier
    # float32 through up to 20 layers: 1e-4 of the logits' scale
    torch.testing.assert_close(_outputs(name, out, x), ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
    aligned, rep = align(out, sd, groups)
    assert rep.permuted > 0
    assert _carrier_error(aligned, sd) < 1e-5


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from(NAMES))
def test_widened_and_rewritten_copies_are_undone_over_seeds(seed, name):
    _, sd, _, groups = _case(name)
    rng = np.random.default_rng(seed)
    out, _ = R.widen(sd, rng, groups=groups)
    out = _rewrite_all(out, groups, rng)
    aligned, _ = align(out, sd, groups)
    assert _carrier_error(aligned, sd) < 1e-5


def test_the_groups_of_a_resnet_follow_its_streams():
    """ResNet-8 (torchvision layout): one group per stage's residual stream (the stem or the downsample, every
    block's conv2 and BatchNorm, and every reader), one per block's hidden channels; worked out by hand."""
    _, _, _, groups = _case("resnet8")
    by_name = {g.name: g for g in groups}
    assert sorted(by_name) == ["conv1", "layer1.0.conv1", "layer2.0.conv1", "layer2.0.downsample.0",
                               "layer3.0.conv1", "layer3.0.downsample.0"]  # fmt: skip
    stream = by_name["conv1"]
    assert {m.tensor for m in stream.of("rows")} == {"conv1.weight", "layer1.0.conv2.weight"}
    assert {m.tensor for m in stream.of("cols")} == {"layer1.0.conv1.weight", "layer2.0.conv1.weight",
                                                    "layer2.0.downsample.0.weight"}  # fmt: skip
    affine = {(m.tensor, m.of) for m in stream.of("affine")}
    assert affine == {("bn1.weight", "conv1.weight"), ("layer1.0.bn2.weight", "layer1.0.conv2.weight")}
    last = by_name["layer3.0.downsample.0"]
    assert [m.tensor for m in last.of("cols")] == ["fc.weight"]
    assert all(g.admits == ("permute", "rescale", "absorb", "signflip", "widen") for g in groups)


def test_the_groups_of_a_vit_hold_its_heads_and_stream():
    _, sd, _, groups = _case("vit-tiny")
    stream = groups[0]
    writers = {m.tensor for m in stream.of("rows")}
    assert writers >= {"patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.attn.proj.weight",
                       "blocks.1.mlp.fc2.weight"}  # fmt: skip
    assert "head.weight" in {m.tensor for m in stream.of("cols")}
    assert stream.admits == ("permute", "rescale")  # LayerNorm outputs feed only linear readers; no unit added
    heads = next(g for g in groups if g.name == "blocks.0.attn.qkv")
    qkv = heads.of("rows")[0]
    dim = sd["blocks.0.attn.qkv.weight"].shape[1]
    assert (qkv.outer, qkv.block) == (3, dim // 2)  # 3 x 2 heads x head_dim rows
    assert heads.admits == ("permute",)  # a softmax inside
    assert next(g for g in groups if g.name == "blocks.0.mlp.fc1").admits == ("permute", "widen")  # GELU: no rescale


def test_admits_follow_the_activations():
    _, _, _, groups = _case("mobilenet-v2")
    expanded = [g for g in groups if any(m.tensor.endswith("conv.1.0.weight") for m in g.members)]
    assert expanded and all("rescale" not in g.admits and "signflip" in g.admits for g in expanded)  # ReLU6


def test_the_flower_net_graph_gives_its_chain():
    _, sd, _, groups = _case("flower-net")
    chain = chain_groups(sd)
    assert [g.name for g in groups] == [g.name for g in chain]
    assert [sorted(m.to_json()[:4] for m in g.members) for g in groups] == [
        sorted(m.to_json()[:4] for m in g.members) for g in chain
    ]


class _Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


class _Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class _Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.a(x) * torch.sigmoid(self.b(x)))


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if x.sum() > 0 else -self.a(x)  # data-dependent control flow: torch.fx cannot trace it


class _Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cumsum(self.a(x), dim=1))


@pytest.mark.parametrize(
    ("model", "shape", "why"),
    [
        (_Cat(), (1, 3, 8, 8), r"node 'cat'.*concatenation along the units"),
        (_Grouped(), (1, 3, 8, 8), r"node 'b'.*grouped convolution \(2 groups"),
        (_Gate(), (1, 3), r"node 'mul'.*gating"),
        (_Branchy(), (1, 3), r"torch.fx cannot trace the model"),
        (_Unknown(), (1, 3), r"node 'cumsum'.*do not cover"),
        (
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 6, 6]), nn.Flatten(), nn.Linear(144, 2)),
            (1, 3, 8, 8),
            r"LayerNorm over more than",
        ),
        (nn.Sequential(nn.Linear(3, 4)), (1, 5), r"does not run on an example input of shape \[1, 5\]"),
    ],
)
def test_what_the_derivation_cannot_cover_is_refused_by_name(model, shape, why):
    with pytest.raises(AlignmentError, match=why):
        derive(model, torch.zeros(shape))


# --- models written the ways users write them, which the derivation must read right or refuse ------------------
class _Shared(nn.Module):
    """One Linear applied to two branches (a siamese projection): one group for its rows, one for its cols."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.shared, self.head = nn.Linear(3, 6), nn.Linear(3, 6), nn.Linear(6, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.shared(self.a(x))) + torch.relu(self.shared(self.b(x))))


class _NeoxHeads(nn.Module):
    """Attention named like timm's, its fused qkv laid out per head (heads x 3 x head_dim): another layout."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.qkv, self.proj = 2, nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, self.num_heads, 3, c // self.num_heads).permute(3, 0, 2, 1, 4).unbind(0)
        return self.proj((torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v).transpose(1, 2).reshape(b, n, c))


class _Neox(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(4, 8), _NeoxHeads(), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(h + self.attn(h))[:, 0]


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class _Shifted(nn.Module):
    """Units that pass relu(x - 0.5), 1 / (1 + relu(x)) and relu(bn(y) + y): no rescale, no sign flip."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Conv1d(6, 6, 1)
        self.bn, self.head = nn.BatchNorm1d(6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x) - 0.5)
        h = 1.0 / (1.0 + torch.relu(self.b(h)))
        y = self.c(h.unsqueeze(-1))
        return self.head(torch.relu(self.bn(y) + y).squeeze(-1))


class _Aux(nn.Module):
    """A head defined and never called (an auxiliary classifier at inference): no rewrite moves it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head, self.aux = nn.Conv1d(3, 6, 3), nn.Linear(6, 2), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(x)).mean(-1))


def test_a_module_called_twice_is_one_group_and_tied_weights_are_refused():
    model = _Shared()
    groups = derive(model, torch.zeros(1, 3)).groups
    assert [g.name for g in groups] == ["a", "shared"]  # a and b write what shared reads: one group
    shared = [g for g in groups if any(m.tensor == "shared.weight" and m.role == "rows" for m in g.members)]
    assert len(shared) == 1 and [m.role for m in shared[0].members].count("rows") == 1
    assert sum(m.tensor == "shared.weight" and m.role == "cols" for g in groups for m in g.members) == 1
    with pytest.raises(AlignmentError, match="tied weights"):
        derive(_Tied(), torch.zeros(1, 4))


def test_a_layout_the_derivation_misreads_is_refused_by_the_check_on_the_model():
    with pytest.raises(AlignmentError, match="permuting its units changes the model's outputs"):
        derive(_Neox(), torch.zeros(1, 5, 4))


def test_what_a_group_admits_is_what_the_model_admits():
    by_writer = {g.of("rows")[0].tensor: g.admits for g in derive(_Shifted(), torch.zeros(1, 4)).groups}
    only = ("permute", "widen")  # units that feed nothing can be added; no rescale, no sign flip
    assert by_writer == {"a.weight": only, "b.weight": only, "c.weight": only}


def test_fixed_and_unused_weights_are_exempt_and_other_layouts_are_read():
    derived = derive(_Aux(), torch.zeros(1, 3, 10))  # a Conv1d first: the input's layout is the layer's
    assert derived.exempt == ["aux.bias", "aux.weight", "head.bias"]  # head.bias: the classes, fixed
    patchify = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(2), nn.Linear(4, 4))  # (B, 8, 4) -> Linear
    with pytest.raises(AlignmentError):  # a Linear over the positions, not the units
        derive(patchify, torch.zeros(1, 3, 8, 8))
    pooled = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool1d(2))  # pooling over units is refused
    with pytest.raises(AlignmentError):
        derive(pooled, torch.zeros(1, 3, 6, 6))
