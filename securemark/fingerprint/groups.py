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
ROLES = ("rows", "bias", "cols", "mean", "var", "affine", "shift")
REWRITES = ("permute", "rescale", "absorb", "signflip", "widen")  # what a group may admit (fingerprint.moves)


class AlignmentError(SecureMarkError, ValueError):
    """The suspect (or the base) has a shape alignment cannot map; the message says why."""


@dataclass(frozen=True)
class Member:
    """One tensor axis that a unit group permutes.

    role: ``rows`` a weight's own units (axis 0: the unit's incoming weights), ``bias`` their bias,
    ``cols`` the next layer's input axis (``block`` consecutive entries per unit: H*W after a flatten),
    ``mean``/``var`` BatchNorm running statistics, ``affine`` a norm's weight (BatchNorm, LayerNorm),
    ``shift`` its bias (older specs call both ``affine``).

    The axis is read as ``outer`` x units x ``block`` entries: ``outer`` > 1 lays several unit runs side by side
    (the heads of a fused q/k/v projection: 3 x heads x head_dim). ``of`` names the weight a bias or a norm's
    member belongs to (the writer whose scale a BatchNorm absorbs); empty: the group's writers together.
    """

    tensor: str
    role: str
    axis: int = 0
    block: int = 1
    outer: int = 1
    of: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise AlignmentError(f"member {self.tensor!r}: role must be one of {ROLES}, got {self.role!r}")
        if not 0 <= self.axis < 64 or not 1 <= self.block < 2**40 or not 1 <= self.outer < 2**20:
            raise AlignmentError(
                f"member {self.tensor!r}: needs 0 <= axis < 64, block >= 1 and outer >= 1, got {self.axis}, "
                f"{self.block}, {self.outer}"
            )

    def to_json(self) -> list:
        extra = [self.outer, self.of] if (self.outer, self.of) != (1, "") else []
        return [self.tensor, self.role, self.axis, self.block, *extra]


@dataclass(frozen=True)
class UnitGroup:
    name: str
    members: tuple[Member, ...]
    norm: bool = False  # a norm sits between the rows and the cols (BatchNorm after the writers, LayerNorm before
    # the readers): the cols see the norm's affine scale, not the rows'
    admits: tuple[str, ...] = ("permute", "rescale", "widen")  # the function-preserving rewrites of these units

    def __post_init__(self) -> None:
        unknown = set(self.admits) - set(REWRITES)
        if unknown:
            raise AlignmentError(f"unit group {self.name!r}: admits one of {REWRITES}, got {sorted(unknown)}")

    def of(self, role: str) -> list[Member]:
        return [m for m in self.members if m.role == role]

    def to_json(self) -> dict:
        return {"name": self.name, "norm": self.norm, "admits": list(self.admits),
                "members": [m.to_json() for m in self.members]}  # fmt: skip

    @classmethod
    def from_json(cls, obj: dict) -> UnitGroup:
        try:
            members = tuple(
                Member(str(t), str(r), int(a), int(b), *_extra(rest)) for t, r, a, b, *rest in obj["members"]
            )
            admits = tuple(str(a) for a in obj.get("admits", ("permute", "rescale", "widen")))
            return cls(str(obj["name"]), members, bool(obj.get("norm", False)), admits)
        except (KeyError, TypeError, ValueError) as exc:
            raise AlignmentError(f"bad unit group {obj!r}: {exc}") from None


def _extra(rest: list) -> tuple[int, str]:
    if len(rest) not in (0, 2):
        raise ValueError("a member is [tensor, role, axis, block] or [tensor, role, axis, block, outer, of]")
    return (int(rest[0]), str(rest[1])) if rest else (1, "")


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


def _layers(sd: StateDict, by_name: bool) -> list[_Layer]:
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, t in sd.items():
        prefix, _, leaf = name.rpartition(".")
        modules.setdefault(prefix, {})[leaf] = tuple(t.shape)
    layers = []
    for prefix in sorted(modules, key=_natural) if by_name else modules:
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
    ``nn.Sequential`` and modules defined in forward order (Flower's quickstart ``Net``) name them; where that
    order is no chain, in the state_dict's own order (the order the modules were defined in, e.g. a ``fc``
    defined last that sorts before ``layer1``). Each layer must take what the previous one gives: the same
    width, or a multiple of it after a flatten (conv -> linear). Anything else is refused with the reason
    (residual models are no chain: register their architecture, fingerprint.arch).
    """
    try:
        return _chain(_layers(sd, by_name=True))
    except AlignmentError:
        if [k for k in sd] == sorted(sd, key=_natural):
            raise
        try:
            return _chain(_layers(sd, by_name=False))
        except AlignmentError:
            pass
        raise


def _chain(layers: list[_Layer]) -> list[UnitGroup]:
    weights = [i for i, layer in enumerate(layers) if layer.kind == "weight"]
    groups = []
    for a, b in itertools.pairwise(weights):
        prev, nxt = layers[a], layers[b]
        out, fan_in = prev.tensors["weight"][0], nxt.tensors["weight"][1]
        conv_to_conv = len(prev.tensors["weight"]) > 2 and len(nxt.tensors["weight"]) > 2
        if fan_in % out or (conv_to_conv and fan_in != out):
            raise AlignmentError(
                f"layer {nxt.prefix!r} takes {fan_in} inputs but {prev.prefix!r} gives {out} units: not a "
                "sequential chain (register the architecture of residual or branching models: registry init --arch)"
            )
        w = f"{prev.prefix}.weight"
        members = [Member(w, "rows")]
        if "bias" in prev.tensors:
            members.append(Member(f"{prev.prefix}.bias", "bias", of=w))
        norms = [layers[k] for k in range(a + 1, b)]
        for norm in norms:
            if norm.tensors["weight"] != (out,):
                raise AlignmentError(
                    f"norm {norm.prefix!r} has {norm.tensors['weight'][0]} channels, {prev.prefix!r} gives {out}"
                )
            members += [Member(f"{norm.prefix}.running_mean", "mean", of=w),
                        Member(f"{norm.prefix}.running_var", "var", of=w),
                        Member(f"{norm.prefix}.weight", "affine", of=w)]  # fmt: skip
            if "bias" in norm.tensors:
                members.append(Member(f"{norm.prefix}.bias", "shift", of=w))
        members.append(Member(f"{nxt.prefix}.weight", "cols", axis=1, block=fan_in // out))
        admits = ("permute", "rescale", "absorb", "signflip", "widen") if norms else ("permute", "rescale", "widen")
        groups.append(UnitGroup(prev.prefix, tuple(members), norm=bool(norms), admits=admits))
    return groups


# --- a group's units on its tensors ----------------------------------------------------------------------
def to_units(arr: np.ndarray, m: Member, units: int) -> np.ndarray:
    """(units, ...): the member's axis split into (outer, units, block) and the units moved first."""
    shape = arr.shape
    if arr.ndim <= m.axis:
        raise AlignmentError(f"tensor {m.tensor!r} has {arr.ndim} dimensions, no axis {m.axis}")
    if units == 0 or shape[m.axis] != m.outer * units * m.block:
        raise AlignmentError(
            f"tensor {m.tensor!r} has {shape[m.axis]} entries on axis {m.axis}, expected "
            + (f"{m.outer} x " if m.outer > 1 else "")
            + f"{units} units x {m.block}"
        )
    split = arr.reshape((*shape[: m.axis], m.outer, units, m.block, *shape[m.axis + 1 :]))
    return np.moveaxis(split, m.axis + 1, 0)


def from_units(u: np.ndarray, m: Member, like: tuple[int, ...]) -> np.ndarray:
    moved = np.moveaxis(u, 0, m.axis + 1)
    return moved.reshape((*like[: m.axis], m.outer * u.shape[0] * m.block, *like[m.axis + 1 :]))


def units_of(arrs: dict[str, np.ndarray], g: UnitGroup) -> int:
    lead = g.of("rows")
    if not lead:
        raise AlignmentError(f"unit group {g.name!r} has no rows member")
    if arrs[lead[0].tensor].ndim <= lead[0].axis:
        raise AlignmentError(f"tensor {lead[0].tensor!r} has {arrs[lead[0].tensor].ndim} dimensions, no axis "
                             f"{lead[0].axis}")  # fmt: skip
    return arrs[lead[0].tensor].shape[lead[0].axis] // (lead[0].block * lead[0].outer)


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
