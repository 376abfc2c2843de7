"""The operations fingerprint.graph reads on values that carry hidden units, other than modules: sums (a
residual add makes two spaces one), products with a constant, elementwise functions, and everything that moves
the units' dimension (flatten, reshape, transpose, permute, squeeze, indexing, concatenation, reductions). A
mixin of the graph walk: it reads and writes the walk's spaces and values' units, and refuses what it cannot
read with the node named."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from securemark.fingerprint.groups import AlignmentError
from securemark.fingerprint.spaces import (
    ADD,
    HOMOGENEOUS_FUNCTIONS,
    LOOSE,
    OTHER_FUNCTIONS,
    REDUCTIONS,
    SCALAR_MUL,
    Feat,
    Spaces,
)  # fmt: skip


class ValueOps:
    """The walk's handling of call_function and call_method nodes (fingerprint.graph._Walk mixes it in)."""

    feat: dict[fx.Node, Feat | None]
    spaces: Spaces

    def refuse(self, node: fx.Node, why: str) -> AlignmentError:
        return AlignmentError(f"node {node.name!r} ({node.op} {_name(node.target)}): {why}")

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


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _numel(node: fx.Node) -> int:
    shape = _shape(node)
    return math.prod(shape) if shape is not None else 1


def _name(target: object) -> str:
    return getattr(target, "__name__", None) or str(target)


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)
