"""What fingerprint.graph tracks while it walks a model's graph: which dimension of a value holds hidden units
(a :class:`Feat`), the spaces those units belong to (a union-find: a residual add makes two spaces one), and the
operations they pass through, from which the rewrites a space admits are read (and then checked on the model
itself, fingerprint.verify)."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from securemark.fingerprint.groups import Member, UnitGroup

# elementwise operations, by whether a positive factor on their input comes out as the same factor
HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                       nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout,
                       nn.Identity)  # fmt: skip
OTHER_ELEMENTWISE = (nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardtanh, nn.ELU, nn.Mish)
HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, F.relu_, torch.relu_, F.leaky_relu, F.max_pool2d, F.avg_pool2d,
                         F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout, "relu", "relu_", "contiguous",
                         "clone", "float", "detach", "to", "type_as"}  # fmt: skip
OTHER_FUNCTIONS = {F.relu6, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.hardswish, F.hardtanh, F.elu, torch.clamp,
                   "sigmoid", "tanh", "gelu", "clamp", "clamp_min", "clamp_max", "clamp_"}  # fmt: skip
ADD = {operator.add, operator.iadd, operator.sub, torch.add, torch.sub, "add", "add_", "sub"}
SCALAR_MUL = {operator.mul, operator.truediv, torch.mul, "mul", "div"}
REDUCTIONS = {"mean", torch.mean, "sum", torch.sum, "amax", torch.amax}

LOOSE = -1  # the dimension of a value derived from the model's input: fixed units, whatever their layout


@dataclass(frozen=True)
class Feat:
    """A value's hidden units: dimension ``dim`` holds ``block`` consecutive entries per unit of ``space``;
    ``normed``: a norm's output (or what homogeneous functions made of one); ``writer``: the weight that wrote
    the value, while nothing else has touched it."""

    space: int
    dim: int
    block: int = 1
    normed: bool = False
    writer: str = ""

    def moved(self, dim: int, block: int | None = None) -> Feat:
        """The same units on another dimension (LOOSE stays LOOSE)."""
        return Feat(self.space, LOOSE if self.dim == LOOSE else dim, self.block if block is None else block,
                    self.normed)  # fmt: skip


@dataclass
class Space:
    members: list[Member] = field(default_factory=list)
    fixed: bool = False
    ops: set[tuple[str, bool]] = field(default_factory=set)  # non-homogeneous operations met, on normed values?
    reads: set[bool] = field(default_factory=set)  # readers (cols) fed with normed values?
    norm_kinds: set[str] = field(default_factory=set)  # "batch" / "layer"
    self_read: bool = False  # a depthwise conv reads and writes these units


class Spaces:
    """Union-find over spaces; a space's record is its root's."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.info: list[Space] = []

    def new(self, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.info.append(Space(fixed=fixed))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def get(self, i: int) -> Space:
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

    def groups(self) -> tuple[list[UnitGroup], set[str]]:
        """The unit groups (spaces that are not fixed and have writers) and the tensors of fixed spaces."""
        out, fixed = [], set()
        for r in sorted({self.find(i) for i in range(len(self.parent))}):
            sp = self.info[r]
            writers = [m for m in sp.members if m.role == "rows"]
            if sp.fixed or not writers:
                fixed |= {m.tensor for m in sp.members}
                continue
            name = writers[0].tensor.rpartition(".")[0] or writers[0].tensor
            out.append(UnitGroup(name, tuple(_unique(sp.members)), bool(sp.norm_kinds), _admits(sp)))
        return out, fixed - {m.tensor for g in out for m in g.members}


def _unique(members: list[Member]) -> list[Member]:
    return list(dict.fromkeys(members))


def _admits(sp: Space) -> tuple[str, ...]:
    """Permutation; and a positive rescale where the scaled values (the norms' outputs, or the writers' without
    a norm) meet only positively homogeneous functions on their way to readers that read them. Sign flips and
    BatchNorm absorption are exact where they hold at all: fingerprint.verify tries them on the model."""
    if not sp.norm_kinds:
        scalable = not sp.ops and not sp.self_read
    elif sp.norm_kinds == {"layer"} or sp.norm_kinds == {"batch"}:
        scalable = not sp.self_read and not any(normed for _, normed in sp.ops) and sp.reads <= {True}
    else:
        scalable = False
    return ("permute", "rescale") if scalable else ("permute",)
