"""The owner's architecture, registered once: a callable that builds the model (the owner's own code,
imported from the working directory or PYTHONPATH, so trusted as the owner trusts it) with its keyword
arguments and the shape of one input. From it come the unit groups alignment needs (fingerprint.graph);
the registry keeps the record: the import path, the arguments, the input shape, a digest of the traced
graph and the groups themselves, so a trace needs none of the owner's code and a changed class is noticed.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from securemark.errors import InputError
from securemark.fingerprint.graph import derive
from securemark.fingerprint.groups import AlignmentError, UnitGroup, to_units, units_of


@dataclass(frozen=True)
class Arch:
    target: str  # "package.module:callable"
    kwargs: dict[str, Any] = field(default_factory=dict)
    example: tuple[int, ...] = ()  # one input's shape, batch first: (1, 3, 32, 32)

    @classmethod
    def parse(cls, target: str, kwargs: str | None = None, example: str | None = None) -> Arch:
        """From the command line: ``MODULE:CALLABLE``, a JSON object of keyword arguments, ``1,3,32,32``."""
        module, _, name = target.partition(":")
        if not module or not name or not all(p.isidentifier() for p in (*module.split("."), *name.split("."))):
            raise InputError(f"--arch {target!r}: expected MODULE:CALLABLE, e.g. mymodels:resnet18")
        try:
            args = json.loads(kwargs) if kwargs else {}
        except json.JSONDecodeError as exc:
            raise InputError(f"--arch-kwargs: not JSON ({exc})") from None
        if not isinstance(args, dict):
            raise InputError("--arch-kwargs: expected a JSON object of keyword arguments")
        if not example:
            raise InputError("--arch needs --example-input, the shape of one input batch (e.g. 1,3,32,32)")
        try:
            shape = tuple(int(s) for s in example.replace("x", ",").split(","))
        except ValueError:
            raise InputError(f"--example-input {example!r}: expected sizes separated by commas (1,3,32,32)") from None
        if len(shape) < 2 or min(shape) < 1 or math.prod(shape) > 2**26:
            raise InputError(f"--example-input {example!r}: a batch of at least one input, each size >= 1, not huge")
        return cls(target, args, shape)

    def build(self) -> nn.Module:
        """The model, built by the owner's callable (the working directory is searched first)."""
        module, _, name = self.target.partition(":")
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            obj: Any = importlib.import_module(module)
            for part in name.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError, SyntaxError, SystemExit) as exc:  # importing runs the module's code
            raise InputError(f"--arch {self.target}: cannot import it ({type(exc).__name__}: {exc})") from None
        try:
            model = obj(**self.kwargs)
        except (Exception, SystemExit) as exc:  # the owner's own code, called with the owner's arguments
            raise InputError(f"--arch {self.target}: calling it failed ({type(exc).__name__}: {exc})") from None
        if not isinstance(model, nn.Module):
            raise InputError(f"--arch {self.target}: returned {type(model).__name__}, not a torch.nn.Module")
        return model.eval()

    def record(self, model: nn.Module | None = None) -> dict[str, Any]:
        """What the registry keeps: the import path, arguments, input shape, graph digest and unit groups.
        AlignmentError says why the model's graph cannot be derived (refused at registration)."""
        derived = derive(model if model is not None else self.build(), torch.zeros(self.example))
        return {"target": self.target, "kwargs": self.kwargs, "example": list(self.example), "graph": derived.digest,
                "groups": [g.to_json() for g in derived.groups], "exempt": derived.exempt}  # fmt: skip


def record_of(model: nn.Module, example_input: Sequence[int]) -> dict[str, Any]:
    """The architecture record of a model built in the owner's process (a Flower ServerApp, an evaluation):
    its class as the import path, no arguments, and its unit groups. AlignmentError when its graph cannot
    be derived."""
    target = f"{type(model).__module__}:{type(model).__qualname__}"
    return Arch(target, {}, tuple(int(s) for s in example_input)).record(model)


def groups_of(record: dict[str, Any]) -> list[UnitGroup]:
    """The unit groups a registry's architecture record holds."""
    groups = record.get("groups") if isinstance(record, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise AlignmentError("the registry's architecture record is malformed: its groups are no list of objects")
    try:
        return [UnitGroup.from_json(g) for g in groups]
    except (KeyError, TypeError) as exc:
        raise AlignmentError(f"the registry's architecture record is malformed ({exc})") from None


def check_covers(groups: list[UnitGroup], base: Mapping[str, torch.Tensor], exempt: Sequence[str] = ()) -> None:
    """Refuse unit groups that name a tensor the base lacks, or leave a >= 2-D weight of the base out of every
    group (a stream or stem left out of a spec would be read unaligned: silently lost to a rewrite), unless
    the derivation found that no rewrite moves it (``exempt``: between the fixed input and output, or unused)."""
    named = {m.tensor for g in groups for m in g.members} | set(exempt)
    unknown = sorted(named - set(base))
    if unknown:
        raise AlignmentError(f"the unit groups name {unknown[0]!r}, which the base does not have")
    arrays = {m.tensor: base[m.tensor].detach().numpy() for g in groups for m in g.members if m.tensor in base}
    for g in groups:  # every member lays out the group's number of units (AlignmentError names one that does not)
        n = units_of(arrays, g)
        for m in g.members:
            to_units(arrays[m.tensor], m, n)
    left = [k for k, t in base.items() if t.is_floating_point() and t.dim() >= 2 and k not in named]
    if left:
        raise AlignmentError(f"no unit group covers {left[0]!r} ({len(left)} weight tensors left out): a copy whose "
                             "units were permuted there would escape the reading")  # fmt: skip
