"""Unit groups derived from a model's own graph: every set of tensor axes that a function-preserving
permutation (or scaling, or sign flip) moves together, for any architecture torch.fx can trace.

Why torch.fx: ``symbolic_trace`` keeps module calls (``layer1.0.conv1``) as nodes, so each parameter is named
as the state_dict names it, and it needs no compiler; ``ShapeProp`` on one example input gives every value's
shape (a flatten's H x W block). torch.export would decompose modules into aten ops and lose those names.

Each value that carries hidden units records which dimension holds them, in which *space* and in blocks of
how many entries (fingerprint.spaces; operations on values other than modules: fingerprint.valueops).
Modules add members to spaces: a Conv/Linear writes a new space (its weight's rows and bias) and reads its
input's (its weight's cols), a depthwise conv reads and writes the same
space, BatchNorm and LayerNorm add their statistics and affine parameters, attention adds a space of heads
(rows of a fused q/k/v projection laid out as 3 x heads x head_dim, the output projection's cols). A module
called twice reads one space and writes one. The model's input and output spaces are fixed: the pirate cannot
reorder the channels it is fed nor the classes it answers with (input-side rewrites are not covered yet).

What is not covered is refused with the node and the reason (a concatenation along channels, grouped
convolutions other than depthwise, gating products, tied weights, an operation this module does not know),
and every group found is then tried on the model itself (fingerprint.verify): a permutation that changes the
outputs refuses the model, a rescale or sign flip that does is not admitted. So a model is either derived
whole and right, or not at all: a tracer never aligns half a model silently.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from securemark.fingerprint.groups import AlignmentError, Member, UnitGroup
from securemark.fingerprint.spaces import (
    HOMOGENEOUS_MODULES,
    LOOSE,
    OTHER_ELEMENTWISE,
    Feat,
    Spaces,
)
from securemark.fingerprint.valueops import ValueOps, _shape
from securemark.fingerprint.verify import verify

FX_INPUT = "placeholder"  # torch.fx's own name (Node.op) for a graph input node: a real value, not a stand-in


def _is_attention(mod: nn.Module) -> bool:
    """timm's layout (``qkv`` and ``proj`` Linear layers, ``num_heads``) or torch's MultiheadAttention; the
    head layout is then checked on the model (fingerprint.verify)."""
    if isinstance(mod, nn.MultiheadAttention):
        return True
    qkv, proj = getattr(mod, "qkv", None), getattr(mod, "proj", None)
    heads = getattr(mod, "num_heads", None)
    return isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_attention(m) or super().is_leaf_module(m, qualname)


@dataclass(frozen=True)
class Derived:
    """The unit groups of a model, the weights no group moves (the input's and output's own, and parameters
    forward never uses: a rewrite cannot move the former, and the latter change nothing), and a digest of
    the graph (a changed class is noticed)."""

    groups: list[UnitGroup]
    exempt: list[str]
    digest: str


def derive(model: nn.Module, example: torch.Tensor) -> Derived:
    """The unit groups of ``model``, traced with torch.fx, run once on ``example`` (one input batch) and
    checked on it. AlignmentError names the node or tensor a derivation cannot cover."""
    _check_untied(model)
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # torch.fx raises anything from user code it cannot trace through
        raise AlignmentError(f"torch.fx cannot trace the model: {_one_line(exc)}") from None
    gm = fx.GraphModule(model, graph)
    was_training = model.training
    model.eval()
    gm.eval()
    try:
        with torch.no_grad():
            model(example)  # first on its own: ShapeProp and GraphModule print a failing node's traceback
            ShapeProp(gm).propagate(example)
    except Exception as exc:  # the user's forward on the example input
        raise AlignmentError(f"the model does not run on an example input of shape {list(example.shape)}: "
                             f"{_one_line(exc)}") from None  # fmt: skip
    finally:
        model.train(was_training)
    walk = _Walk(gm)
    for node in gm.graph.nodes:
        walk.visit(node)
    groups, fixed = walk.spaces.groups()
    walk.check_covered()
    used = set(gm.state_dict())
    unused = {k for k, t in model.state_dict().items() if t.is_floating_point() and k not in used}
    shapes = [(n.op, str(n.target), str(_shape(n))) for n in gm.graph.nodes]
    digest = hashlib.sha256(repr((gm.code, shapes)).encode()).hexdigest()
    return Derived(verify(model, groups, example), sorted(fixed | unused), digest)


def _check_untied(model: nn.Module) -> None:
    """Tied weights (one tensor under two names) would be rewritten as two: refused."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in names:
            raise AlignmentError(f"parameters {names[id(p)]!r} and {name!r} are one tensor (tied weights): not covered")
        names[id(p)] = name


def _one_line(exc: BaseException) -> str:
    """The innermost cause's first line (torch.fx wraps errors in node dumps and tracebacks)."""
    while (inner := exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)) is not None:
        exc = inner
    lines = str(exc).strip().splitlines() or [""]
    if lines[0].startswith("Traceback"):  # a message that carries its own traceback ends in the error's line
        return lines[-1]
    return f"{type(exc).__name__}: {lines[0]}"


class _Walk(ValueOps):
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.spaces = Spaces()
        self.feat: dict[fx.Node, Feat | None] = {}
        self.seen: set[str] = set()  # parameters the walk has placed
        self.calls: dict[str, tuple[int, Feat]] = {}  # a module called before: the space it read, what it gave

    def add(self, space: int, member: Member) -> None:
        self.spaces.get(space).members.append(member)
        self.seen.add(member.tensor)

    # --- the walk --------------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        if node.op == FX_INPUT:
            self.feat[node] = self._input(node)
        elif node.op == "get_attr":
            self.feat[node] = self._param(node)
        elif node.op == "call_module":
            self.feat[node] = self._module(node, self.modules[str(node.target)])
        elif node.op in ("call_function", "call_method"):
            self.feat[node] = self._function(node)
        elif node.op == "output":
            for a in node.all_input_nodes:
                f = self.feat.get(a)
                if f is not None:
                    self.spaces.get(f.space).fixed = True
        else:
            raise self.refuse(node, "not covered")

    def _input(self, node: fx.Node) -> Feat | None:
        """A model input: its units are fixed (the pirate cannot reorder the channels it is fed), on whatever
        dimension the first layer reads (LOOSE: a Conv1d's (B, C, L), a ViT's (B, N, D) alike). An input that
        is no tensor of at least two dimensions (an argument left at its default, a flag) carries none; a layer
        with weights fed from it alone is refused in _module."""
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None
        return Feat(self.spaces.new(fixed=True), LOOSE)

    def _param(self, node: fx.Node) -> Feat | None:
        """A parameter used in forward as a value (a class token, a position embedding): it writes into the
        space of whatever it is added or concatenated to, along its last dimension."""
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None  # a 1-D one is refused by check_covered unless some layer holds it
        space = self.spaces.new()
        self.add(space, Member(str(node.target), "rows", axis=len(shape) - 1))
        return Feat(space, len(shape) - 1)

    def input_feat(self, node: fx.Node) -> Feat | None:
        feats = [f for f in (self.feat.get(a) for a in node.all_input_nodes) if f is not None]
        return feats[0] if feats else None

    def _module(self, node: fx.Node, mod: nn.Module) -> Feat | None:
        f = self.input_feat(node)
        name = str(node.target)
        if f is None:
            if any(True for _ in mod.parameters(recurse=True)):
                raise self.refuse(node, "a layer with weights whose input carries no traced units")
            return None
        if any(True for _ in mod.parameters(recurse=True)) and name in self.calls:
            return self._again(node, name, f)
        if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Linear):
            out = self._layer(node, mod, name, f)
        elif isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
            out = self._norm(node, mod, name, f, "batch")
        elif isinstance(mod, nn.LayerNorm):
            out = self._norm(node, mod, name, f, "layer")
        elif _is_attention(mod):
            out = self._attention(node, mod, name, f)
        elif isinstance(mod, HOMOGENEOUS_MODULES):
            return self.same(node, f)
        elif isinstance(mod, OTHER_ELEMENTWISE):
            return self.same(node, f, type(mod).__name__)
        elif isinstance(mod, nn.Flatten):
            return self._flatten(node, f, mod.start_dim, mod.end_dim)
        else:
            raise self.refuse(node, f"{type(mod).__name__} is not covered by the derived unit groups")
        self.calls[name] = (f.space, out)
        return out

    def _again(self, node: fx.Node, name: str, f: Feat) -> Feat:
        """A module with weights called again: it reads the same space as before and writes the same one."""
        space, out = self.calls[name]
        self.spaces.union(space, f.space)
        return Feat(out.space, out.dim if f.dim != LOOSE else LOOSE, out.block, out.normed)

    def _layer(self, node: fx.Node, mod: nn.Conv1d | nn.Conv2d | nn.Linear, name: str, f: Feat) -> Feat:
        shape = _shape(node.all_input_nodes[0])
        assert shape is not None
        linear = isinstance(mod, nn.Linear)
        want = len(shape) - 1 if linear else 1
        if f.dim not in (want, LOOSE):
            raise self.refuse(node, f"its input's units are on dimension {f.dim}, the layer reads dimension {want}")
        if not linear and f.block != 1:
            raise self.refuse(node, "a convolution over flattened units")
        weight = f"{name}.weight"
        self.spaces.get(f.space).reads.add(f.normed)
        groups = 1 if linear else mod.groups
        if groups == 1:
            out = self.spaces.new()
            self.add(f.space, Member(weight, "cols", axis=1, block=f.block))
        elif f.block == 1 and groups == mod.in_channels == mod.out_channels:  # depthwise: the same units
            out = f.space
            self.spaces.get(out).self_read = True
        else:
            raise self.refuse(node, f"a grouped convolution ({groups} groups of {mod.in_channels} channels) is not "
                                    "covered (only depthwise)")  # fmt: skip
        self.add(out, Member(weight, "rows"))
        if mod.bias is not None:
            self.add(out, Member(f"{name}.bias", "bias", of=weight))
        return Feat(out, want, 1, False, weight)

    def _norm(self, node: fx.Node, mod: nn.Module, name: str, f: Feat, kind: str) -> Feat:
        shape = _shape(node)
        assert shape is not None
        if kind == "layer":
            normalized = tuple(mod.normalized_shape)  # type: ignore[arg-type]
            if f.dim not in (len(shape) - 1, LOOSE) or f.block != 1 or len(normalized) != 1:
                raise self.refuse(node, "a LayerNorm over more than the units' own dimension is not covered")
        elif f.dim not in (1, LOOSE) or f.block != 1:
            raise self.refuse(node, "a BatchNorm over a dimension other than the units'")
        source = node.all_input_nodes[0]  # the writer's own BatchNorm only if nothing else reads its output
        of = f.writer if kind == "batch" and len(source.users) == 1 else ""
        if kind == "batch" and getattr(mod, "running_mean", None) is not None:
            self.add(f.space, Member(f"{name}.running_mean", "mean", of=of))
            self.add(f.space, Member(f"{name}.running_var", "var", of=of))
        if getattr(mod, "weight", None) is not None:
            self.add(f.space, Member(f"{name}.weight", "affine", of=of))
        if getattr(mod, "bias", None) is not None:
            self.add(f.space, Member(f"{name}.bias", "shift", of=of))
        self.spaces.get(f.space).norm_kinds.add(kind)
        return Feat(f.space, f.dim, 1, True)

    def _attention(self, node: fx.Node, mod: nn.Module, name: str, f: Feat) -> Feat:
        shape = _shape(node.all_input_nodes[0])
        assert shape is not None
        if f.dim not in (len(shape) - 1, LOOSE) or f.block != 1:
            raise self.refuse(node, "attention over a dimension other than the units'")
        m: Any = mod
        if isinstance(mod, nn.MultiheadAttention):
            if not mod._qkv_same_embed_dim or len({id(a) for a in node.all_input_nodes}) != 1:
                raise self.refuse(node, "MultiheadAttention is covered as self-attention with one in_proj only")
            qkv, qkv_bias, proj = f"{name}.in_proj_weight", f"{name}.in_proj_bias", f"{name}.out_proj"
            has_bias, proj_bias = mod.in_proj_bias is not None, mod.out_proj.bias is not None
        else:
            qkv, qkv_bias, proj = f"{name}.qkv.weight", f"{name}.qkv.bias", f"{name}.proj"
            has_bias, proj_bias = m.qkv.bias is not None, m.proj.bias is not None
        heads, dim = int(m.num_heads), shape[-1]
        if dim % heads:
            raise self.refuse(node, f"{dim} channels do not split into {heads} heads")
        self.spaces.get(f.space).reads.add(f.normed)
        self.add(f.space, Member(qkv, "cols", axis=1))
        head = self.spaces.new()  # heads move with their q, k and v rows and the output projection's columns
        self.add(head, Member(qkv, "rows", outer=3, block=dim // heads))
        if has_bias:
            self.add(head, Member(qkv_bias, "bias", outer=3, block=dim // heads, of=qkv))
        self.add(head, Member(f"{proj}.weight", "cols", axis=1, block=dim // heads))
        self.spaces.get(head).ops.add(("softmax", False))
        out = self.spaces.new()
        self.add(out, Member(f"{proj}.weight", "rows"))
        if proj_bias:
            self.add(out, Member(f"{proj}.bias", "bias", of=f"{proj}.weight"))
        return Feat(out, len(shape) - 1, 1, False, f"{proj}.weight")  # MultiheadAttention's tuple: see getitem

    def check_covered(self) -> None:
        for name, p in self.gm.named_parameters():
            if p.is_floating_point() and name not in self.seen:
                raise AlignmentError(f"parameter {name!r} is not reached by the traced graph as a layer the derived "
                                     "unit groups know (used in forward in a way not covered)")  # fmt: skip
