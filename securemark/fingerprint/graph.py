"""Unit groups derived from a model's own graph: every set of tensor axes that a function-preserving
permutation (or scaling, or sign flip) moves together, for any architecture torch.fx can trace.

Why torch.fx: ``symbolic_trace`` keeps module calls (``layer1.0.conv1``) as nodes, so each parameter is named
as the state_dict names it, and it needs no compiler; ``ShapeProp`` on one example input gives every value's
shape (a flatten's H x W block). torch.export would decompose modules into aten ops and lose those names.

Each value of the graph that carries hidden units records which dimension holds them, in which *space* (a
union-find class: a residual add or a concatenation along tokens makes two spaces one) and in blocks of how
many entries (H*W after a flatten). Modules add members to spaces: a Conv/Linear writes a new space (its
weight's rows and bias) and reads its input's (its weight's cols), a depthwise conv reads and writes the same
space, BatchNorm and LayerNorm add their statistics and affine parameters, attention adds a space of heads
(rows of a fused q/k/v projection laid out as 3 x heads x head_dim, the output projection's cols). The
model's input and output spaces are fixed: the pirate cannot reorder the pixels' channels it is fed nor the
classes it answers with (input-side rewrites are not covered yet). Which rewrites a group admits follows from
what the units pass through: a positive rescale only through positively homogeneous functions (ReLU,
LeakyReLU, max/avg pooling, a sum); a sign flip only where every writer feeds a BatchNorm.

What is not covered is refused with the node and the reason (a concatenation along channels, grouped
convolutions other than depthwise, gating products, an operation this module does not know), so a model is
either derived whole or not at all: a tracer never aligns half a model silently.
"""

from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from securemark.fingerprint.groups import AlignmentError, Member, UnitGroup

HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                       nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout,
                       nn.Identity)  # fmt: skip
OTHER_ELEMENTWISE = (nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardtanh, nn.ELU, nn.Mish)
HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                         F.adaptive_max_pool2d, F.dropout, "relu", "relu_", "contiguous", "clone", "float", "detach",
                         "to", "type_as"}  # fmt: skip
OTHER_FUNCTIONS = {F.relu6, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.hardswish, F.hardtanh, F.elu, "sigmoid",
                   "tanh", "gelu"}  # fmt: skip
ADD = {operator.add, operator.iadd, operator.sub, torch.add, "add", "add_"}
SCALAR_MUL = {operator.mul, operator.truediv, torch.mul, "mul", "div"}


@dataclass(frozen=True)
class _Feat:
    """A value's hidden units: dimension ``dim`` holds ``block`` consecutive entries per unit of ``space``;
    ``normed``: the value is a norm's output (or what a homogeneous function made of one)."""

    space: int
    dim: int
    block: int = 1
    normed: bool = False
    writer: str = ""  # the module whose weight wrote this value, while nothing else has touched it


@dataclass
class _Space:
    members: list[Member] = field(default_factory=list)
    fixed: bool = False
    ops: set[tuple[str, bool]] = field(default_factory=set)  # non-homogeneous functions met, on normed values?
    reads: set[bool] = field(default_factory=set)  # readers (cols) fed with normed values? (one entry per kind)
    norm_kinds: set[str] = field(default_factory=set)  # "batch" / "layer"
    self_read: bool = False  # a depthwise conv reads and writes these units


class _Spaces:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.info: list[_Space] = []

    def new(self, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.info.append(_Space(fixed=fixed))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def get(self, i: int) -> _Space:
        return self.info[self.find(i)]

    def union(self, i: int, j: int) -> None:
        a, b = sorted((self.find(i), self.find(j)))
        if a == b:
            return
        self.parent[b] = a
        x, y = self.info[a], self.info[b]
        x.members += y.members
        x.fixed |= y.fixed
        x.ops |= y.ops
        x.reads |= y.reads
        x.norm_kinds |= y.norm_kinds
        x.self_read |= y.self_read


def _is_attention(mod: nn.Module) -> bool:
    """timm's layout (``qkv`` and ``proj`` Linear layers, ``num_heads``) or torch's MultiheadAttention."""
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
    """The unit groups of a model and a digest of the graph they came from (a changed class is noticed)."""

    groups: list[UnitGroup]
    digest: str


def derive(model: nn.Module, example: torch.Tensor) -> Derived:
    """The unit groups of ``model``, traced with torch.fx and run once on ``example`` (one input batch).
    AlignmentError names the node or tensor a derivation cannot cover."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # torch.fx raises anything from user code it cannot trace through
        raise AlignmentError(f"torch.fx cannot trace the model: {_one_line(exc)}") from None
    gm = fx.GraphModule(model, graph)
    was_training = model.training
    gm.eval()
    try:
        with torch.no_grad():
            gm(example)  # first on its own: ShapeProp prints the traceback of a failing node to stderr
            ShapeProp(gm).propagate(example)
    except Exception as exc:  # the user's forward on the example input
        raise AlignmentError(f"the model does not run on an example input of shape {list(example.shape)}: "
                             f"{_one_line(exc)}") from None  # fmt: skip
    finally:
        model.train(was_training)
    walk = _Walk(gm)
    for node in gm.graph.nodes:
        walk.visit(node)
    groups = walk.groups()
    walk.check_covered()
    shapes = [(n.op, str(n.target), str(_shape(n))) for n in gm.graph.nodes]
    digest = hashlib.sha256(repr((gm.code, shapes)).encode()).hexdigest()
    return Derived(groups, digest)


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
        self.spaces = _Spaces()
        self.feat: dict[fx.Node, _Feat | None] = {}
        self.seen: set[str] = set()  # parameters the walk has placed

    # --- helpers ---------------------------------------------------------------------------------
    def refuse(self, node: fx.Node, why: str) -> AlignmentError:
        return AlignmentError(f"node {node.name!r} ({node.op} {_name(node.target)}): {why}")

    def add(self, space: int, member: Member) -> None:
        self.spaces.get(space).members.append(member)
        self.seen.add(member.tensor)

    def input_feat(self, node: fx.Node) -> _Feat | None:
        feats = [self.feat.get(a) for a in node.all_input_nodes]
        feats = [f for f in feats if f is not None]
        return feats[0] if feats else None

    def same(self, f: _Feat, op: str = "") -> _Feat:
        """The output carries the input's units (an elementwise op); ``op`` names a non-homogeneous one."""
        if op:
            self.spaces.get(f.space).ops.add((op, f.normed))
        return _Feat(f.space, f.dim, f.block, f.normed)

    # --- the walk --------------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            shape = _shape(node)
            if shape is None or len(shape) < 2:
                self.feat[node] = None
                return
            self.feat[node] = _Feat(self.spaces.new(fixed=True), 1 if len(shape) == 4 else len(shape) - 1)
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

    def _param(self, node: fx.Node) -> _Feat | None:
        """A parameter used in forward as a value (a class token, a position embedding): it writes into the
        space of whatever it is added or concatenated to, along its last dimension."""
        shape = _shape(node)
        name = str(node.target)
        if shape is None or len(shape) < 2:
            return None
        space = self.spaces.new()
        self.add(space, Member(name, "rows", axis=len(shape) - 1))
        return _Feat(space, len(shape) - 1)

    def _module(self, node: fx.Node, mod: nn.Module) -> _Feat | None:
        f = self.input_feat(node)
        name = str(node.target)
        if f is None:
            if any(True for _ in mod.parameters(recurse=True)):
                raise self.refuse(node, "a layer with weights whose input carries no traced units")
            return None
        if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Linear):
            return self._layer(node, mod, name, f)
        if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
            return self._norm(node, mod, name, f, "batch")
        if isinstance(mod, nn.LayerNorm):
            return self._norm(node, mod, name, f, "layer")
        if _is_attention(mod):
            return self._attention(node, mod, name, f)
        if isinstance(mod, HOMOGENEOUS_MODULES):
            return self.same(f)
        if isinstance(mod, OTHER_ELEMENTWISE):
            return self.same(f, type(mod).__name__)
        if isinstance(mod, nn.Flatten):
            return self._flatten(node, f, mod.start_dim, mod.end_dim)
        raise self.refuse(node, f"{type(mod).__name__} is not covered by the derived unit groups")

    def _layer(self, node: fx.Node, mod: nn.Conv1d | nn.Conv2d | nn.Linear, name: str, f: _Feat) -> _Feat:
        shape = _shape(node.all_input_nodes[0])
        assert shape is not None
        linear = isinstance(mod, nn.Linear)
        want = len(shape) - 1 if linear else 1
        if f.dim != want:
            raise self.refuse(node, f"its input's units are on dimension {f.dim}, the layer reads dimension {want}")
        if not linear and f.block != 1:
            raise self.refuse(node, "a convolution over flattened units")
        weight, bias = f"{name}.weight", f"{name}.bias"
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
            self.add(out, Member(bias, "bias", of=weight))
        return _Feat(out, want, 1, False, weight)

    def _norm(self, node: fx.Node, mod: nn.Module, name: str, f: _Feat, kind: str) -> _Feat:
        shape = _shape(node)
        assert shape is not None
        space = self.spaces.get(f.space)
        if kind == "layer":
            normalized = tuple(mod.normalized_shape)  # type: ignore[arg-type]
            if f.dim != len(shape) - 1 or f.block != 1 or len(normalized) != 1:
                raise self.refuse(node, "a LayerNorm over more than the units' own dimension is not covered")
        elif f.dim != 1 or f.block != 1:
            raise self.refuse(node, "a BatchNorm over a dimension other than the units'")
        of = f.writer if kind == "batch" else ""
        if kind == "batch" and getattr(mod, "running_mean", None) is not None:
            self.add(f.space, Member(f"{name}.running_mean", "mean", of=of))
            self.add(f.space, Member(f"{name}.running_var", "var", of=of))
        if getattr(mod, "weight", None) is not None:
            self.add(f.space, Member(f"{name}.weight", "affine", of=of))
        if getattr(mod, "bias", None) is not None:
            self.add(f.space, Member(f"{name}.bias", "shift", of=of))
        space.norm_kinds.add(kind)
        return _Feat(f.space, f.dim, 1, True)

    def _attention(self, node: fx.Node, mod: nn.Module, name: str, f: _Feat) -> _Feat:
        shape = _shape(node.all_input_nodes[0])
        assert shape is not None
        if f.dim != len(shape) - 1 or f.block != 1:
            raise self.refuse(node, "attention over a dimension other than the units'")
        if isinstance(mod, nn.MultiheadAttention):
            if not mod._qkv_same_embed_dim or len({id(a) for a in node.all_input_nodes}) != 1:
                raise self.refuse(node, "MultiheadAttention is covered as self-attention with one in_proj only")
            qkv, qkv_bias, proj = f"{name}.in_proj_weight", f"{name}.in_proj_bias", f"{name}.out_proj"
            heads, has_bias, proj_bias = mod.num_heads, mod.in_proj_bias is not None, mod.out_proj.bias is not None
        else:
            m: Any = mod
            qkv, qkv_bias, proj = f"{name}.qkv.weight", f"{name}.qkv.bias", f"{name}.proj"
            heads, has_bias, proj_bias = int(m.num_heads), m.qkv.bias is not None, m.proj.bias is not None
        dim = shape[-1]
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
        return _Feat(out, f.dim, 1, False, f"{proj}.weight")  # MultiheadAttention's (output, weights): getitem

    def _flatten(self, node: fx.Node, f: _Feat, start: int, end: int = -1) -> _Feat:
        shape = _shape(node.all_input_nodes[0])
        assert shape is not None
        nd = len(shape)
        start, end = start % nd, end % nd
        if start > f.dim or end < f.dim:  # the units' dimension kept whole
            return _Feat(f.space, f.dim if start > f.dim else f.dim - (end - start), f.block, f.normed)
        before = 1
        for s in shape[start : f.dim]:
            before *= s
        if before != 1:
            raise self.refuse(node, "a flatten that puts other entries before the units' is not covered")
        after = 1
        for s in shape[f.dim + 1 : end + 1]:
            after *= s
        return _Feat(f.space, start, f.block * after, f.normed)

    def _function(self, node: fx.Node) -> _Feat | None:
        target = node.target
        key = target if node.op == "call_function" else str(target)
        tensor_inputs = [a for a in node.all_input_nodes if self.feat.get(a) is not None]
        if not tensor_inputs:
            return None
        f = self.feat[tensor_inputs[0]]
        assert f is not None
        out_shape, in_shape = _shape(node), _shape(tensor_inputs[0])
        if in_shape is None and key is operator.getitem:  # MultiheadAttention's (output, weights)
            return f if node.args[1] == 0 else None
        if out_shape is None or in_shape is None:  # x.size(), x.shape, x.dim(): no tensor out
            return None
        if key in ADD:
            return self._sum(node, f, tensor_inputs, in_shape, out_shape)
        if key in SCALAR_MUL:
            if len(tensor_inputs) > 1:
                raise self.refuse(node, "a product of two values with units (gating) is not covered")
            return self.same(f)
        if key in HOMOGENEOUS_FUNCTIONS:
            return self.same(f)
        if key in OTHER_FUNCTIONS:
            return self.same(f, _name(target))
        if key in (torch.flatten, "flatten"):
            start = _arg(node, 1, "start_dim", 0)
            end = _arg(node, 2, "end_dim", -1)
            return self._flatten(node, f, int(start), int(end))
        if key in ("view", "reshape", torch.reshape):
            return self._reshape(node, f, in_shape, out_shape)
        if key in ("transpose", torch.transpose):
            a, b = (int(x) % len(in_shape) for x in node.args[1:3])  # type: ignore[arg-type]
            dim = b if f.dim == a else a if f.dim == b else f.dim
            return _Feat(f.space, dim, f.block, f.normed)
        if key == "permute":
            given: Any = node.args[1] if isinstance(node.args[1], tuple | list) else node.args[1:]
            dims = [int(d) % len(in_shape) for d in given]
            return _Feat(f.space, dims.index(f.dim), f.block, f.normed)
        if key in ("expand", "repeat") and out_shape[f.dim] == in_shape[f.dim]:
            return _Feat(f.space, f.dim, f.block, f.normed)
        if key is operator.getitem:
            if f.dim == len(in_shape) - 1 and out_shape[-1] == in_shape[-1] and f.block == 1:
                return _Feat(f.space, len(out_shape) - 1, 1, f.normed)
            raise self.refuse(node, "indexing that may select units is not covered")
        if key in (torch.cat, torch.concat):
            return self._cat(node, f, tensor_inputs, in_shape)
        if key in ("mean", torch.mean, "sum", torch.sum):
            dims = _arg(node, 1, "dim", None)
            if dims is None:
                raise self.refuse(node, "a reduction over every dimension (units included)")
            dims = [int(d) % len(in_shape) for d in (dims if isinstance(dims, tuple | list) else [dims])]
            if f.dim in dims:
                raise self.refuse(node, "a reduction over the units")
            keep = bool(_arg(node, 2, "keepdim", False))
            return _Feat(f.space, f.dim if keep else f.dim - sum(d < f.dim for d in dims), f.block, f.normed)
        raise self.refuse(node, "an operation on hidden units that the derived unit groups do not cover")

    def _sum(
        self, node: fx.Node, f: _Feat, inputs: list[fx.Node], in_shape: tuple[int, ...], out_shape: tuple[int, ...]
    ) -> _Feat:
        """A residual add: both sides' units are one space (dimensions compared from the last, as broadcasting
        aligns them)."""
        for a in inputs[1:]:
            g, shape = self.feat[a], _shape(a)
            assert g is not None and shape is not None
            if (g.dim - len(shape), g.block) != (f.dim - len(in_shape), f.block):
                raise self.refuse(node, "a sum of values whose units lie on different dimensions")
            self.spaces.union(f.space, g.space)
        normed = all(self.feat[a].normed for a in inputs)  # type: ignore[union-attr]
        return _Feat(f.space, f.dim + len(out_shape) - len(in_shape), f.block, normed)

    def _reshape(self, node: fx.Node, f: _Feat, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> _Feat:
        if out_shape == in_shape:
            return _Feat(f.space, f.dim, f.block, f.normed)
        k = len(out_shape) - 1  # a flatten of the trailing dimensions written as view(B, -1)
        if k >= 1 and out_shape[:k] == in_shape[:k] and k <= f.dim:
            return self._flatten(node, f, k, -1)
        raise self.refuse(node, f"a reshape from {list(in_shape)} to {list(out_shape)} is not covered")

    def _cat(self, node: fx.Node, f: _Feat, inputs: list[fx.Node], in_shape: tuple[int, ...]) -> _Feat:
        dim = int(_arg(node, 1, "dim", 0)) % len(in_shape)
        if dim == f.dim:
            raise self.refuse(node, "a concatenation along the units (channels) is not covered yet")
        if len(inputs) != len(node.args[0]):  # type: ignore[arg-type]
            raise self.refuse(node, "a concatenation with a constant along the units' space")
        for a in inputs[1:]:
            g = self.feat[a]
            assert g is not None
            if (g.dim, g.block) != (f.dim, f.block):
                raise self.refuse(node, "a concatenation of values whose units lie on different dimensions")
            self.spaces.union(f.space, g.space)
        return _Feat(f.space, f.dim, f.block, all(self.feat[a].normed for a in inputs))  # type: ignore[union-attr]

    # --- the groups ------------------------------------------------------------------------------
    def groups(self) -> list[UnitGroup]:
        roots = sorted({self.spaces.find(i) for i in range(len(self.spaces.parent))})
        out = []
        for r in roots:
            sp = self.spaces.info[r]
            writers = [m for m in sp.members if m.role == "rows"]
            if sp.fixed or not writers:
                continue
            name, admits = _prefix(writers[0].tensor), _admits(sp, writers)
            out.append(UnitGroup(name, tuple(sp.members), bool(sp.norm_kinds), admits))
        return out

    def check_covered(self) -> None:
        for name, p in self.gm.named_parameters():
            if p.is_floating_point() and p.dim() >= 1 and name not in self.seen:
                raise AlignmentError(f"parameter {name!r} is not reached by the traced graph as a layer the derived "
                                     "unit groups know (used in forward in a way not covered)")  # fmt: skip


def _admits(sp: _Space, writers: list[Member]) -> tuple[str, ...]:
    """Permutation always; a positive rescale where the scaled values (the norms' outputs, or the writers'
    without a norm) meet only positively homogeneous functions on their way to the readers; a sign flip of a
    writer with its BatchNorm's weight where every writer has its own BatchNorm."""
    with_bn = {m.of for m in sp.members if m.role == "mean"}
    own_bn = all(w.tensor in with_bn for w in writers)
    admits = ["permute"]
    if not sp.norm_kinds:
        scalable = not sp.ops and not sp.self_read
    elif sp.norm_kinds == {"batch"}:
        scalable = own_bn and not sp.self_read and not any(normed for _, normed in sp.ops) and sp.reads <= {True}
    elif sp.norm_kinds == {"layer"}:
        scalable = not any(normed for _, normed in sp.ops) and sp.reads <= {True}
    else:
        scalable = False
    if scalable:
        admits.append("rescale")
    if sp.norm_kinds == {"batch"} and own_bn:
        admits.append("signflip")
    return tuple(admits)


def _prefix(tensor: str) -> str:
    return tensor.rpartition(".")[0] or tensor


def _name(target: object) -> str:
    return getattr(target, "__name__", None) or str(target)


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)
