"""Unit groups: the tensors (and axes) that share one hidden layer's unit order, and the views of those tensors
unit by unit. A group is read from JSON (:func:`load_groups`) or derived from the shapes of a sequential
Linear / Conv / BatchNorm chain (:func:`chain_groups`); :func:`to_units` and :func:`from_units` move a member's
axis first and back, which is all the alignment (fingerprint.align) and the rewrite attacks need of a layout.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from securemark.errors import SecureMarkError

StateDict = Mapping[str, torch.Tensor]
ROLES = ("rows", "bias", "cols", "mean", "var", "affine")


class AlignmentError(SecureMarkError, ValueError):
    """The suspect (or the base) has a shape alignment cannot map; the message says why."""


@dataclass(frozen=True)
class Member:
    """One tensor axis that a unit group permutes.

    role: ``rows`` a weight's own units (axis 0: the unit's incoming weights), ``bias`` their bias,
    ``cols`` the next layer's input axis (``block`` consecutive entries per unit: H*W after a flatten),
    ``mean``/``var`` BatchNorm running statistics, ``affine`` BatchNorm weight and bias.
    """

    tensor: str
    role: str
    axis: int = 0
    block: int = 1

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise AlignmentError(f"member {self.tensor!r}: role must be one of {ROLES}, got {self.role!r}")
        if not 0 <= self.axis < 64 or not 1 <= self.block < 2**40:
            raise AlignmentError(
                f"member {self.tensor!r}: needs 0 <= axis < 64 and block >= 1, got {self.axis}, {self.block}"
            )


@dataclass(frozen=True)
class UnitGroup:
    name: str
    members: tuple[Member, ...]
    norm: bool = False  # a BatchNorm sits between the rows and the cols

    def of(self, role: str) -> list[Member]:
        return [m for m in self.members if m.role == role]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "norm": self.norm,
            "members": [[m.tensor, m.role, m.axis, m.block] for m in self.members],
        }

    @classmethod
    def from_json(cls, obj: dict) -> UnitGroup:
        try:
            members = tuple(Member(str(t), str(r), int(a), int(b)) for t, r, a, b in obj["members"])
            return cls(str(obj["name"]), members, bool(obj.get("norm", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise AlignmentError(f"bad unit group {obj!r}: {exc}") from None


def load_groups(path: str | Path) -> list[UnitGroup]:
    """Unit groups from a JSON file: ``[{"name", "norm", "members": [[tensor, role, axis, block], ...]}]``."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AlignmentError(f"cannot read unit groups from {path}: {exc}") from None
    except UnicodeDecodeError:  # its message would quote a byte of the file
        raise AlignmentError(f"cannot read unit groups from {path}: not a UTF-8 text file") from None
    if not isinstance(raw, list) or not raw:
        raise AlignmentError(f"{path}: expected a JSON list of unit groups, at least one (none aligns nothing)")
    return [UnitGroup.from_json(g) for g in raw]


# --- the layer graph of a sequential chain --------------------------------------------------------------
def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass
class _Layer:
    prefix: str
    kind: str  # "weight" (linear/conv) or "norm"
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)


def _layers(sd: StateDict) -> list[_Layer]:
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, t in sd.items():
        prefix, _, leaf = name.rpartition(".")
        modules.setdefault(prefix, {})[leaf] = tuple(t.shape)
    layers = []
    for prefix in sorted(modules, key=_natural):
        leaves = modules[prefix]
        if "weight" not in leaves:
            raise AlignmentError(
                f"module {prefix!r} has no weight ({sorted(leaves)}): not a Linear/Conv/BatchNorm chain"
            )
        if len(leaves["weight"]) >= 2:
            layers.append(_Layer(prefix, "weight", leaves))
        elif "running_mean" in leaves:
            layers.append(_Layer(prefix, "norm", leaves))
        else:
            raise AlignmentError(
                f"module {prefix!r} has a 1-D weight without running statistics (LayerNorm/GroupNorm?): not covered "
                "by the derived chain; pass explicit unit groups"
            )
    return layers


def chain_groups(sd: StateDict) -> list[UnitGroup]:
    """The hidden unit groups of a sequential Linear / Conv (/ BatchNorm) chain, derived from shapes.

    Layers are ordered by name (numbers compared as numbers: ``features.10`` after ``features.9``), as
    ``nn.Sequential`` and modules defined in forward order (Flower's quickstart ``Net``) name them. Each layer
    must take what the previous one gives: the same width, or a multiple of it after a flatten
    (conv -> linear). Anything else is refused with the reason.
    """
    layers = _layers(sd)
    weights = [i for i, layer in enumerate(layers) if layer.kind == "weight"]
    groups = []
    for a, b in itertools.pairwise(weights):
        prev, nxt = layers[a], layers[b]
        out, fan_in = prev.tensors["weight"][0], nxt.tensors["weight"][1]
        conv_to_conv = len(prev.tensors["weight"]) > 2 and len(nxt.tensors["weight"]) > 2
        if fan_in % out or (conv_to_conv and fan_in != out):
            raise AlignmentError(
                f"layer {nxt.prefix!r} takes {fan_in} inputs but {prev.prefix!r} gives {out} units: not a "
                "sequential chain (residual or branching models need explicit unit groups)"
            )
        members = [Member(f"{prev.prefix}.weight", "rows")]
        if "bias" in prev.tensors:
            members.append(Member(f"{prev.prefix}.bias", "bias"))
        norms = [layers[k] for k in range(a + 1, b)]
        for norm in norms:
            if norm.tensors["weight"] != (out,):
                raise AlignmentError(
                    f"norm {norm.prefix!r} has {norm.tensors['weight'][0]} channels, {prev.prefix!r} gives {out}"
                )
            members += [Member(f"{norm.prefix}.running_mean", "mean"), Member(f"{norm.prefix}.running_var", "var"),
                        Member(f"{norm.prefix}.weight", "affine")]  # fmt: skip
            if "bias" in norm.tensors:
                members.append(Member(f"{norm.prefix}.bias", "affine"))
        members.append(Member(f"{nxt.prefix}.weight", "cols", axis=1, block=fan_in // out))
        groups.append(UnitGroup(prev.prefix, tuple(members), norm=bool(norms)))
    return groups


# --- a group's units on its tensors ----------------------------------------------------------------------
def to_units(arr: np.ndarray, m: Member, units: int) -> np.ndarray:
    """(units, ...): the member's axis split into (units, block) and moved first."""
    shape = arr.shape
    if arr.ndim <= m.axis:
        raise AlignmentError(f"tensor {m.tensor!r} has {arr.ndim} dimensions, no axis {m.axis}")
    if units == 0 or shape[m.axis] != units * m.block:
        raise AlignmentError(
            f"tensor {m.tensor!r} has {shape[m.axis]} entries on axis {m.axis}, expected {units} units x {m.block}"
        )
    split = arr.reshape((*shape[: m.axis], units, m.block, *shape[m.axis + 1 :]))
    return np.moveaxis(split, m.axis, 0)


def from_units(u: np.ndarray, m: Member, like: tuple[int, ...]) -> np.ndarray:
    moved = np.moveaxis(u, 0, m.axis)
    return moved.reshape((*like[: m.axis], u.shape[0] * m.block, *like[m.axis + 1 :]))


def units_of(arrs: dict[str, np.ndarray], g: UnitGroup) -> int:
    lead = g.of("rows")
    if not lead:
        raise AlignmentError(f"unit group {g.name!r} has no rows member")
    if arrs[lead[0].tensor].ndim <= lead[0].axis:
        raise AlignmentError(f"tensor {lead[0].tensor!r} has {arrs[lead[0].tensor].ndim} dimensions, no axis "
                             f"{lead[0].axis}")  # fmt: skip
    return arrs[lead[0].tensor].shape[lead[0].axis] // lead[0].block


def _stack(arrs: dict[str, np.ndarray], members: list[Member], units: int) -> np.ndarray:
    """(units, entries): the members' per-unit entries side by side."""
    if not members:
        raise AlignmentError("a unit group lacks the members this step needs (a norm group without BatchNorm "
                             "weight/bias, or no cols)")  # fmt: skip
    return np.concatenate([to_units(arrs[m.tensor], m, units).reshape(units, -1) for m in members], axis=1)


def _unit_matrices(
    s: dict[str, np.ndarray], b: dict[str, np.ndarray], members: list[Member], m: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Suspect (m, k) and base (n, k) per-unit entries of ``members``. Units compare entry by entry, so an
    axis other than the units' that differs is one no unit group maps: refused, naming the tensor."""
    su, bu = _stack(s, members, m), _stack(b, members, n)
    if su.shape[1] != bu.shape[1]:
        t = next(x.tensor for x in members if s[x.tensor].size // m != b[x.tensor].size // n)
        raise AlignmentError(
            f"tensor {t!r} has shape {list(s[t].shape)}, the base {list(b[t].shape)}, and no unit group maps the "
            "difference"
        )
    return su, bu
