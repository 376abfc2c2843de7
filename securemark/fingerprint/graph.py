"""Unit groups derived from a model's own graph: every set of tensor axes that a function-preserving
permutation (or scaling, or sign flip) moves together, for any architecture torch.fx can trace.

Why torch.fx: ``symbolic_trace`` keeps module calls (``layer1.0.conv1``) as nodes, so each parameter is named
as the state_dict names it, and it needs no compiler; ``ShapeProp`` on one example input gives every value's
shape (a flatten's H x W block). torch.export would decompose modules into aten ops and lose those names.

Each value that carries hidden units records which dimension holds them, in which *space* and in blocks of
how many entries (fingerprint.spaces). Modules add members to spaces: a Conv/Linear writes a new space (its
weight's rows and bias) and reads its input's (its weight's cols), a depthwise conv reads and writes the same
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
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from securemark.fingerprint.groups import AlignmentError, Member, UnitGroup
from securemark.fingerprint.spaces import (
    ADD,
    HOMOGENEOUS_FUNCTIONS,
    HOMOGENEOUS_MODULES,
    LOOSE,
    OTHER_ELEMENTWISE,
    OTHER_FUNCTIONS,
    REDUCTIONS,
    SCALAR_MUL,
    Feat,
    Spaces,
)
from securemark.fingerprint.verify import verify


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


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Walk:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.spaces = Spaces()
        self.feat: dict[fx.Node, Feat | None] = {}
        self.seen: set[str] = set()  # parameters the walk has placed
        self.calls: dict[str, tuple[int, Feat]] = {}  # a module called before: the space it read, what it gave

    def refuse(self, node: fx.Node, why: str) -> AlignmentError:
        return AlignmentError(f"node {node.name!r} ({node.op} {_name(node.target)}): {why}")

    def add(self, space: int, member: Member) -> None:
        self.spaces.get(space).members.append(member)
        self.seen.add(member.tensor)

    def same(self, node: fx.Node, f: Feat, op: str = "") -> Feat:
        """The output carries the input's units (an elementwise or pooling op); ``op`` names a
        non-homogeneous one. An op that changes the units' count (a pooling over them) is refused."""
        if f.dim != LOOSE:
            shapes = _shape(node), _shape(node.all_input_nodes[0])
            if shapes[0] is None or shapes[1] is None or shapes[0][f.dim] != shapes[1][f.dim]:
                raise self.refuse(node, "an operation that changes the number of units (pooling over them)")
        if op:
            self.spaces.get(f.space).ops.add((op, f.normed))
        return Feat(f.space, f.dim, f.block, f.normed)

    # --- the walk --------------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            shape = _shape(node)
            fixed = shape is not None and len(shape) >= 2
            self.feat[node] = Feat(self.spaces.new(fixed=True), LOOSE) if fixed else None
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

    # --- shapes --------------------------------------------------------------------------------------
    def _flatten(self, node: fx.Node, f: Feat, start: int, end: int = -1) -> Feat:
        shape = _shape(node.all_input_nodes[0])
        assert shape is not None
        start, end = start % len(shape), end % len(shape)
        if f.dim == LOOSE or start > f.dim or end < f.dim:  # the units' dimension kept whole
            return f.moved(f.dim if start > f.dim else f.dim - (end - start))
        if math.prod(shape[start : f.dim]) != 1:
            raise self.refuse(node, "a flatten that puts other entries before the units' is not covered")
        return f.moved(start, f.block * math.prod(shape[f.dim + 1 : end + 1]))

    def _reshape(self, node: fx.Node, f: Feat, before: tuple[int, ...], after: tuple[int, ...]) -> Feat:
        """A reshape that keeps the units' dimension whole (merging or splitting others around it), or merges
        it with the dimensions after it (a flatten: each unit a block)."""
        if f.dim == LOOSE:
            return f
        lead = math.prod(before[: f.dim])
        for k in range(len(after)):
            if math.prod(after[:k]) != lead:
                continue
            if after[k] == before[f.dim]:
                return f.moved(k)
            for end in range(f.dim + 1, len(before) + 1):
                if after[k] == math.prod(before[f.dim : end]):
                    return f.moved(k, f.block * math.prod(before[f.dim + 1 : end]))
        raise self.refuse(node, f"a reshape from {list(before)} to {list(after)} that splits the units")

    def _function(self, node: fx.Node) -> Feat | None:
        target = node.target
        key = target if node.op == "call_function" else str(target)
        inputs = [a for a in node.all_input_nodes if self.feat.get(a) is not None]
        if not inputs:
            return None
        f = self.feat[inputs[0]]
        assert f is not None
        after, before = _shape(node), _shape(inputs[0])
        if before is None and key is operator.getitem:  # MultiheadAttention's (output, weights)
            return f if node.args[1] == 0 else None
        if after is None or before is None:  # x.size(), x.shape, x.dim(): no tensor out
            return None
        if key in ADD:
            return self._sum(node, f, inputs, before, after)
        if key in SCALAR_MUL:
            return self._product(node, f, key, inputs)
        if key in HOMOGENEOUS_FUNCTIONS:
            return self.same(node, f)
        if key in OTHER_FUNCTIONS:
            return self.same(node, f, _name(target))
        if f.dim == LOOSE and key not in (torch.cat, torch.concat):  # the input's own units, reshaped or not
            return f
        return self._layout(node, key, f, inputs, before, after)

    def _layout(
        self, node: fx.Node, key: object, f: Feat, inputs: list[fx.Node], before: tuple[int, ...],
        after: tuple[int, ...],
    ) -> Feat:  # fmt: skip
        """Operations that move the units' dimension: flatten, reshape, transpose, permute, squeeze,
        indexing, concatenation, reductions."""
        nd = len(before)
        if key in (torch.flatten, "flatten"):
            return self._flatten(node, f, int(_arg(node, 1, "start_dim", 0)), int(_arg(node, 2, "end_dim", -1)))
        if key in ("view", "reshape", torch.reshape):
            return self._reshape(node, f, before, after)
        if key in ("transpose", torch.transpose):
            a, b = (int(x) % nd for x in node.args[1:3])  # type: ignore[arg-type]
            return f.moved(b if f.dim == a else a if f.dim == b else f.dim)
        if key in ("permute", torch.permute):
            given: Any = node.args[1] if isinstance(node.args[1], tuple | list) else node.args[1:]
            return f.moved([int(d) % nd for d in given].index(f.dim))
        if key in ("squeeze", "unsqueeze", torch.squeeze, torch.unsqueeze):
            return self._reshape(node, f, before, after)
        if key in ("expand", "repeat"):
            if len(after) != nd or after[f.dim] != before[f.dim]:
                raise self.refuse(node, "an expand or repeat along the units")
            return f
        if key is operator.getitem:
            if f.dim == nd - 1 and after[-1] == before[-1] and f.block == 1:
                return f.moved(len(after) - 1)
            raise self.refuse(node, "indexing that may select units is not covered")
        if key in (torch.cat, torch.concat):
            return self._cat(node, f, inputs, before)
        if key in REDUCTIONS:
            dims = _arg(node, 1, "dim", None)
            if dims is None:
                raise self.refuse(node, "a reduction over every dimension (units included)")
            dims = [int(d) % nd for d in (dims if isinstance(dims, tuple | list) else [dims])]
            if f.dim in dims:
                raise self.refuse(node, "a reduction over the units")
            keep = bool(_arg(node, 2, "keepdim", False))
            return f.moved(f.dim if keep else f.dim - sum(d < f.dim for d in dims))
        raise self.refuse(node, "an operation on hidden units that the derived unit groups do not cover")

    def _sum(
        self, node: fx.Node, f: Feat, inputs: list[fx.Node], before: tuple[int, ...], after: tuple[int, ...]
    ) -> Feat:
        """A residual add: both sides' units are one space (dimensions compared from the last, as broadcasting
        aligns them). A constant added is no positively homogeneous function."""
        known = [a for a in inputs if self.feat[a].dim != LOOSE]  # type: ignore[union-attr]
        lead = self.feat[known[0]] if known else f
        assert lead is not None
        for a in inputs:
            g, shape = self.feat[a], _shape(a)
            assert g is not None and shape is not None
            if g.dim != LOOSE and lead.dim != LOOSE and (g.dim - len(shape), g.block) != (
                lead.dim - len(_shape(known[0]) or ()), lead.block
            ):  # fmt: skip
                raise self.refuse(node, "a sum of values whose units lie on different dimensions")
            self.spaces.union(f.space, g.space)
        if any(isinstance(a, fx.Node) and self.feat.get(a) is None and _numel(a) > 1 for a in node.args):
            raise self.refuse(node, "a sum with a tensor that is no layer (a per-channel constant) is not covered")
        if len(inputs) < len([a for a in node.args if not isinstance(a, str)]):  # a constant term
            self.spaces.get(f.space).ops.add(("shift", lead.normed))
        normed = all(self.feat[a].normed for a in inputs)  # type: ignore[union-attr]
        dim = LOOSE if lead.dim == LOOSE else lead.dim + len(after) - len(_shape(known[0]) or before)
        return Feat(f.space, dim, lead.block, normed)

    def _product(self, node: fx.Node, f: Feat, key: object, inputs: list[fx.Node]) -> Feat:
        if len(inputs) > 1:
            raise self.refuse(node, "a product of two values with units (gating) is not covered")
        others = [a for a in node.args if a is not inputs[0]]
        if any(isinstance(a, fx.Node) for a in others):
            raise self.refuse(node, "a product with a tensor that is no layer (a per-channel factor) is not covered")
        if key in (operator.truediv, "div") and node.args[0] is not inputs[0]:
            self.spaces.get(f.space).ops.add(("reciprocal", f.normed))  # c / x
        return Feat(f.space, f.dim, f.block, f.normed)

    def _cat(self, node: fx.Node, f: Feat, inputs: list[fx.Node], before: tuple[int, ...]) -> Feat:
        dim = int(_arg(node, 1, "dim", 0)) % len(before)
        if f.dim != LOOSE and dim == f.dim:
            raise self.refuse(node, "a concatenation along the units (channels) is not covered yet")
        if len(inputs) != len(node.args[0]):  # type: ignore[arg-type]
            raise self.refuse(node, "a concatenation with a constant along the units' space")
        for a in inputs[1:]:
            g = self.feat[a]
            assert g is not None
            if LOOSE not in (f.dim, g.dim) and (g.dim, g.block) != (f.dim, f.block):
                raise self.refuse(node, "a concatenation of values whose units lie on different dimensions")
            self.spaces.union(f.space, g.space)
        lead = next((self.feat[a] for a in inputs if self.feat[a].dim != LOOSE), f)  # type: ignore[union-attr]
        assert lead is not None
        return Feat(f.space, lead.dim, lead.block, all(self.feat[a].normed for a in inputs))  # type: ignore[union-attr]

    def check_covered(self) -> None:
        for name, p in self.gm.named_parameters():
            if p.is_floating_point() and name not in self.seen:
                raise AlignmentError(f"parameter {name!r} is not reached by the traced graph as a layer the derived "
                                     "unit groups know (used in forward in a way not covered)")  # fmt: skip


def _numel(node: fx.Node) -> int:
    shape = _shape(node)
    return math.prod(shape) if shape is not None else 1


def _name(target: object) -> str:
    return getattr(target, "__name__", None) or str(target)


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)
